"""Write the student version of each solution notebook here into notebooks/exercises/, with nbgrader.

    python notebooks/solutions/generate_exercises.py [OUT_DIR]      (`make exercises` runs it)

The notebook goes through the preprocessors that `nbgrader generate_assignment` applies, in the same order,
less the ones that need a course folder and its database (header and footer, saving cells to the gradebook):
each `### BEGIN SOLUTION` ... `### END SOLUTION` region becomes nbgrader's `# YOUR CODE HERE` and
`raise NotImplementedError()`, outputs are cleared, check cells are locked and get their checksums. The
student version depends on nothing but the solution notebook, so regenerating it changes nothing
(tests/test_exercises.py compares the committed files with a fresh run).
"""

import sys
from pathlib import Path

import nbformat
from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                    ClearSolutions, ComputeChecksums, LockCells)

SOLUTIONS = Path(__file__).resolve().parent
EXERCISES = SOLUTIONS.parent / "exercises"

# nbgrader's GenerateAssignment.preprocessors, without IncludeHeaderFooter, InstantiateTests and SaveCells
PIPELINE = [LockCells, ClearSolutions, ClearOutput, CheckCellMetadata, ComputeChecksums, ClearHiddenTests,
            ClearMarkScheme, ComputeChecksums, CheckCellMetadata]


def student_version(solution: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(solution, as_version=4)
    resources = {}
    for preprocessor in PIPELINE:
        nb, resources = preprocessor().preprocess(nb, resources)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # the solution run's timestamps, which ClearOutput keeps
    return nb


def generate(out_dir: Path = EXERCISES) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        nbformat.write(student_version(solution), out_dir / solution.name)
        written.append(out_dir / solution.name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else EXERCISES):
        print("wrote", path)
