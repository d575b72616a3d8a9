"""The DoRA fine-tunes behind lesson 03's comparison with LoRA, and the magnitude / direction analysis of
full fine-tuning, LoRA and DoRA, written to data/results/03_dora.json.

    python scripts/sweep_03_dora.py                  # every configuration (13 CPU-minutes; data/README.md)
    python scripts/sweep_03_dora.py --only NAME ...  # re-run (or add) the named configurations, merged into the JSON

The recipe is lesson 01's sweep (scripts/sweep_01_lora.py), unchanged: the committed decoder-tiny base, num2words,
150 steps, batch 16, warmup 10, cosine to 0.1x, alpha = 2r, seeds 0, 1, 2; greedy exact match on the 200
validation and the 200 test examples. Seed s sets the adapter's initialisation (torch.manual_seed before inject)
and the batch order (TrainConfig.seed). One torch thread, as in lesson 01.

The learning-rate rule is lesson 01's, not retuned for DoRA: every adapter trains at 3e-3 and full fine-tuning at
1e-3, and the r = 8 adapter also at 1/4 and 4x that rate. Both LoRA and DoRA also train at 4x (1.2e-2) at r = 1, 2, 4
on q_proj, v_proj and at r = 1 on all seven layers (LoRA also r = 2 there), so that the lesson can compare each
method at its better rate of the two, picked by mean validation exact match. DoRA (use_dora=True) adds one trainable
magnitude per output feature of every wrapped layer to LoRA's A and B.

Every run also records, every 10 steps, the paper's magnitude and direction change (Liu et al. 2024, section 3.2,
eq. 3-4) of each q_proj and v_proj weight against the pre-trained one: the effective weight W_t (the trained
weight for full fine-tuning, the merged W0 + s B A for LoRA, the merged m (W0 + s B A) / ||W0 + s B A|| for DoRA)
is split into one norm per output feature m_t and unit directions, and

    delta_M = mean_n |m_t[n] - m_0[n]|,     delta_D = mean_n (1 - cos(W_t[n], W_0[n])),

over the output features n (the rows of the (out, in) weight). Reading the weights does not change training.

The LoRA and full fine-tuning runs repeat lesson 01's configurations (lora_qv_r1 is its qv_r1, ..., full_lr0.001
its full_lr0.001) to record the same analysis; lora_qv_r4 and the LoRA runs at 4x the rate are new. The script
checks that each repeat reproduces the exact match that data/results/01_lora.json stores, so the lesson can use
lesson 01's numbers for them.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

import minilora as ml
from minilora.tasks import data_dir

TASK, STEPS, SEEDS = "num2words", 150, (0, 1, 2)
LR_ADAPTER, LR_FULL = 3e-3, 1e-3
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANALYSED = ("q_proj", "v_proj")  # the paper's Fig. 2 (query) and Fig. 7 (value)
EVERY = 10  # steps between two records of delta_M and delta_D


def configs():
    """name -> (method, rank, targets, learning rate, lesson 01's name for the same run or None)."""
    out = {}
    for r in (1, 2, 4, 8):
        out[f"dora_qv_r{r}"] = ("dora", r, QV, LR_ADAPTER, None)
    out["dora_all_r1"] = ("dora", 1, ALL, LR_ADAPTER, None)
    for lr in (LR_ADAPTER / 4, LR_ADAPTER * 4):
        out[f"dora_qv_r8_lr{lr:g}"] = ("dora", 8, QV, lr, None)
    for r in (1, 2, 4, 8):
        out[f"lora_qv_r{r}"] = ("lora", r, QV, LR_ADAPTER, None if r == 4 else f"qv_r{r}")
    # 4x the rate below r = 8 too, for both methods (r = 8 at 4x: dora_qv_r8_lr0.012 above, and LoRA's is lesson 01's
    # qv_r8_lr0.012), and for the all-seven-layer comparison (DoRA r = 1 against LoRA r = 1 and 2)
    for r in (1, 2, 4):
        for method in ("lora", "dora"):
            out[f"{method}_qv_r{r}_lr{LR_ADAPTER * 4:g}"] = (method, r, QV, LR_ADAPTER * 4, None)
    for method, r in (("dora", 1), ("lora", 1), ("lora", 2)):
        out[f"{method}_all_r{r}_lr{LR_ADAPTER * 4:g}"] = (method, r, ALL, LR_ADAPTER * 4, None)
    out["full_lr0.001"] = ("full", None, None, LR_FULL, "full_lr0.001")
    return out


def build(method, r, targets, seed):
    torch.manual_seed(seed)
    model = ml.load_base("decoder-tiny")
    if method != "full":
        dora = {"use_dora": True} if method == "dora" else {}
        ml.inject(model, ml.LoraConfig(r=r, alpha=2 * r, target_modules=targets, **dora))
    return model


def effective_weight(module) -> torch.Tensor:
    """The (out, in) weight the layer computes with: merged for an adapter layer, the weight itself otherwise."""
    if isinstance(module, ml.LoraLayer):
        return module.merged_weights("default")[0].detach()
    return module.weight.detach()


def analysed_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in ANALYSED and isinstance(m, (torch.nn.Linear, ml.LoraLayer))}


def magnitude_direction_change(W: torch.Tensor, W0: torch.Tensor) -> tuple[float, float]:
    """The paper's eq. 3-4 with one magnitude per output feature (row of the (out, in) weight)."""
    delta_m = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    delta_d = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return delta_m.item(), delta_d.item()


