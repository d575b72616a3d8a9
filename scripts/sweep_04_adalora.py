"""The AdaLoRA and LoRA fine-tunes behind lesson 04, and their step times, written to data/results/04_adalora.json.

    python scripts/sweep_04_adalora.py                  # every configuration and the timing (data/README.md)
    python scripts/sweep_04_adalora.py --only NAME ...  # re-run the named configurations, merged into the JSON
    python scripts/sweep_04_adalora.py --only timing    # re-measure the step times alone
    python scripts/sweep_04_adalora.py --only adalora_r8_lr0.01  # the extra seeds at the runner-up rate alone

The recipe is lesson 01's (scripts/sweep_01_lora.py): the committed decoder-tiny base, num2words, 150 steps,
batch 16, warmup 10, cosine to 0.1x, no weight decay, gradient clipping at 1; greedy exact match on the 200
validation and the 200 test examples. The rule for every configuration's learning rate is this lesson's (lesson 05
uses it too): seed 0 at every
rate of LR_GRID, keep the rate with the highest seed-0 validation exact match (ties to the smaller rate), then
seeds 1 and 2 at that rate. The test split plays no part in the choice. Seed s sets the adapter's initialisation
(torch.manual_seed before the base is loaded) and the batch order (TrainConfig.seed). One torch thread. The recipe,
the rule and the command line are scripts/sweep_common.py's.

Every adapter wraps all seven linear layers of each block (q, k, v, o, gate, up, down: 28 matrices). AdaLoRA at
two budgets: r_0 = 12 falling to 8 triplets per matrix on average (peft's default init_r / target_r, the paper's
b(0) = 1.5 b(T)) and r_0 = 3 falling to 2. Its schedule is the authors' SQuAD v2 script's (300 steps: tinit 50,
tfinal 100, deltaT 10), halved to our 150 steps: tinit 25, tfinal 50, deltaT 5; beta1 = beta2 = 0.85 and
orth_reg_weight 0.1 as in that script. alpha = 2 r_0, so that the update's scale alpha / r_0 is 2, the scale of
every LoRA in these lessons (alpha = 2r). LoRA at r = 2, 3 and r = 8, 9: ranks whose parameter counts bracket
AdaLoRA's final ones (its kept triplets x (d_in + d_out + 1), known only after training), so that the lesson can
compare them on a parameter axis.

Stored per AdaLoRA run besides the scores and the loss curve: the kept rank of every matrix at the end and every
deltaT steps, the trainable parameters during training and after ml.prune, and the orthogonality regulariser.
"adalora_r8_lr0.01" (stored under "extra_seeds", outside "configs"): adalora_r8 at 0.01, the runner-up rate of its grid
(seed-0 validation 0.920 against 0.925 at the chosen 0.03, one answer of 200), seeds 1 and 2 run, seed 0 taken from
the stored grid run; so that the lesson can show the allocation at both rates over three seeds. It is not a chosen
rate and plays no part in the comparison with LoRA.
"timing" times LoRA r = 8, AdaLoRA's layers alone (no regulariser, no allocator) and full AdaLoRA (regulariser +
RankAllocator) step by step, taking turns at every step on the same batch, over three fresh 150-step runs.
"""

import statistics
import time

import torch

import minilora as ml
import sweep_common as sweep
from minilora.train import collate, lr_at
from sweep_common import ALL, STEPS

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SCHEDULE = {"tinit": 25, "tfinal": 50, "deltaT": 5, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.1}
CONFIGS = {  # name -> the adapter's settings, as stored in the JSON
    "adalora_r8": {"method": "adalora", "targets": ALL, "init_r": 12, "target_r": 8, "alpha": 24, **SCHEDULE},
    "adalora_r2": {"method": "adalora", "targets": ALL, "init_r": 3, "target_r": 2, "alpha": 6, **SCHEDULE},
    "lora_r2": {"method": "lora", "targets": ALL, "r": 2, "alpha": 4},
    "lora_r3": {"method": "lora", "targets": ALL, "r": 3, "alpha": 6},
    "lora_r8": {"method": "lora", "targets": ALL, "r": 8, "alpha": 16},
    "lora_r9": {"method": "lora", "targets": ALL, "r": 9, "alpha": 18},
}
TIMING_ROUNDS, TIMING_LR = 3, 1e-2
EXTRA = {"adalora_r8_lr0.01": ("adalora_r8", 1e-2)}  # name -> (configuration, rate): seeds 1, 2 at a rate not chosen


def adapter_config(spec):
    if spec["method"] == "adalora":
        return ml.AdaLoraConfig(target_modules=spec["targets"], init_r=spec["init_r"], target_r=spec["target_r"],
                                alpha=spec["alpha"], total_step=STEPS, **{k: spec[k] for k in SCHEDULE})
    return ml.LoraConfig(r=spec["r"], alpha=spec["alpha"], target_modules=spec["targets"])


def new_model(spec, seed):
    torch.manual_seed(seed)
    return ml.inject(ml.load_base(sweep.BASE), adapter_config(spec))


def run_one(spec, lr, seed, tok, rows, splits):
    model = new_model(spec, seed)
    if spec["method"] == "lora":
        trainable, history, scores = sweep.fine_tune(model, lr, seed, tok, rows, splits)
        return trainable, sweep.run_record(history, scores, seed=seed, lr=lr)
    allocator = ml.RankAllocator(model)
    record_steps, record = [], []

    def on_step(m, step):
        budget = allocator.update_and_allocate(m, step)
        if step % spec["deltaT"] == 0:
            record_steps.append(step)
            record.append(allocator.kept_ranks(m))
        return budget

    trainable, history, scores = sweep.fine_tune(model, lr, seed, tok, rows, splits, extra_loss=allocator.penalty,
                                                 on_step=on_step)
    kept, regulariser = allocator.kept_ranks(model), ml.orthogonal_penalty(model).item()
    ml.prune(model)
    names = sorted(kept)
    return trainable, {**sweep.run_record(history, scores, seed=seed, lr=lr), "kept_ranks": kept,
                       "final_trainable": ml.trainable_report(model, verbose=False).trainable,
                       "regulariser": round(regulariser, 5),
                       "rank_history": {"steps": record_steps, "layers": names,
                                        "ranks": [[ranks[n] for n in names] for ranks in record]}}


