"""The encoder-decoder fine-tunes behind lesson 06 (hypernetwork adapters), written to data/results/06_hyper.json.

    python scripts/sweep_06_hyper.py                        # every configuration, one after the other
    python scripts/sweep_06_hyper.py --only translate/lora_r4 ...   # re-run the named ones, merged into the JSON
    python scripts/sweep_06_hyper.py --only $(python scripts/sweep_06_hyper.py --names dates) --out /tmp/d.json
    python scripts/sweep_06_hyper.py --merge /tmp/a.json /tmp/d.json ...   # parts run side by side, into --out
    python scripts/sweep_06_hyper.py --extend NAME ... [--source FILE] --out /tmp/part.json
        # the rates of LR_GRID that a stored entry lacks (and EDGE_RATES while the top rate wins); --source defaults
        # to data/results/06_hyper.json

The recipe is data/README.md's for the encoder-decoder: the committed seq2seq-tiny base, 600 steps, batch 16,
warmup 10, cosine to 0.1x, no weight decay; greedy exact match on the 200 validation and the 200 test examples of
each task. Every configuration's learning rate comes from one rule (scripts/sweep_common.py, GRID_LR_RULE): seed 0
at each rate of LR_GRID, keep the rate with the best seed-0 validation exact match, then seeds 1 and 2 there.
The grid was {1e-3, 3e-3} first; the larger rate won 16 of 18 times, so 1e-2 was added with --extend, which runs
seed 0 at the new rate only (and at 3e-2 where 1e-2 is then the best), applies the rule again and runs seeds 1 and
2 where the chosen rate changes.
Seed s sets the adapters' initialisation (torch.manual_seed before they are built) and the batch order.
One torch thread.

Single-task configurations, on each of num2words, dates and translate:
- lora_r4: LoRA r = 4, alpha = 8 on every linear layer of encoder and decoder (73,728 parameters);
- lora_r4_align: the same LoRA plus the alignment adapter (8 generated decoder inputs, hidden 32: 37,932 more);
- lora_r6: LoRA r = 6 (110,592), the rank whose parameters match lora_r4_align's 111,660 most closely;
- each again with modules_to_save = ["relative_attention_bias"] ("_bias"): a trainable copy of the two 32 x 4
  relative position bias tables (256 weights), which data/README.md found LoRA needs on this base.
Multi-task: hyperformer trains one TaskHyperAdapter (Hyperformer++: the hypernetwork, task embeddings and the
base's layer norms) on the three training sets at once, for 3 x 600 steps (as many examples as the three
single-task adapters see together); each task is scored with its own task embedding. One LoRA per task is lora_r4.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import torch

import minilora as ml
import sweep_common as sweep
from minilora.tasks import SEQ2SEQ_TASKS, data_dir

BASE, STEPS, LR_GRID = "seq2seq-tiny", 600, (1e-3, 3e-3, 1e-2)
EDGE_RATES = (3e-2,)  # tried, in order, while the largest rate run so far is the best (time allowed one more)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BIAS_TABLES = ["relative_attention_bias"]
ALIGN = {"num_prefix": 8, "hidden": 32}
SINGLE = {
    "lora_r4": {"r": 4, "align": False, "bias_tables": False},
    "lora_r4_align": {"r": 4, "align": True, "bias_tables": False},
    "lora_r6": {"r": 6, "align": False, "bias_tables": False},
    "lora_r4_bias": {"r": 4, "align": False, "bias_tables": True},
    "lora_r4_align_bias": {"r": 4, "align": True, "bias_tables": True},
    "lora_r6_bias": {"r": 6, "align": False, "bias_tables": True},
}
CONFIGS = {f"{task}/{name}": {"task": task, **spec} for task in SEQ2SEQ_TASKS for name, spec in SINGLE.items()}
CONFIGS["all/hyperformer"] = {"task": "all", "method": "TaskHyperAdapter", "tasks": SEQ2SEQ_TASKS}


def build(spec, seed):
    torch.manual_seed(seed)
    model = ml.load_base(BASE)
    if spec["task"] == "all":
        ml.TaskHyperAdapter(model, ml.TaskHyperConfig(tasks=SEQ2SEQ_TASKS))
        return model
    ml.inject(model, ml.LoraConfig(r=spec["r"], alpha=2 * spec["r"], target_modules=LINEAR,
                                   modules_to_save=BIAS_TABLES if spec["bias_tables"] else None))
    if spec["align"]:
        ml.AlignmentAdapter(model, ml.AlignmentConfig(**ALIGN))
    return model


def score(model, task, tok, splits):
    if task == "all":
        out = {}
        for t in SEQ2SEQ_TASKS:
            model.task_hyper_adapter.set_task(t)
            out[t] = {s: ml.exact_match(model, tok, splits[t][s]) for s in ("validation", "test")}
        return out
    return {s: ml.exact_match(model, tok, splits[task][s]) for s in ("validation", "test")}


def run_one(spec, lr, seed, tok, rows, splits):
    model = build(spec, seed)
    trainable = ml.trainable_report(model, verbose=False).trainable
    steps = STEPS * (len(SEQ2SEQ_TASKS) if spec["task"] == "all" else 1)
    cfg = ml.TrainConfig(steps=steps, batch_size=sweep.BATCH_SIZE, lr=lr, warmup_steps=sweep.WARMUP_STEPS, seed=seed,
                         progress=False)
    history = ml.train(model, rows[spec["task"]], cfg, pad_id=tok.pad_id)
    scores = score(model, spec["task"], tok, splits)
    if spec["task"] == "all":  # the mean over tasks decides the rate; each task's numbers are kept beside it
        mean = {s: sum(v[s] for v in scores.values()) / len(scores) for s in ("validation", "test")}
        return trainable, {**sweep.run_record(history, mean, seed=seed, lr=lr), "per_task": scores}
    return trainable, sweep.run_record(history, scores, seed=seed, lr=lr)


def load_data():
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    tok = ml.load_tokenizer()
    rows, splits = {}, {}
    for i, task in enumerate(SEQ2SEQ_TASKS):
        rows[task] = ml.encode_examples(ml.load_task(task, "train"), tok, kind="seq2seq")
        splits[task] = {s: list(ml.load_task(task, s)) for s in ("validation", "test")}
    rows["all"] = [{**r, "task_ids": [i]} for i, task in enumerate(SEQ2SEQ_TASKS) for r in rows[task]]
    return tok, rows, splits


def merge(out, parts):
    """Union of the configurations of sweep files run side by side (with --only or --extend, and --out), in CONFIGS'
    order; a later file's entry replaces an earlier one's."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    configs = {k: v for d in loaded for k, v in d["configs"].items()}
    missing = [n for n in CONFIGS if n not in configs]
    if missing:
        raise SystemExit(f"the parts lack {missing}; run them first (--only ... --out ...).")
    merged = {**header(), "configs": {n: configs[n] for n in CONFIGS}}
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out}: {len(CONFIGS)} configurations from {len(parts)} parts")


