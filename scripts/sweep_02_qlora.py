"""The QLoRA fine-tunes behind lesson 02's comparison with LoRA, written to data/results/02_qlora.json.

    python scripts/sweep_02_qlora.py                  # every configuration (about 2 minutes quiet, data/README.md)
    python scripts/sweep_02_qlora.py --only NAME ...  # re-run the named configurations, merged into the JSON

The recipe is lesson 01's sweep (scripts/sweep_01_lora.py), unchanged except that the base is quantised to NF4
first: the committed decoder-tiny base, num2words, 150 steps, batch 16, warmup 10, cosine, lr 3e-3, r = 8,
alpha = 16, seeds 0, 1, 2; greedy exact match on the 200 validation and the 200 test examples. Every nn.Linear
but the output head becomes a 4-bit `Linear4bit` (blocksize 64) computing in float32, then LoRA goes on top, so
the only difference from lesson 01's `qv_r8` and `all_r8` runs is how the frozen base is stored. Seed s sets the
adapter's initialisation (torch.manual_seed before inject) and the batch order (TrainConfig.seed); quantisation
draws no random numbers. One torch thread, as in lesson 01.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import torch

import minilora as ml
from minilora.tasks import data_dir

TASK, STEPS, SEEDS, LR = "num2words", 150, (0, 1, 2), 3e-3
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoRA targets, double quantisation); the LoRA counterparts are lesson 01's qv_r8 and all_r8
CONFIGS = {
    "qlora_qv_r8": (QV, False),
    "qlora_qv_r8_dq": (QV, True),
    "qlora_all_r8": (ALL, False),
}


def run_one(targets, double_quant, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.quantize_model(ml.load_base("decoder-tiny"), double_quant=double_quant)
    ml.inject(model, ml.LoraConfig(r=8, alpha=16, target_modules=targets))
    trainable = ml.trainable_report(model, verbose=False).trainable
    history = ml.train(model, rows, ml.TrainConfig(steps=STEPS, batch_size=16, lr=LR, warmup_steps=10, seed=seed,
                                                   progress=False), pad_id=tok.pad_id)
    scores = {name: ml.exact_match(model, tok, examples) for name, examples in splits.items()}
    return trainable, history, scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(data_dir() / "results" / "02_qlora.json"))
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
    for name, (targets, double_quant) in CONFIGS.items():
        if name not in todo:
            if name in old:
                results[name] = old[name]
            continue
        runs = []
        for seed in SEEDS:
            t = time.perf_counter()
            trainable, history, scores = run_one(targets, double_quant, seed, tok, rows, splits)
            runs.append({"seed": seed, "validation_em": scores["validation"], "test_em": scores["test"],
                         "loss_steps": history.steps, "loss": [round(v, 5) for v in history.loss]})
            print(f"{name:16s} seed {seed}  val {scores['validation']:.3f}  test {scores['test']:.3f}  "
                  f"loss {history.final_loss:.4f}  {time.perf_counter() - t:.1f} s", flush=True)
        results[name] = {"method": "qlora", "r": 8, "alpha": 16, "targets": targets, "blocksize": 64,
                         "double_quant": double_quant, "compute_dtype": "float32", "lr": LR,
                         "trainable": trainable, "runs": runs}
    out = {
        "task": TASK, "base": "decoder-tiny", "steps": STEPS, "batch_size": 16, "warmup_steps": 10,
        "schedule": "linear warmup, cosine to 0.1x", "seeds": list(SEEDS), "torch_threads": 1,
        "torch": torch.__version__, "lr_rule": f"LoRA's rate from lesson 01, {LR:g}",
        "quantised": "every nn.Linear but lm_head, NF4, blocksize 64",
        "lora_counterparts": {"qlora_qv_r8": "qv_r8", "qlora_qv_r8_dq": "qv_r8", "qlora_all_r8": "all_r8"},
        "metric": "greedy exact match on 200 examples per split",
        "configs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(results)} configurations ({len(todo)} run now) x {len(SEEDS)} seeds "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
