"""The IA³ and LoRA fine-tunes behind lesson 05's comparison, written to data/results/05_ia3.json.

    python scripts/sweep_05_ia3.py                  # every configuration (369 s measured under load, data/README.md)
    python scripts/sweep_05_ia3.py --only NAME ...  # re-run the named configurations, merged into the JSON

The recipe is lesson 01's sweep (scripts/sweep_01_lora.py) with the learning rate tuned per configuration: the
committed decoder-tiny base, num2words, 150 steps, batch 16, warmup 10, cosine to 0.1x, no weight decay; greedy
exact match on the 200 validation and the 200 test examples. One rule picks every configuration's learning rate:
each is trained with seed 0 at every rate of one grid (LR_GRID), and the rate with the highest seed-0 validation
exact match is kept (a tie goes to the smaller rate); seeds 1 and 2 then run at that rate, so each configuration
ends with three seeds at its chosen rate. The test split plays no part in the choice. Seed s sets the adapter's
initialisation (torch.manual_seed before the base is loaded; IA³'s vectors start at ones and draw nothing) and
the batch order (TrainConfig.seed). One torch thread, as in lessons 01 and 02.

Configurations: IA³ on peft's default Llama targets (k_proj, v_proj, down_proj, with down_proj feed-forward) and
on all seven linear layers (down_proj still the only feed-forward one); LoRA at r = 1 and r = 8 on q_proj, v_proj
and at r = 1 on all seven, alpha = 2r as in lesson 01, so that the methods spread over trainable parameters.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import torch

import minilora as ml
from minilora.tasks import data_dir

TASK, STEPS, SEEDS = "num2words", 150, (0, 1, 2)
LR_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
KVD = ["k_proj", "v_proj", "down_proj"]  # peft's IA3 defaults for Llama
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FEEDFORWARD = ["down_proj"]  # its input is the feed-forward block's inner activation, act(gate x) * (up x)
CONFIGS = {  # name -> the adapter's settings, as stored in the JSON
    "ia3": {"method": "ia3", "targets": KVD, "feedforward": FEEDFORWARD},
    "ia3_all": {"method": "ia3", "targets": ALL, "feedforward": FEEDFORWARD},
    "lora_qv_r1": {"method": "lora", "targets": QV, "r": 1, "alpha": 2},
    "lora_qv_r8": {"method": "lora", "targets": QV, "r": 8, "alpha": 16},
    "lora_all_r1": {"method": "lora", "targets": ALL, "r": 1, "alpha": 2},
}
LR_RULE = ("seed 0 at every rate of lr_grid; keep the rate with the highest validation exact match (ties: the "
           "smaller rate); seeds 1 and 2 at that rate")


def adapter_config(spec):
    if spec["method"] == "ia3":
        return ml.IA3Config(target_modules=spec["targets"], feedforward_modules=spec["feedforward"])
    return ml.LoraConfig(r=spec["r"], alpha=spec["alpha"], target_modules=spec["targets"])


def run_one(spec, lr, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.inject(ml.load_base("decoder-tiny"), adapter_config(spec))
    trainable = ml.trainable_report(model, verbose=False).trainable
    history = ml.train(model, rows, ml.TrainConfig(steps=STEPS, batch_size=16, lr=lr, warmup_steps=10, seed=seed,
                                                   progress=False), pad_id=tok.pad_id)
    scores = {name: ml.exact_match(model, tok, examples) for name, examples in splits.items()}
    return trainable, {"seed": seed, "lr": lr, "validation_em": scores["validation"], "test_em": scores["test"],
                       "loss_steps": history.steps, "loss": [round(v, 5) for v in history.loss]}


def choose_lr(grid_runs):
    """The rule: the highest seed-0 validation exact match, ties to the smaller rate."""
    return min(grid_runs, key=lambda run: (-run["validation_em"], run["lr"]))["lr"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(data_dir() / "results" / "05_ia3.json"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="re-run these configurations, keep the others")
    args = parser.parse_args()
    if args.only and set(args.only) - set(CONFIGS):
        parser.error(f"unknown configurations {sorted(set(args.only) - set(CONFIGS))}; known: {', '.join(CONFIGS)}")
    old = json.loads(Path(args.out).read_text())["configs"] if args.only and Path(args.out).exists() else {}
    todo = set(args.only or CONFIGS)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    tok = ml.load_tokenizer()
    rows = ml.encode_examples(ml.load_task(TASK, "train"), tok)
    splits = {split: list(ml.load_task(TASK, split)) for split in ("validation", "test")}
    results, start = {}, time.perf_counter()
    for name, spec in CONFIGS.items():
        if name not in todo:
            if name in old:
                results[name] = old[name]
            continue
        grid = []
        for lr in LR_GRID:
            t = time.perf_counter()
            trainable, run = run_one(spec, lr, 0, tok, rows, splits)
            grid.append(run)
            print(f"{name:12s} lr {lr:<6g} seed 0  val {run['validation_em']:.3f}  test {run['test_em']:.3f}  "
                  f"loss {run['loss'][-1]:.4f}  {time.perf_counter() - t:.1f} s", flush=True)
        lr = choose_lr(grid)
        runs = [next(run for run in grid if run["lr"] == lr)]  # seed 0 at the chosen rate is already done
        for seed in SEEDS[1:]:
            t = time.perf_counter()
            runs.append(run_one(spec, lr, seed, tok, rows, splits)[1])
            print(f"{name:12s} lr {lr:<6g} seed {seed}  val {runs[-1]['validation_em']:.3f}  test "
                  f"{runs[-1]['test_em']:.3f}  loss {runs[-1]['loss'][-1]:.4f}  {time.perf_counter() - t:.1f} s",
                  flush=True)
        results[name] = {**spec, "trainable": trainable, "lr": lr, "grid": grid, "runs": runs}
    out = {
        "task": TASK, "base": "decoder-tiny", "steps": STEPS, "batch_size": 16, "warmup_steps": 10,
        "schedule": "linear warmup, cosine to 0.1x", "seeds": list(SEEDS), "torch_threads": 1,
        "torch": torch.__version__, "lr_grid": list(LR_GRID), "lr_rule": LR_RULE,
        "metric": "greedy exact match on 200 examples per split",
        "configs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(results)} configurations ({len(todo)} run now) in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