class Recorder:
    """delta_M and delta_D of the analysed layers every EVERY steps: a forward pre-hook sees the weights of step k
    before the k-th training forward (k optimizer steps done); the final weights are read after training."""

    def __init__(self, model):
        self.model, self.layers = model, analysed_layers(model)
        self.W0 = {name: effective_weight(m).clone() for name, m in self.layers.items()}
        self.calls, self.steps, self.records = 0, [], {name: [] for name in self.layers}
        self.handle = model.register_forward_pre_hook(self.pre_forward)

    @torch.no_grad()
    def record(self, step):
        self.steps.append(step)
        for name, m in self.layers.items():
            self.records[name].append(magnitude_direction_change(effective_weight(m), self.W0[name]))

    def pre_forward(self, module, args):
        if module.training:
            if self.calls and self.calls % EVERY == 0:
                self.record(self.calls)
            self.calls += 1

    def finish(self):
        self.handle.remove()
        self.record(self.calls)
        by_type = {}
        for t in ANALYSED:
            names = [n for n in self.layers if n.endswith("." + t)]  # in layer order
            by_type[t] = {"layers": names,
                          "delta_M": [[round(self.records[n][k][0], 6) for n in names] for k in range(len(self.steps))],
                          "delta_D": [[round(self.records[n][k][1], 7) for n in names] for k in range(len(self.steps))]}
        return {"steps": self.steps, **by_type}


def run_one(method, r, targets, lr, seed, tok, rows, splits):
    model = build(method, r, targets, seed)
    trainable = ml.trainable_report(model, verbose=False).trainable
    recorder = Recorder(model)
    history = ml.train(model, rows, ml.TrainConfig(steps=STEPS, batch_size=16, lr=lr, warmup_steps=10, seed=seed,
                                                   progress=False), pad_id=tok.pad_id)
    decomposition = recorder.finish()
    scores = {name: ml.exact_match(model, tok, examples) for name, examples in splits.items()}
    return trainable, history, scores, decomposition


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(data_dir() / "results" / "03_dora.json"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="re-run these configurations, keep the others")
    args = parser.parse_args()
    table = configs()
    if args.only and set(args.only) - set(table):
        parser.error(f"unknown configurations {sorted(set(args.only) - set(table))}; known: {', '.join(table)}")
    old = json.loads(Path(args.out).read_text())["configs"] if args.only and Path(args.out).exists() else {}
    todo = set(args.only or table)
    sweep01 = json.loads((data_dir() / "results" / "01_lora.json").read_text())["configs"]
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    tok = ml.load_tokenizer()
    rows = ml.encode_examples(ml.load_task(TASK, "train"), tok)
    splits = {split: list(ml.load_task(TASK, split)) for split in ("validation", "test")}
    results, start = {}, time.perf_counter()
    for name, (method, r, targets, lr, in_01) in table.items():
        if name not in todo:
            if name in old:
                results[name] = old[name]
            continue
        runs = []
        for seed in SEEDS:
            t = time.perf_counter()
            trainable, history, scores, decomposition = run_one(method, r, targets, lr, seed, tok, rows, splits)
            runs.append({"seed": seed, "validation_em": scores["validation"], "test_em": scores["test"],
                         "loss_steps": history.steps, "loss": [round(v, 5) for v in history.loss],
                         "decomposition": decomposition})
            same = ""
            if in_01 is not None:
                stored = sweep01[in_01]["runs"][seed]
                same = "  = 01_lora.json" if (stored["test_em"], stored["validation_em"]) == (scores["test"], scores["validation"]) \
                    else f"  DIFFERS from 01_lora.json (test {stored['test_em']:.3f})"
            print(f"{name:20s} seed {seed}  val {scores['validation']:.3f}  test {scores['test']:.3f}  "
                  f"loss {history.final_loss:.4f}  {time.perf_counter() - t:.1f} s{same}", flush=True)
        entry = {"method": method, "lr": lr, "trainable": trainable, "runs": runs}
        if method != "full":
            entry = {"method": method, "r": r, "alpha": 2 * r, "targets": targets, **entry}
        if in_01 is not None:
            entry["lesson01_config"] = in_01
            entry["reproduces_lesson01"] = all(
                (run["test_em"], run["validation_em"]) == (s["test_em"], s["validation_em"])
                for run, s in zip(runs, sweep01[in_01]["runs"]))
        results[name] = entry
    out = {
        "task": TASK, "base": "decoder-tiny", "steps": STEPS, "batch_size": 16, "warmup_steps": 10,
        "schedule": "linear warmup, cosine to 0.1x", "seeds": list(SEEDS), "torch_threads": 1,
        "torch": torch.__version__,
        "lr_rule": (f"lesson 01's: adapters {LR_ADAPTER:g}, full fine-tuning {LR_FULL:g}; r = 8 also at 1/4 and 4x; "
                    "LoRA and DoRA on q_proj, v_proj at r = 1, 2, 4 and on all seven layers at r = 1 (LoRA also r = 2) "
                    "also at 4x"),
        "metric": "greedy exact match on 200 examples per split",
        "decomposition": (f"every {EVERY} steps, for each q_proj and v_proj: delta_M = mean |m_t - m_0| and "
                          "delta_D = mean (1 - cos(W_t[n], W_0[n])) over output features n (Liu et al. 2024, eq. 3-4)"),
        "configs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(results)} configurations ({len(todo)} run now) x {len(SEEDS)} seeds "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
