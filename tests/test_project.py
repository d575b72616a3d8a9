"""Project hygiene: the install files agree, and every folder documents its files."""

import re
import subprocess
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


def _project_files() -> list[Path]:
    """Files git tracks or would track (ignored ones left out: .venv, caches, local scratch folders)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [Path(p) for p in out.split("\0") if p and (ROOT / p).exists()]


def _folders_and_children() -> dict[Path, set[str]]:
    """Every folder below the root that holds project files, with the names directly inside it."""
    folders: dict[Path, set[str]] = {}
    for path in _project_files():
        for depth in range(1, len(path.parts)):
            folders.setdefault(Path(*path.parts[:depth]), set()).add(path.parts[depth])
    return {f: names for f, names in folders.items() if f.parts[0] != ".ci"}


def test_every_folder_has_a_readme_listing_its_files():
    missing = []
    for folder, names in sorted(_folders_and_children().items()):
        readme = ROOT / folder / "README.md"
        if not readme.exists():
            missing.append(f"{folder}/README.md (missing)")
            continue
        text = readme.read_text()
        missing += [f"{folder}/README.md does not mention {name}" for name in sorted(names)
                    if name != "README.md" and not name.startswith(".") and name not in text]
    assert not missing, "\n".join(missing)
