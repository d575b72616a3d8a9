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
the batch order (TrainConfig.seed). One torch thread, as in lessons 01 and 02. The rule and the rest of the
shared machinery are in scripts/sweep_common.py (grid_entry).

Configurations: IA³ on peft's default Llama targets (k_proj, v_proj, down_proj, with down_proj feed-forward) and
on all seven linear layers (down_proj still the only feed-forward one); LoRA at r = 1 and r = 8 on q_proj, v_proj
and at r = 1 on all seven, alpha = 2r as in lesson 01, so that the methods spread over trainable parameters.
"""

import time

import torch

import minilora as ml
import sweep_common as sweep
from sweep_common import ALL, QV

LR_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
KVD = ["k_proj", "v_proj", "down_proj"]  # peft's IA3 defaults for Llama
FEEDFORWARD = ["down_proj"]  # its input is the feed-forward block's inner activation, act(gate x) * (up x)
CONFIGS = {  # name -> the adapter's settings, as stored in the JSON
    "ia3": {"method": "ia3", "targets": KVD, "feedforward": FEEDFORWARD},
    "ia3_all": {"method": "ia3", "targets": ALL, "feedforward": FEEDFORWARD},
    "lora_qv_r1": {"method": "lora", "targets": QV, "r": 1, "alpha": 2},
    "lora_qv_r8": {"method": "lora", "targets": QV, "r": 8, "alpha": 16},
    "lora_all_r1": {"method": "lora", "targets": ALL, "r": 1, "alpha": 2},
}


def adapter_config(spec):
    if spec["method"] == "ia3":
        return ml.IA3Config(target_modules=spec["targets"], feedforward_modules=spec["feedforward"])
    return ml.LoraConfig(r=spec["r"], alpha=spec["alpha"], target_modules=spec["targets"])


def run_one(spec, lr, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.inject(ml.load_base(sweep.BASE), adapter_config(spec))
    trainable, history, scores = sweep.fine_tune(model, lr, seed, tok, rows, splits)
    return trainable, sweep.run_record(history, scores, seed=seed, lr=lr)


def main():
    args, old, todo = sweep.parse_args(__doc__, "05_ia3.json", CONFIGS)
    tok, rows, splits = sweep.load_data()
    start = time.perf_counter()

    def run_config(name, spec):
        return sweep.grid_entry(name, spec, lambda lr, seed: run_one(spec, lr, seed, tok, rows, splits), LR_GRID)

    results = sweep.run_configs(CONFIGS, todo, old, run_config)
    out = {**sweep.header(), "lr_grid": list(LR_GRID), "lr_rule": sweep.GRID_LR_RULE, "metric": sweep.METRIC,
           "configs": results}
    sweep.write(args.out, out, todo, start)


if __name__ == "__main__":
    main()
