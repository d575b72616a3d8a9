"""The exercise notebooks: solutions carry nbgrader's marks and are committed executed; the student versions
are nbgrader's regeneration of them, and run top to bottom with every check failing in plain words."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))


def _generator_module():
    path = ROOT / "notebooks" / "solutions" / "generate_exercises.py"
    spec = importlib.util.spec_from_file_location("generate_exercises", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code(nb) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def test_every_solution_has_a_student_version():
    assert SOLUTIONS, "no notebooks/solutions/*.ipynb"
    assert [p.name for p in EXERCISES] == [p.name for p in SOLUTIONS]


def test_student_versions_are_a_fresh_nbgrader_regeneration(tmp_path):
    written = _generator_module().generate(tmp_path)
    assert [p.name for p in written] == [p.name for p in EXERCISES]
    for fresh in written:
        committed = ROOT / "notebooks" / "exercises" / fresh.name
        assert json.loads(fresh.read_text()) == json.loads(committed.read_text()), (
            f"notebooks/exercises/{fresh.name} is out of date: run `make exercises` and commit")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_has_3_to_6_exercises_each_followed_by_a_graded_check(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    answers = [i for i, c in enumerate(cells) if _nbgrader(c).get("solution")]
    assert 3 <= len(answers) <= 6
    ids = [_nbgrader(c)["grade_id"] for c in cells if _nbgrader(c)]
    assert len(ids) == len(set(ids)), "grade_ids must be unique"
    for i in answers:
        source = "".join(cells[i]["source"])
        assert source.count("### BEGIN SOLUTION") == source.count("### END SOLUTION") >= 1
        meta, check = _nbgrader(cells[i]), cells[i + 1]
        assert meta == {"grade": False, "grade_id": meta["grade_id"], "locked": False, "schema_version": 3,
                        "solution": True}
        check_meta = _nbgrader(check)
        assert check_meta["grade"] and check_meta["locked"] and not check_meta["solution"]
        assert check_meta["points"] > 0 and check_meta["schema_version"] == 3
        assert "".join(check["source"]).startswith("checks."), "each answer is followed by its check cell"
    regions = [i for i, c in enumerate(cells) if "BEGIN SOLUTION" in "".join(c["source"])]
    assert regions == answers, "every solution region sits in a cell marked as a solution"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_is_committed_executed_with_every_check_passing(path):
    code = [c for c in _code(json.loads(path.read_text())) if "".join(c["source"]).strip()]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run `make exercises`"
    for cell in code:
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"]
        if _nbgrader(cell).get("grade"):
            text = "".join("".join(o.get("text", [])) for o in cell["outputs"])
            assert text.startswith("✓ "), text


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_student_version_has_no_solutions_and_no_outputs(path):
    nb = json.loads(path.read_text())
    text = path.read_text()
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    for cell in _code(nb):
        assert cell["outputs"] == [] and cell["execution_count"] is None
        if _nbgrader(cell).get("solution"):
            assert "raise NotImplementedError()" in "".join(cell["source"])


def _execute(path: Path, workdir: Path):
    """Run a notebook top to bottom in a python3 kernel of this interpreter, keeping going past errors."""
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv[0] = sys.executable  # this environment, whatever `python` is on PATH
    NotebookClient(nb, km=km, timeout=120, allow_errors=True,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_student_version_runs_and_each_check_says_not_implemented_yet(path, tmp_path):
    nb = _execute(path, tmp_path)
    checks = 0
    for cell in _code(nb):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if not _nbgrader(cell).get("grade"):
            assert not errors, f"cell {cell.source[:60]!r} failed: {errors[0].ename}: {errors[0].evalue}"
            continue
        checks += 1
        assert len(errors) == 1, cell.source
        error = errors[0]
        assert error.ename == "ExerciseError"
        assert re.search(r"is not implemented yet: .* Hint: ", error.evalue), error.evalue
        assert error.traceback == [f"ExerciseError: {error.evalue}"], "shown as one line, without a traceback"
    assert checks >= 3


def test_strict_nbval_runs_lessons_and_solutions_but_not_student_versions():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^nbval:.*\n\t(.*)$", makefile, re.MULTILINE).group(1)
    assert "$(LESSONS)" in recipe and "notebooks/solutions/" in recipe
    assert "exercises" not in recipe and not re.search(r"notebooks/?(\s|$)", recipe), "pytest would recurse into exercises/"
