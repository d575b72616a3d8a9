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
choice matters. What every sweep shares (the recipe, the command line, the seeds loop, the JSON file) is in
scripts/sweep_common.py.
"""

import time

import torch

import minilora as ml
import sweep_common as sweep
from sweep_common import ALL, QV

LR_LORA, LR_FULL = 3e-3, 1e-3


def configs():
    """name -> (LoRA settings or None for full fine-tuning, learning rate), grouped by the question each answers."""
    out = {}
    for r in (1, 2, 8, 64):  # rank at alpha = 2r, the paper's targets
        out[f"qv_r{r}"] = (dict(r=r, alpha=2 * r, targets=QV), LR_LORA)
    for r in (1, 2, 8):  # every linear layer: more parameters per rank
        out[f"all_r{r}"] = (dict(r=r, alpha=2 * r, targets=ALL), LR_LORA)
    for alpha in (4, 64):  # alpha at fixed r = 8 ...
        out[f"qv_r8_alpha{alpha}"] = (dict(r=8, alpha=alpha, targets=QV), LR_LORA)
    for lr in (LR_LORA / 4, LR_LORA * 4):  # ... next to the learning rate at fixed alpha
        out[f"qv_r8_lr{lr:g}"] = (dict(r=8, alpha=16, targets=QV), lr)
    for r in (1, 2, 64):  # rank at fixed alpha = 16, the paper's protocol: alpha/r shrinks as r grows (r = 8 is qv_r8) ...
        out[f"qv_r{r}_alpha16"] = (dict(r=r, alpha=16, targets=QV), LR_LORA)
    for r in (1, 2):  # ... and on every linear layer (r = 8 is all_r8)
        out[f"all_r{r}_alpha16"] = (dict(r=r, alpha=16, targets=ALL), LR_LORA)
    for r in (2, 8, 64):  # ... unless it is alpha/sqrt(r) (rsLoRA)
        out[f"qv_r{r}_alpha16_rslora"] = (dict(r=r, alpha=16, targets=QV, use_rslora=True), LR_LORA)
    for lr in (LR_FULL / 4, LR_FULL, LR_FULL * 4):
        out[f"full_lr{lr:g}"] = (None, lr)
    return out


def run_one(lora, lr, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.load_base(sweep.BASE)
    if lora is not None:
        cfg = ml.LoraConfig(r=lora["r"], alpha=lora["alpha"], target_modules=lora["targets"],
                            use_rslora=lora.get("use_rslora", False))
        ml.inject(model, cfg)
    a_init = [m.lora_A["default"].weight.detach().clone() for m in model.modules() if isinstance(m, ml.LoraLayer)]
    trainable, history, scores = sweep.fine_tune(model, lr, seed, tok, rows, splits)
    record = sweep.run_record(history, scores, seed=seed)
    a_final = [m.lora_A["default"].weight.detach() for m in model.modules() if isinstance(m, ml.LoraLayer)]
    # how far each adapter's A moved from its initialisation, |A - A_init| / |A_init|, over all LoRA layers
    moved = [((a - a0).norm() / a0.norm()).item() for a, a0 in zip(a_final, a_init)]
    if moved:
        record["A_moved"] = {"mean": round(sum(moved) / len(moved), 4), "min": round(min(moved), 4),
                             "max": round(max(moved), 4)}
    return trainable, record


def main():
    table = configs()
    args, old, todo = sweep.parse_args(__doc__, "01_lora.json", table, missing=True)
    tok, rows, splits = sweep.load_data()
    start = time.perf_counter()

    def run_config(name, config):
        lora, lr = config
        trainable, runs = sweep.each_seed(name, lambda seed: run_one(lora, lr, seed, tok, rows, splits))
        return {"method": "full" if lora is None else "lora", **(lora or {}), "lr": lr, "trainable": trainable,
                "runs": runs}

    results = sweep.run_configs(table, todo, old, run_config)
    out = {**sweep.header(), "lr_rule": f"LoRA {LR_LORA:g}, full fine-tuning {LR_FULL:g}; each also at 1/4 and 4x",
           "metric": sweep.METRIC, "configs": results}
    sweep.write(args.out, out, todo, start)


if __name__ == "__main__":
    main()
