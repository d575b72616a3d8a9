"""The rank / alpha / targets / learning-rate sweep behind lesson 01's figure, written to data/results/01_lora.json.

    python scripts/sweep_01_lora.py                  # every configuration (about 13 minutes quiet, data/README.md)
    python scripts/sweep_01_lora.py --missing        # only configurations not yet in the JSON, merged into it
    python scripts/sweep_01_lora.py --only qv_r8 ... # re-run the named configurations, merged into the JSON

Every run fine-tunes the committed decoder-tiny base on num2words for 150 steps (batch 16, warmup 10, cosine),
then scores greedy exact match on the 200 validation and the 200 test examples. Seed s sets both the adapter's
initialisation (torch.manual_seed before inject) and the batch order (TrainConfig.seed). One torch thread: these
models are too small for a second thread to help, and results are then the same on every run of this machine.
Each run depends only on its configuration and seed (the base is reloaded and the seed reset before every run),
so a configuration re-run alone, or in another order, gives the numbers of a full sweep.

The learning-rate rule, the same for every configuration: LoRA runs at 3e-3 and full fine-tuning at 1e-3 (the
rates of data/README.md's learnability probe); both are also run at 1/4 and 4x that rate, to show how much the
choice matters.
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
LR_LORA, LR_FULL = 3e-3, 1e-3
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configs():
    """(name, LoRA settings or None for full fine-tuning, learning rate), grouped by the question each answers."""
    out = []
    for r in (1, 2, 8, 64):  # rank at alpha = 2r, the paper's targets
        out.append((f"qv_r{r}", dict(r=r, alpha=2 * r, targets=QV), LR_LORA))
    for r in (1, 2, 8):  # every linear layer: more parameters per rank
        out.append((f"all_r{r}", dict(r=r, alpha=2 * r, targets=ALL), LR_LORA))
    for alpha in (4, 64):  # alpha at fixed r = 8 ...
        out.append((f"qv_r8_alpha{alpha}", dict(r=8, alpha=alpha, targets=QV), LR_LORA))
    for lr in (LR_LORA / 4, LR_LORA * 4):  # ... next to the learning rate at fixed alpha
        out.append((f"qv_r8_lr{lr:g}", dict(r=8, alpha=16, targets=QV), lr))
    for r in (1, 2, 64):  # rank at fixed alpha = 16, the paper's protocol: alpha/r shrinks as r grows (r = 8 is qv_r8) ...
        out.append((f"qv_r{r}_alpha16", dict(r=r, alpha=16, targets=QV), LR_LORA))
    for r in (1, 2):  # ... and on every linear layer (r = 8 is all_r8)
        out.append((f"all_r{r}_alpha16", dict(r=r, alpha=16, targets=ALL), LR_LORA))
    for r in (2, 8, 64):  # ... unless it is alpha/sqrt(r) (rsLoRA)
        out.append((f"qv_r{r}_alpha16_rslora", dict(r=r, alpha=16, targets=QV, use_rslora=True), LR_LORA))
    for lr in (LR_FULL / 4, LR_FULL, LR_FULL * 4):
        out.append((f"full_lr{lr:g}", None, lr))
    return out


def run_one(lora, lr, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.load_base("decoder-tiny")
    if lora is not None:
        cfg = ml.LoraConfig(r=lora["r"], alpha=lora["alpha"], target_modules=lora["targets"],
                            use_rslora=lora.get("use_rslora", False))
        ml.inject(model, cfg)
    a_init = [m.lora_A["default"].weight.detach().clone() for m in model.modules() if isinstance(m, ml.LoraLayer)]
    trainable = ml.trainable_report(model, verbose=False).trainable
    history = ml.train(model, rows, ml.TrainConfig(steps=STEPS, batch_size=16, lr=lr, warmup_steps=10, seed=seed,
                                                   progress=False), pad_id=tok.pad_id)
    scores = {name: ml.exact_match(model, tok, examples) for name, examples in splits.items()}
    a_final = [m.lora_A["default"].weight.detach() for m in model.modules() if isinstance(m, ml.LoraLayer)]
    # how far each adapter's A moved from its initialisation, |A - A_init| / |A_init|, over all LoRA layers
    moved = [((a - a0).norm() / a0.norm()).item() for a, a0 in zip(a_final, a_init)]
    return trainable, history, scores, moved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(data_dir() / "results" / "01_lora.json"))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", nargs="+", metavar="NAME", help="re-run these configurations, keep the others")
    which.add_argument("--missing", action="store_true", help="run only configurations not yet in --out")
    args = parser.parse_args()
    names = [name for name, _, _ in configs()]
    if args.only and set(args.only) - set(names):
        parser.error(f"unknown configurations {sorted(set(args.only) - set(names))}; known: {', '.join(names)}")
    old = json.loads(Path(args.out).read_text())["configs"] if (args.only or args.missing) and Path(args.out).exists() else {}
    todo = set(args.only) if args.only else {n for n in names if n not in old}
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    tok = ml.load_tokenizer()
    rows = ml.encode_examples(ml.load_task(TASK, "train"), tok)
    splits = {split: list(ml.load_task(TASK, split)) for split in ("validation", "test")}
    results, start = {}, time.perf_counter()
    for name, lora, lr in configs():
        if name not in todo:
            if name in old:
                results[name] = old[name]
            continue
        runs = []
        for seed in SEEDS:
            t = time.perf_counter()
            trainable, history, scores, moved = run_one(lora, lr, seed, tok, rows, splits)
            runs.append({"seed": seed, "validation_em": scores["validation"], "test_em": scores["test"],
                         "loss_steps": history.steps, "loss": [round(v, 5) for v in history.loss]})
            if moved:
                runs[-1]["A_moved"] = {"mean": round(sum(moved) / len(moved), 4), "min": round(min(moved), 4),
                                       "max": round(max(moved), 4)}
            print(f"{name:24s} seed {seed}  val {scores['validation']:.3f}  test {scores['test']:.3f}  "
                  f"loss {history.final_loss:.4f}  {time.perf_counter() - t:.1f} s", flush=True)
        method = "full" if lora is None else "lora"
        results[name] = {"method": method, **({} if lora is None else lora), "lr": lr, "trainable": trainable,
                         "runs": runs}
    out = {
        "task": TASK, "base": "decoder-tiny", "steps": STEPS, "batch_size": 16, "warmup_steps": 10,
        "schedule": "linear warmup, cosine to 0.1x", "seeds": list(SEEDS), "torch_threads": 1,
        "torch": torch.__version__, "lr_rule": f"LoRA {LR_LORA:g}, full fine-tuning {LR_FULL:g}; each also at 1/4 and 4x",
        "metric": "greedy exact match on 200 examples per split",
        "configs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(results)} configurations ({len(todo)} run now) x {len(SEEDS)} seeds "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
