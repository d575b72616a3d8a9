"""Lessons are committed executed and clean, and the code they show inline is the package's code."""

import json
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
INLINE_MARK = re.compile(r"^# same code as (minilora/[\w/]+\.py)\s*$")


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_there_are_lessons():
    assert LESSONS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_is_executed_without_errors(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, "lesson has no code"
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"code cells {unexecuted} were not executed; run `make lessons` and commit"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "cells were not run once, top to bottom, in a fresh kernel"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"stored error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_ignores_at_most_two_outputs(path):
    ignored = [c for c in _cells(path) if c["cell_type"] == "code" and "NBVAL_IGNORE_OUTPUT" in "".join(c["source"])]
    assert len(ignored) <= 2


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_prints_no_progress_bars(path):
    for cell in _cells(path):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) if isinstance(out.get("text"), list) else out.get("text", "")
            assert not re.search(r"\d+%\|", text), "a tqdm bar leaked into the output; pass progress=False"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_inline_code_is_the_package_code(path):
    """A cell starting with `# same code as minilora/x.py` must be a verbatim excerpt of that file.

    A method may be shown as a top-level function: the cell then matches once indented one level."""
    for cell in _cells(path):
        lines = "".join(cell["source"]).splitlines()
        if not lines or not INLINE_MARK.match(lines[0]):
            continue
        source = (ROOT / INLINE_MARK.match(lines[0]).group(1)).read_text()
        body = "\n".join(lines[1:]).strip("\n")
        method = textwrap.indent(body, "    ", lambda line: line.strip() != "")
        assert body and (body in source or method in source), f"inline code in {path.name} drifted from {lines[0][15:]}"
