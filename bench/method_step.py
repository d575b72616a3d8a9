"""DoRA's and IA3's training-step time relative to LoRA, minilora against peft, measured in one run.

overhead = (DoRA step) / (LoRA step) - 1, each library against its own LoRA on the same model, batch and
targets; the goal is minilora's overhead at most half of peft's (`DoRA overhead over LoRA, minilora/peft` <= 0.5).
A step is forward, backward and AdamW on the adapter parameters (A, B and, for DoRA, the magnitudes m).

As in bench/lora_step.py (whose helpers this script uses): every variant runs on the very same frozen weight
tensors; each round runs every variant once, starting from a different one each round; a ratio is the median
over rounds of the ratio within a round, milliseconds are plain medians. The overhead ratio is formed from the
two median DoRA/LoRA ratios.

What each DoRA step adds, per adapted layer (n = ||W + s B A||_c, detached):
  peft      B A formed as lora_B(lora_A(eye(in))) and W + s B A (out x in) to take n; then
            (m/n - 1) W x + (m/n) s B A x as separate elementwise passes over (tokens x out) activations, and
            autograd's backward through each of them
  minilora  n from ||W_i||^2 (cached), W A^T and A A^T without forming (out x in); forward and backward in one
            autograd node (dora.FrozenLinearWithDora): one scaling pass forward, m/n folded into the small
            factors backward, one reduction for dL/dm
The matrix-product FLOPs of each step are counted too (torch.utils.flop_counter, on the equation paths): the
DoRA/LoRA FLOP ratio is what the overhead would be if nothing but those products cost time.

IA3 runs on its own targets (peft's Llama default: k_proj, v_proj, down_proj, down_proj feed-forward), so
its step is compared with each library's LoRA step on the LoRA targets: the cost of the whole fine-tuning
step either way, not a per-layer overhead.

    python bench/method_step.py            # decoder-small, r=8, all seven Llama projections
    python bench/method_step.py --quick    # smaller model, fewer rounds
    python bench/method_step.py --targets q_proj,v_proj --plain   # q,v only; also minilora's equation path
"""

import statistics
from functools import partial

import torch

from lora_step import (ALL_LINEAR, build_model, make_train_step, matmul_flops, ratio, sharing_weights, step_arguments,
                       step_sizes, timed_rounds)
from minilora.inject import adapter_layers, inject
from minilora.methods.ia3 import IA3Config
from minilora.methods.lora import LoraConfig


def main():
    ap = step_arguments(__doc__)
    ap.add_argument("--plain", action="store_true", help="also time minilora DoRA on its equation path (fused=False)")
    ap.add_argument("--ia3-targets", default="k_proj,v_proj,down_proj")
    ap.add_argument("--ia3-feedforward", default="down_proj")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq, repeats = step_sizes(args)

    import peft

    torch.manual_seed(0)
    base, desc = build_model(args.preset, args.quick, device=args.device, dtype=getattr(torch, args.dtype))
    base.train()
    base.requires_grad_(False)
    targets = args.targets.split(",")
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), device=args.device)

    def ours(use_dora, fused=True):
        model = inject(sharing_weights(base), LoraConfig(r=args.r, alpha=2 * args.r, target_modules=targets,
                                                         use_dora=use_dora))
        for layer in adapter_layers(model).values():
            layer.fused = fused
        return model

    def theirs(use_dora):
        return peft.get_peft_model(sharing_weights(base), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                          target_modules=targets, use_dora=use_dora))

    ia3_targets, ia3_ff = args.ia3_targets.split(","), args.ia3_feedforward.split(",")
    models = {"minilora LoRA": ours(False), "minilora DoRA": ours(True), "peft LoRA": theirs(False),
              "peft DoRA": theirs(True),
              "minilora IA3": inject(sharing_weights(base), IA3Config(target_modules=ia3_targets,
                                                                      feedforward_modules=ia3_ff)),
              "peft IA3": peft.get_peft_model(sharing_weights(base), peft.IA3Config(
                  target_modules=ia3_targets, feedforward_modules=ia3_ff))}
    if args.plain:
        models["minilora DoRA, equation path"] = ours(True, fused=False)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    steps = {k: partial(make_train_step(m, trainable(m)), ids) for k, m in models.items()}
    flops = {"minilora LoRA": matmul_flops(ours(False, fused=False), ids),
             "minilora DoRA": matmul_flops(ours(True, fused=False), ids),
             "peft LoRA": matmul_flops(models["peft LoRA"], ids), "peft DoRA": matmul_flops(models["peft DoRA"], ids)}
    times = timed_rounds(steps, repeats)

    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in base.parameters())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"model: {desc}, {n_params / 1e6:.1f}M params, {args.dtype}; batch {batch}x{seq}; r={args.r}; targets {targets}; "
          f"{where}; torch {torch.__version__}, peft {peft.__version__}; {repeats} rounds")
    print(f"{'variant':<32} {'median ms':>10} {'/ own LoRA':>11} {'/ peft same':>12}")
    for name in times:
        lib, kind = name.split()[0], name.split()[1].rstrip(",")
        own_lora, same = f"{lib} LoRA", f"peft {kind}"
        print(f"{name:<32} {1e3 * med[name]:>10.1f} {ratio(times, name, own_lora):>11.3f} {ratio(times, name, same):>12.3f}")
    over_ours = ratio(times, "minilora DoRA", "minilora LoRA") - 1
    over_peft = ratio(times, "peft DoRA", "peft LoRA") - 1
    for lib in ("minilora", "peft"):
        print(f"{lib} DoRA/LoRA in matrix-product FLOPs: {flops[f'{lib} DoRA'] / flops[f'{lib} LoRA']:.4f}")
    print(f"DoRA overhead over LoRA: minilora {over_ours:.3f}, peft {over_peft:.3f}")
    print(f"IA3 step / LoRA step (IA3 on {ia3_targets}): minilora {ratio(times, 'minilora IA3', 'minilora LoRA'):.3f}, "
          f"peft {ratio(times, 'peft IA3', 'peft LoRA'):.3f}; minilora IA3 / peft IA3 "
          f"{ratio(times, 'minilora IA3', 'peft IA3'):.3f}")
    print(f"step ms: minilora LoRA {1e3 * med['minilora LoRA']:.1f}, minilora DoRA {1e3 * med['minilora DoRA']:.1f}, "
          f"peft LoRA {1e3 * med['peft LoRA']:.1f}, peft DoRA {1e3 * med['peft DoRA']:.1f}")
    print(f"DoRA overhead over LoRA, minilora/peft: {over_ours / over_peft:.3f}")


if __name__ == "__main__":
    main()
