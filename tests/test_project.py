"""Project hygiene: the install files agree, and every folder documents its files."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {_name(d) for d in deps}


def _environment_pip_packages() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    names = set()
    for line in lines[start + 1 :]:
        item = line.strip()
        if not item.startswith("- "):
            break
        item = item[2:].strip()
        if item.startswith("-"):  # pip options: -c constraints.txt, -e .[dev]
            continue
        names.add(_name(item))
    return names


def test_environment_yml_lists_the_same_packages_as_pyproject():
    assert _environment_pip_packages() == _pyproject_packages()


def test_environment_yml_installs_the_package_with_constraints():
    text = (ROOT / "environment.yml").read_text()
    assert "-c constraints.txt" in text and "-e .[dev]" in text


def test_torch_is_pinned_in_constraints():
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    # Every package we depend on has a validated version recorded.
    assert _pyproject_packages() <= {k.lower().replace("_", "-") for k in pins}


def _tracked_folders():
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".ci", ".hypothesis"}
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.is_dir() and not any(part in skip or part.endswith(".egg-info") for part in rel.parts):
            yield path


def test_every_folder_has_a_readme_listing_its_files():
    missing = []
    for folder in _tracked_folders():
        readme = folder / "README.md"
        if not readme.exists():
            missing.append(f"{folder.relative_to(ROOT)}/README.md (missing)")
            continue
        text = readme.read_text()
        for child in sorted(folder.iterdir()):
            if child.name in {"README.md", "__pycache__", ".ipynb_checkpoints"} or child.name.startswith("."):
                continue
            if child.name not in text:
                missing.append(f"{readme.relative_to(ROOT)} does not mention {child.name}")
    assert not missing, "\n".join(missing)
