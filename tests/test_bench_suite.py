"""bench/suite.py (what `make bench` runs) on two stand-in scripts: the summary keeps each script's ratio lines under
the machine's description, a failing script is named and makes the suite exit with 1, and the others still run."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_suite():
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "bench" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_keeps_the_ratios_and_names_a_failure(tmp_path, monkeypatch, capsys):
    suite = load_suite()
    (tmp_path / "good.py").write_text('import sys\nprint("variant  12.0 ms")\nprint("a/b step ratio: 0.912")\n'
                                      'print("speedup over c: 3.1 (batch 1)")\nprint("quick" if "--quick" in sys.argv else "full")\n')
    (tmp_path / "bad.py").write_text('print("x/y ratio: 1.5")\nraise SystemExit(3)\n')
    monkeypatch.setattr(suite, "HERE", tmp_path)
    monkeypatch.setattr(suite, "SCRIPTS", {"bad": "fails", "good": "works"})
    code = suite.main(["--quick"])
    out = capsys.readouterr().out
    summary = out.split("===== summary, ", 1)[1].splitlines()
    assert code == 1 and "cores, torch" in summary[0] and "(--quick)" in summary[0]
    assert summary[1].startswith("bench/bad.py (") and summary[1].endswith("FAILED with exit code 3")
    assert summary[2:] == ["  x/y ratio: 1.5", summary[3], "  a/b step ratio: 0.912", "  speedup over c: 3.1 (batch 1)"]
    assert summary[3].startswith("bench/good.py (") and "FAILED" not in summary[3]
    assert "quick\n" in out and "variant  12.0 ms" in out  # --quick reached the script; its output was shown
    assert suite.main(["--only", "good"]) == 0


def test_every_bench_script_is_in_the_suite_and_the_readme_and_the_methods_table_reaches_the_summary():
    suite = load_suite()
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"suite"}
    assert scripts == set(suite.SCRIPTS)
    readme = (ROOT / "bench" / "README.md").read_text()
    assert all(f"| `{name}.py` |" in readme for name in suite.SCRIPTS)
    # bench/methods_table.py's last two lines, as it prints them
    source = (ROOT / "bench" / "methods_table.py").read_text()
    for line in ("step time ratio to LoRA: full 1.128, qlora 1.139, dora 1.136, ia3 0.855",
                 "measured/estimated peak memory ratio: full 0.865, lora 1.067, qlora 1.091, dora 1.053, ia3 1.097"):
        assert f'print("{line.split(":")[0]}: "' in source and suite.SUMMARY.match(line)
    # its table's header and rows are not summary lines
    assert not suite.SUMMARY.match("method   trainable   step ms  / LoRA |   weights     grads optimizer    activ.     total |      peak peak/est     saved")