LR_RULE = (sweep.GRID_LR_RULE + "; where the largest rate run so far is the best, seed 0 also runs at the next of "
           "edge_rates first")


def header():
    return {"base": BASE, "steps_per_task": STEPS, "batch_size": sweep.BATCH_SIZE, "warmup_steps": sweep.WARMUP_STEPS,
            "schedule": "linear warmup, cosine to 0.1x", "seeds": list(sweep.SEEDS), "torch_threads": 1,
            "torch": torch.__version__, "lr_grid": list(LR_GRID), "edge_rates": list(EDGE_RATES), "lr_rule": LR_RULE,
            "metric": sweep.METRIC}


def extend(names, out, source):
    """LR_RULE for entries stored in `source` (the rates they lack, and seeds where the chosen rate changes).
    Writes the extended entries (only those) to `out`, for --merge."""
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    stored = json.loads(Path(source).read_text())["configs"]
    tok, rows, splits = load_data()
    start = time.perf_counter()
    configs = {n: sweep.grid_entry(n, CONFIGS[n], lambda lr, seed, spec=CONFIGS[n]: run_one(spec, lr, seed, tok, rows,
                                                                                            splits),
                                   LR_GRID, EDGE_RATES, done=stored[n])
               for n in names}
    Path(out).write_text(json.dumps({**header(), "configs": configs}, indent=1) + "\n")
    print(f"wrote {out}: {len(configs)} configurations extended in {time.perf_counter() - start:.0f} s")


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--names", metavar="TASK")
    pre.add_argument("--merge", nargs="+")
    pre.add_argument("--extend", nargs="+", metavar="NAME")
    pre.add_argument("--source", default=str(data_dir() / "results" / "06_hyper.json"), help="what --extend extends")
    pre.add_argument("--out", default=str(data_dir() / "results" / "06_hyper.json"))
    first, rest = pre.parse_known_args()
    if first.names:
        print(" ".join(n for n in CONFIGS if n.startswith(first.names + "/")))
        return
    if first.merge:
        return merge(first.out, first.merge)
    if first.extend:
        return extend(first.extend, first.out, first.source)
    args, old, todo = sweep.parse_args(__doc__, "06_hyper.json", CONFIGS)
    tok, rows, splits = load_data()
    start = time.perf_counter()

    def run_config(name, spec):
        return sweep.grid_entry(name, spec, lambda lr, seed: run_one(spec, lr, seed, tok, rows, splits), LR_GRID,
                                EDGE_RATES)

    results = sweep.run_configs(CONFIGS, todo, old, run_config)
    sweep.write(args.out, {**header(), "configs": results}, todo, start)


if __name__ == "__main__":
    main()