def timing(tok, rows):
    """Wall time of optimizer steps of the three variants, interleaved step by step: at every step each variant
    takes one step (in an order that rotates), so that the machine's drift hits them alike. Each step is what
    ml.train does: forward, task loss (+ regulariser), backward, clipping, AdamW, the allocator, zero_grad, the
    schedule. TIMING_ROUNDS fresh runs of STEPS steps."""
    variants = {"lora_r8": (CONFIGS["lora_r8"], False), "adalora_r8_layers_only": (CONFIGS["adalora_r8"], False),
                "adalora_r8": (CONFIGS["adalora_r8"], True)}
    times = {name: [] for name in variants}
    allocator_ms, penalty_ms = [], []
    for _ in range(TIMING_ROUNDS):
        runs = {}
        for name, (spec, with_allocator) in variants.items():
            model = new_model(spec, 0).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=TIMING_LR, weight_decay=0.0)
            cfg = sweep.train_config(TIMING_LR, 0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, cfg=cfg: lr_at(s, cfg))
            runs[name] = (model, params, optimizer, schedule, ml.RankAllocator(model) if with_allocator else None)
        generator = torch.Generator().manual_seed(0)
        order = []
        for step in range(1, STEPS + 1):
            if not order:
                order = torch.randperm(len(rows), generator=generator).tolist()
            batch = collate([rows[i] for i in order[:16]], tok.pad_id)
            order = order[16:] if len(order) >= 32 else []
            names = list(variants)
            names = names[step % 3:] + names[:step % 3]  # rotate who goes first
            for name in names:
                model, params, optimizer, schedule, allocator = runs[name]
                t0 = time.perf_counter()
                loss = model(**batch).loss
                if allocator is not None:
                    t = time.perf_counter()
                    loss = loss + allocator.penalty(model)
                    penalty_ms.append(1e3 * (time.perf_counter() - t))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                if allocator is not None:
                    t = time.perf_counter()
                    allocator.update_and_allocate(model, step)
                    allocator_ms.append(1e3 * (time.perf_counter() - t))
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                loss.item()
                times[name].append(1e3 * (time.perf_counter() - t0))
        print("timing round: " + ", ".join(f"{n} {statistics.median(v[-STEPS:]):.1f} ms" for n, v in times.items()),
              flush=True)
    ratio = {n: [a / b for a, b in zip(times[n], times["lora_r8"])] for n in variants if n != "lora_r8"}
    return {"rounds": TIMING_ROUNDS, "lr": TIMING_LR, "order": list(variants),
            "what": "wall time of one optimizer step as ml.train takes it (forward, loss and regulariser, backward, "
                    "clipping, AdamW, the allocator, zero_grad, the schedule), ms; the three variants take turns at "
                    "every step, on the same batch, in a rotating order",
            "median_ms": {n: round(statistics.median(v), 3) for n, v in times.items()},
            "mean_ms": {n: round(statistics.mean(v), 3) for n, v in times.items()},
            "round_medians_ms": {n: [round(statistics.median(v[i * STEPS:(i + 1) * STEPS]), 3)
                                     for i in range(TIMING_ROUNDS)] for n, v in times.items()},
            "median_ratio_to_lora_r8": {n: round(statistics.median(v), 4) for n, v in ratio.items()},
            "allocator_median_ms": round(statistics.median(allocator_ms), 3),
            "allocator_mean_ms": round(statistics.mean(allocator_ms), 3),
            "penalty_forward_median_ms": round(statistics.median(penalty_ms), 3)}


def main():
    args, old, todo = sweep.parse_args(__doc__, "04_adalora.json", [*CONFIGS, *EXTRA, "timing"])
    tok, rows, splits = sweep.load_data()
    start = time.perf_counter()

    def run_config(name, spec):
        trainable, lr, grid, runs = sweep.grid_then_seeds(
            name, lambda lr, seed: run_one(spec, lr, seed, tok, rows, splits), LR_GRID)
        return {**spec, "trainable": trainable, "lr": lr, "grid": grid, "runs": runs}

    results = sweep.run_configs(CONFIGS, todo, old, run_config)
    extra = dict(old.get("extra_seeds", {}))
    for name, (config, lr) in EXTRA.items():
        if name not in todo and name in extra:
            continue
        seed0 = next(run for run in results[config]["grid"] if run["lr"] == lr)  # the stored seed-0 grid run
        _, runs = sweep.each_seed(name, lambda seed: (None, run_one(CONFIGS[config], lr, seed, tok, rows, splits)[1])
                                  if seed != sweep.SEEDS[0] else (None, seed0))
        extra[name] = {"config": config, "lr": lr, "runs": runs,
                       "what": "seeds 0, 1, 2 at a rate the rule did not choose; seed 0 is the grid's run"}
    step_times = timing(tok, rows) if "timing" in todo else old.get("timing")
    out = {**sweep.header(), "lr_grid": list(LR_GRID), "lr_rule": sweep.GRID_LR_RULE, "metric": sweep.METRIC,
           "configs": results, "extra_seeds": extra, "timing": step_times}
    sweep.write(args.out, out, todo, start)


if __name__ == "__main__":
    main()
