"""One table of every training method at the default size: step time, and memory estimated against measured.

For each method of minilora.memory.METHODS (full fine-tuning, LoRA, QLoRA, DoRA, IA3) on decoder-small, batch
8 x 128, r = 8 (alpha 16), all seven Llama projections, fp32 on the CPU by default (a GPU when there is one):

  trainable     the parameters AdamW updates
  step ms       median of the step's time (forward, backward and AdamW on the trainable parameters)
  / LoRA        the step's time relative to LoRA's: the median over rounds of the ratio within a round
  estimate      minilora.memory.estimate: weights, gradients, AdamW's two moments, the activations the forward
                keeps for the backward (counted on the meta device), and their total
  peak          minilora.memory.measure_step's peak of one real step (PyTorch's MemTracker on a CPU,
                max_memory_allocated on a GPU), and peak / estimated total
  saved         what the forward on the real tensors and kernels keeps for the backward (measure_step's
                saved_bytes), to set against the estimated activations

The estimate is a sum of what a step holds, not of what is alive at its peak: full fine-tuning's activations are
freed during the backward while its weight gradients fill, so its peak/estimate is the lowest (about 0.86 here).
On a CPU the fused scaled-dot-product attention kernel keeps no attention probabilities, which the reference
kernels counted on meta do (B x heads x T x T per layer, 34 MB at the default size): `saved` is that much below
the estimated activations, and the adapters' peak/estimate a few % below 1.

Each method gets its own model, made by minilora.memory.build (the very function `estimate` counts, so the two
are set up alike) under torch.manual_seed(0): the base is drawn first, so every model starts from the same base
weights (checked on the embeddings) before QLoRA quantises it and the adapters go on; the adapters themselves
are drawn after that, per method. IA3 adapts peft's default k_proj, v_proj and down_proj (memory.build's
default for it, as in bench/method_step.py and lesson 09); --targets applies to the other methods.

The peaks are measured first, one method at a time (on a GPU, minus what was allocated before that method's
model was built, so the other models do not count). The times then come from rounds as in bench/lora_step.py
(whose helpers this script uses): one warm-up step each, then each round runs every method once, starting from a
different one each round, so a slow spell of a shared machine hits them all alike. Full fine-tuning runs in the
same rounds: its gradients and AdamW state for every weight churn more memory than the adapters' steps.

Last lines: `step time ratio to LoRA: full X, qlora Y, dora Z, ia3 W` and
`measured/estimated peak memory ratio: full ..., lora ..., ...`.

    python bench/methods_table.py            # decoder-small, batch 8 x 128, r=8, 11 rounds
    python bench/methods_table.py --quick    # smaller model and batch, 5 rounds, well under a minute on 2 cores
"""

import statistics
from functools import partial

import torch

from lora_step import ALL_LINEAR, build_model, make_train_step, ratio, step_arguments, step_sizes, timed_rounds
from minilora.memory import METHODS, build, estimate, human, measure_step


def main():
    ap = step_arguments(__doc__)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)} (lora is always run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq, repeats = step_sizes(args)
    methods = [m for m in METHODS if m in args.methods.split(",") or m == "lora"]
    targets, dtype, device = args.targets.split(","), getattr(torch, args.dtype), torch.device(args.device)
    cuda = device.type == "cuda"

    # the same (--quick) shapes and description as the other scripts, with no storage
    config, desc = build_model(args.preset, args.quick, device="meta")
    config = config.config
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=device)

    models, budgets, measured, first = {}, {}, {}, None
    for method in methods:
        method_targets = None if method == "ia3" else targets  # IA3: memory.build's default, peft's k, v, down_proj
        budgets[method] = estimate(config, method, batch, seq, args.r, method_targets, dtype)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        torch.manual_seed(0)
        model = build(config, method, args.r, method_targets, device, dtype)
        embed = model.model.embed_tokens.weight.detach()
        if first is None:
            first = (method, embed.clone())  # before any step trains it
        elif not torch.equal(embed, first[1]):
            raise RuntimeError(f"{method}'s base weights differ from {first[0]}'s under the same seed")
        models[method] = model
        m = measure_step(model, ids, steps=1)
        measured[method] = (m.peak_bytes - before, m.saved_bytes)

    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    steps = {k: partial(make_train_step(m, trainable(m)), ids) for k, m in models.items()}
    times = timed_rounds(steps, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = {k: ratio(times, k, "lora") for k in times}
    peak_est = {k: measured[k][0] / budgets[k].total for k in methods}

    n_params = budgets["lora"].parameters
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"model: {desc}, {n_params / 1e6:.1f}M params, {args.dtype}; batch {batch}x{seq}; r={args.r}; "
          f"targets {targets}; {where}; torch {torch.__version__}; {repeats} rounds")
    print("estimate: minilora.memory.estimate (meta device); peak: measure_step's peak of one step; "
          "saved: the real forward's saved tensors")
    cols = ["weights", "grads", "optimizer", "activ.", "total"]
    print(f"{'method':<7} {'trainable':>10} {'step ms':>9} {'/ LoRA':>7} | "
          + " ".join(f"{c:>9}" for c in cols) + f" | {'peak':>9} {'peak/est':>8} {'saved':>9}")
    for k in methods:
        b, (peak, saved) = budgets[k], measured[k]
        n_train = sum(p.numel() for p in trainable(models[k]))
        mem = [b.weights, b.gradients, b.optimizer, b.activations, b.total]
        print(f"{k:<7} {n_train:>10,} {1e3 * med[k]:>9.1f} {rel[k]:>7.3f} | "
              + " ".join(f"{human(x):>9}" for x in mem) + f" | {human(peak):>9} {peak_est[k]:>8.3f} {human(saved):>9}")
        if n_train != b.trainable:
            print(f"  note: {k} trains {n_train:,} parameters, the estimate counts {b.trainable:,}")
    print("step time ratio to LoRA: " + ", ".join(f"{k} {rel[k]:.3f}" for k in methods if k != "lora"))
    print("measured/estimated peak memory ratio: " + ", ".join(f"{k} {peak_est[k]:.3f}" for k in methods))


if __name__ == "__main__":
    main()
