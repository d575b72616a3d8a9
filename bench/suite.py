"""Every benchmark in one run, and one summary of their ratios: what `make bench` runs.

    python bench/suite.py            # each script at its default size
    python bench/suite.py --quick    # each script's --quick (a few minutes in all on 2 cores)
    python bench/suite.py --only nf4 mixture

Each script runs in its own process, one after the other, with its output shown as it comes. The summary keeps
the lines that report a ratio, a speedup or an overhead (the ones each script ends with), under the machine's
description (CPU, cores, torch, GPU when there is one), ready to paste into bench/RESULTS.md with the date.
A script that fails is reported in the summary and makes the suite exit with 1; the others still run.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"lora_step": "LoRA against peft and the frozen floor, merged inference",
           "method_step": "DoRA's and IA3's step against LoRA's, minilora against peft",
           "methods_table": "every method's step time and memory, estimated and measured, at the default size",
           "nf4": "NF4 against bitsandbytes, a QLoRA layer's step against peft",
           "mixture": "the token-level mixture's generation against one adapter and the re-merge loop"}
SUMMARY = re.compile(r"^(?=\S).*\b(ratio|speedup|overhead)\b.*:\s*\S")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def run(name: str, quick: bool) -> tuple[int, list[str], float]:
    """Run one script, echoing its output; returns its exit code, its summary lines and its wall time."""
    start = time.perf_counter()
    cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else [])]
    proc = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kept = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if SUMMARY.match(line):
            kept.append(line.rstrip())
    return proc.wait(), kept, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these scripts")
    args = parser.parse_args(argv)
    results = {}
    for name in args.only or SCRIPTS:
        print(f"\n===== bench/{name}.py: {SCRIPTS[name]}", flush=True)
        results[name] = run(name, args.quick)
    print(f"\n===== summary, {datetime.date.today()}, {machine()}{' (--quick)' if args.quick else ''}")
    for name, (code, lines, seconds) in results.items():
        print(f"bench/{name}.py ({seconds:.0f} s){'' if code == 0 else f': FAILED with exit code {code}'}")
        for line in lines:
            print(f"  {line}")
    return int(any(code for code, _, _ in results.values()))


if __name__ == "__main__":
    sys.exit(main())
