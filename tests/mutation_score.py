"""Mutation score per file from mutmut's results in mutants/ (run by `make mutation` after `mutmut run`).

score = killed / (mutants - skipped); a timeout counts as killed (the mutant hung a test). Survivors are
listed by name: `mutmut show NAME` prints the change.
"""

import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.glob("minilora/**/*.py.meta"))
    if not metas:
        print("no mutmut results in mutants/; run `make mutation`.")
        return 1
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        status = {name: status_by_exit_code[code] for name, code in codes.items()}
        counted = [s for s in status.values() if s != "skipped"]
        killed = sum(s in ("killed", "timeout") for s in counted)
        source = meta.relative_to(root).with_suffix("")
        print(f"{source}: {killed}/{len(counted)} killed = {100 * killed / max(len(counted), 1):.1f}%")
        for name, s in sorted(status.items()):
            if s not in ("killed", "timeout", "skipped"):
                print(f"    {s}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
