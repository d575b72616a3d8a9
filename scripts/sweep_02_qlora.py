"""The QLoRA fine-tunes behind lesson 02's comparison with LoRA, written to data/results/02_qlora.json.

    python scripts/sweep_02_qlora.py                  # every configuration (about 2 minutes quiet, data/README.md)
    python scripts/sweep_02_qlora.py --only NAME ...  # re-run the named configurations, merged into the JSON

The recipe is lesson 01's sweep (scripts/sweep_01_lora.py), unchanged except that the base is quantised to NF4
first: the committed decoder-tiny base, num2words, 150 steps, batch 16, warmup 10, cosine, lr 3e-3, r = 8,
alpha = 16, seeds 0, 1, 2; greedy exact match on the 200 validation and the 200 test examples. Every nn.Linear
but the output head becomes a 4-bit `Linear4bit` (blocksize 64) computing in float32, then LoRA goes on top, so
the only difference from lesson 01's `qv_r8` and `all_r8` runs is how the frozen base is stored. Seed s sets the
adapter's initialisation (torch.manual_seed before inject) and the batch order (TrainConfig.seed); quantisation
draws no random numbers. One torch thread, as in lesson 01. The shared machinery: scripts/sweep_common.py.
"""

import time

import torch

import minilora as ml
import sweep_common as sweep
from sweep_common import ALL, QV

LR = 3e-3
# name -> (LoRA targets, double quantisation); the LoRA counterparts are lesson 01's qv_r8 and all_r8
CONFIGS = {
    "qlora_qv_r8": (QV, False),
    "qlora_qv_r8_dq": (QV, True),
    "qlora_all_r8": (ALL, False),
}


def run_one(targets, double_quant, seed, tok, rows, splits):
    torch.manual_seed(seed)
    model = ml.quantize_model(ml.load_base(sweep.BASE), double_quant=double_quant)
    ml.inject(model, ml.LoraConfig(r=8, alpha=16, target_modules=targets))
    trainable, history, scores = sweep.fine_tune(model, LR, seed, tok, rows, splits)
    return trainable, sweep.run_record(history, scores, seed=seed)


def main():
    args, old, todo = sweep.parse_args(__doc__, "02_qlora.json", CONFIGS)
    tok, rows, splits = sweep.load_data()
    start = time.perf_counter()

    def run_config(name, config):
        targets, double_quant = config
        trainable, runs = sweep.each_seed(name, lambda seed: run_one(targets, double_quant, seed, tok, rows, splits))
        return {"method": "qlora", "r": 8, "alpha": 16, "targets": targets, "blocksize": 64,
                "double_quant": double_quant, "compute_dtype": "float32", "lr": LR, "trainable": trainable,
                "runs": runs}

    results = sweep.run_configs(CONFIGS, todo, old, run_config)
    out = {**sweep.header(), "lr_rule": f"LoRA's rate from lesson 01, {LR:g}",
           "quantised": "every nn.Linear but lm_head, NF4, blocksize 64",
           "lora_counterparts": {"qlora_qv_r8": "qv_r8", "qlora_qv_r8_dq": "qv_r8", "qlora_all_r8": "all_r8"},
           "metric": sweep.METRIC, "configs": results}
    sweep.write(args.out, out, todo, start)


if __name__ == "__main__":
    main()
