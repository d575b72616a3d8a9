"""What every lesson sweep shares: the recipe, the command line, the seeds and learning-rate loops, the JSON file.

    import sweep_common as sweep   # from a script in scripts/, which Python puts first on sys.path

The recipe (lesson 01's, data/README.md): the committed decoder-tiny base, num2words, 150 steps, batch 16, warmup
10, cosine to 0.1x; greedy exact match on the 200 validation and the 200 test examples; seeds 0, 1, 2, and one
torch thread, so that results are the same on every run of a machine. A sweep script keeps what is its own (its
configurations, how it builds and measures a model, what it stores beyond the scores) and writes the rest as

    args, old, todo = sweep.parse_args(__doc__, "05_ia3.json", CONFIGS)
    tok, rows, splits = sweep.load_data()
    start = time.perf_counter()
    results = sweep.run_configs(CONFIGS, todo, old, run_config)   # run_config(name, spec) -> the config's entry
    sweep.write(args.out, {**sweep.header(), "lr_rule": ..., "metric": sweep.METRIC, "configs": results}, todo, start)

where run_config uses each_seed (one fixed rate) or grid_then_seeds (lesson 05's rule: the rate of a grid with
the best seed-0 validation exact match; grid_entry also makes the configuration's entry), both around a
run(...) -> (trainable, record) the script writes with fine_tune and run_record. Each run depends only on its
configuration, rate and seed, so a configuration re-run alone (--only) gives the numbers of a full sweep.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import torch

import minilora as ml
from minilora.tasks import data_dir

TASK, BASE, STEPS, SEEDS = "num2words", "decoder-tiny", 150, (0, 1, 2)
BATCH_SIZE, WARMUP_STEPS = 16, 10
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRIC = "greedy exact match on 200 examples per split"
GRID_LR_RULE = ("seed 0 at every rate of lr_grid; keep the rate with the highest validation exact match (ties: the "
                "smaller rate); seeds 1 and 2 at that rate")


def parse_args(doc, out_name, names, missing=False):
    """--out (default data/results/<out_name>) and --only NAME ... (with missing=True also --missing). Returns the
    arguments, the JSON already at --out when it is to be merged into ({} otherwise), and the set of names to run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=str(data_dir() / "results" / out_name))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", nargs="+", metavar="NAME", help="re-run these configurations, keep the others")
    if missing:
        which.add_argument("--missing", action="store_true", help="run only configurations not yet in --out")
    args = parser.parse_args()
    names = list(names)
    if args.only and set(args.only) - set(names):
        parser.error(f"unknown configurations {sorted(set(args.only) - set(names))}; known: {', '.join(names)}")
    merge = args.only or getattr(args, "missing", False)
    old = json.loads(Path(args.out).read_text()) if merge and Path(args.out).exists() else {}
    todo = set(args.only) if args.only else {n for n in names if n not in old.get("configs", {})}
    return args, old, todo


def load_data():
    """One torch thread, no progress bars; the tokenizer, the encoded training rows and the two scored splits."""
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    tok = ml.load_tokenizer()
    rows = ml.encode_examples(ml.load_task(TASK, "train"), tok)
    splits = {split: list(ml.load_task(TASK, split)) for split in ("validation", "test")}
    return tok, rows, splits


def train_config(lr, seed):
    return ml.TrainConfig(steps=STEPS, batch_size=BATCH_SIZE, lr=lr, warmup_steps=WARMUP_STEPS, seed=seed,
                          progress=False)


def fine_tune(model, lr, seed, tok, rows, splits, **hooks):
    """Train a built model with the recipe (hooks go to ml.train: extra_loss, on_step) and score it. Returns the
    trainable parameters (counted before training), the loss history and the exact match of each split."""
    trainable = ml.trainable_report(model, verbose=False).trainable
    history = ml.train(model, rows, train_config(lr, seed), pad_id=tok.pad_id, **hooks)
    scores = {name: ml.exact_match(model, tok, examples) for name, examples in splits.items()}
    return trainable, history, scores


def run_record(history, scores, **first):
    """One run as the JSON stores it: the given keys (seed, lr) first, then the scores and the loss curve."""
    return {**first, "validation_em": scores["validation"], "test_em": scores["test"],
            "loss_steps": history.steps, "loss": [round(v, 5) for v in history.loss]}


def log(name, record, seconds, note=""):
    rate = f"lr {record['lr']:<6g} " if "lr" in record else ""
    print(f"{name:22s} {rate}seed {record['seed']}  val {record['validation_em']:.3f}  test {record['test_em']:.3f}  "
          f"loss {record['loss'][-1]:.4f}  {seconds:.1f} s{note}", flush=True)


def each_seed(name, run, note=None):
    """run(seed) -> (trainable, record) at every seed of SEEDS; note(seed, record) adds to the printed line.
    Returns the trainable parameters and the records."""
    runs = []
    for seed in SEEDS:
        t = time.perf_counter()
        trainable, record = run(seed)
        runs.append(record)
        log(name, record, time.perf_counter() - t, note(seed, record) if note else "")
    return trainable, runs


def choose_lr(grid_runs):
    """The rule: the highest seed-0 validation exact match, ties to the smaller rate."""
    return min(grid_runs, key=lambda run: (-run["validation_em"], run["lr"]))["lr"]


def grid_then_seeds(name, run, lr_grid, edge_rates=(), done=None):
    """GRID_LR_RULE: run(lr, seed) -> (trainable, record with "lr") with seed 0 at every rate of lr_grid, then the
    other seeds at the chosen rate. Returns the trainable parameters, the rate, the grid's records (by rate) and the
    runs. edge_rates (larger than the grid's) are tried in order, seed 0 again, for as long as the largest rate run
    so far is the best. done, a stored entry of grid_entry's, lends the runs it already has: only missing rates run,
    and seeds 1, 2 only where the chosen rate changed."""
    done = done or {}
    grid, trainable = {record["lr"]: record for record in done.get("grid", [])}, done.get("trainable")

    def seed0(lr):
        nonlocal trainable
        t = time.perf_counter()
        trainable, grid[lr] = run(lr, SEEDS[0])
        log(name, grid[lr], time.perf_counter() - t)

    for lr in lr_grid:
        if lr not in grid:
            seed0(lr)
    for edge in edge_rates:
        if choose_lr(list(grid.values())) != max(grid):
            break
        if edge not in grid:
            seed0(edge)
    lr = choose_lr(list(grid.values()))
    if done.get("lr") == lr:
        runs = done["runs"]
    else:
        runs = [grid[lr]]  # seed 0 at the chosen rate is already done
        for seed in SEEDS[1:]:
            t = time.perf_counter()
            runs.append(run(lr, seed)[1])
            log(name, runs[-1], time.perf_counter() - t)
    return trainable, lr, [grid[r] for r in sorted(grid)], runs


def grid_entry(name, spec, run, lr_grid, edge_rates=(), done=None):
    """A configuration's entry under GRID_LR_RULE (grid_then_seeds): the keys of its spec, then the trainable
    parameters, the chosen rate, the grid's records and the runs at that rate."""
    trainable, lr, grid, runs = grid_then_seeds(name, run, lr_grid, edge_rates, done)
    return {**spec, "trainable": trainable, "lr": lr, "grid": grid, "runs": runs}


def run_configs(table, todo, old, run_config):
    """name -> entry, in the table's order: run_config(name, spec) for the names in todo, the old file's entry
    (where it has one) for the others."""
    done, results = old.get("configs", {}), {}
    for name, spec in table.items():
        if name in todo:
            results[name] = run_config(name, spec)
        elif name in done:
            results[name] = done[name]
    return results


def header():
    """The recipe, as the first keys of every results file."""
    return {"task": TASK, "base": BASE, "steps": STEPS, "batch_size": BATCH_SIZE, "warmup_steps": WARMUP_STEPS,
            "schedule": "linear warmup, cosine to 0.1x", "seeds": list(SEEDS), "torch_threads": 1,
            "torch": torch.__version__}


def write(path, out, todo, start):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: {len(out['configs'])} configurations ({len(todo)} run now) in "
          f"{time.perf_counter() - start:.0f} s")
