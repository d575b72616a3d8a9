"""LoRA training-step and merged-inference cost, measured against peft and the base model in one run.

Every variant starts from the same base weights and sees the same batch. The frozen variants (floor, minilora,
peft, base and merged inference) share the very same weight tensors: two deep copies of one model, run on the
same input, differ by up to 2.5% on our 2-core VM from where their weights happen to lie in memory, which is
as large as the differences measured here. Each round runs every variant once,
starting from a different one each round (1 2 3, 2 3 1, ...); a ratio is the median over rounds of the
ratio within a round, so a slow spell of a shared machine hits both sides of it alike. Milliseconds are
plain medians.

  frozen floor   forward + backward to the input embeddings, no weight gradients: what any adapter pays at least
  minilora LoRA  minilora.inject, AdamW on the adapter parameters
  peft LoRA      peft.get_peft_model with the same config, same optimizer
  full FT        every weight trains, AdamW on all of them (timed in its own rounds against the floor)
  base / merged  inference (eval, no_grad) of the base vs the model after minilora.merge (LoRA layers still in place),
                 on the same weight tensors, so the ratio is the cost of the wrapper alone
  --plain        adds minilora with its fused autograd node switched off (the equation path), to see what the node buys

On a GPU the clock is read after torch.cuda.synchronize(), so each time covers the device's work.

The run also counts the matrix-product FLOPs of one LoRA step and one floor step (torch.utils.flop_counter):
their ratio is what LoRA/floor would be if the rank-r products ran at the base GEMMs' rate, the bound that
no implementation of the same equation goes below.

    python bench/lora_step.py            # decoder-small-sized model
    python bench/lora_step.py --quick    # smaller model and fewer repeats, under a minute on 2 cores
    python bench/lora_step.py --d-model 2048 --layers 2 --repeats 8   # how the ratios move with width
    python bench/lora_step.py --preset llama-1b --dtype bfloat16 --batch 8 --seq 512   # a GPU-sized model
"""

import argparse
import copy
import statistics
import time
from functools import partial

import torch

from minilora.inject import inject, adapter_layers, merge, merge_and_unload
from minilora.memory import ALL_LINEAR
from minilora.methods.lora import LoraConfig
from minilora.models import DecoderLM, get_config



def build_model(preset: str, quick: bool, d_model: int | None = None, n_layers: int | None = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A preset of our Llama-style DecoderLM (peft wraps it by its Llama module names), built on `device`.
    `d_model` scales its shapes (heads of 64, half as many KV heads, d_ff = 3 d_model)."""
    size = dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768) if quick else {}
    if d_model:
        size.update(d_model=d_model, n_heads=d_model // 64, n_kv_heads=max(1, d_model // 128), d_ff=3 * d_model)
    if n_layers:
        size["n_layers"] = n_layers
    shape = ", ".join(f"{k}={v}" for k, v in size.items() if k in ("d_model", "n_layers", "d_ff"))
    with torch.device(device):
        model = DecoderLM(get_config(preset, **size)).to(dtype)
    return model, f"DecoderLM {preset}" + (f" ({shape})" if shape else "")


def sharing_weights(model):
    """A copy of `model` whose parameters are the original's own tensors (modules and buffers are copied)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def matmul_flops(model, ids) -> int:
    """FLOPs of the matrix products in one forward + backward (the fused node's in-place GEMMs are invisible
    to the counter, so count a model on the equation path: the same products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_of(model, ids).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def rotated(names: list[str], i: int) -> list[str]:
    """Round i starts at a different variant, so none always runs right after the same neighbour."""
    k = i % len(names)
    return names[k:] + names[:k]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """One warm-up call each (allocator, optimizer state), then `rounds` rounds of one call each, rotated."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for i in range(rounds):
        for name in rotated(list(fns), i):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of times[a][i] / times[b][i]: both were measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def make_train_step(model, params):
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(ids):
        loss = loss_of(model, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def step_arguments(doc: str) -> argparse.ArgumentParser:
    """The flags every training-step benchmark takes (the model, its dtype and device, the adapter, the sizes)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="decoder-small", help="decoder preset to build (e.g. llama-1b on a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the base's dtype; adapters stay fp32 as in peft")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default=",".join(ALL_LINEAR))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def step_sizes(args) -> tuple[int, int, int]:
    """Batch, sequence length and rounds: the flags, or the defaults (smaller with --quick)."""
    return (args.batch or (4 if args.quick else 8), args.seq or (64 if args.quick else 128),
            args.repeats or (5 if args.quick else 11))


def main():
    ap = step_arguments(__doc__)
    ap.add_argument("--plain", action="store_true", help="also time minilora with the fused node switched off")
    ap.add_argument("--d-model", type=int, default=None, help="scale the model's width (see build_model)")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq, repeats = step_sizes(args)

    import peft

    torch.manual_seed(0)
    base, desc = build_model(args.preset, args.quick, args.d_model, args.layers, args.device, getattr(torch, args.dtype))
    base.train()
    targets = args.targets.split(",")
    cfg = LoraConfig(r=args.r, alpha=2 * args.r, target_modules=targets)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), device=args.device)

    full = copy.deepcopy(base)  # its own weights: they train
    base.requires_grad_(False)
    ours = inject(sharing_weights(base), cfg)
    theirs = peft.get_peft_model(sharing_weights(base), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
    floor = sharing_weights(base)
    # gradients flow back to the embeddings' output, through every layer, with no weight gradients
    floor.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_())

    floor_name, ours_name, peft_name = "frozen floor (fwd + input-grad bwd)", f"minilora LoRA r={args.r}", f"peft LoRA r={args.r}"
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    steps = {
        floor_name: make_train_step(floor, []),
        ours_name: make_train_step(ours, trainable(ours)),
        peft_name: make_train_step(theirs, trainable(theirs)),
    }
    plain = inject(sharing_weights(base), cfg)  # the equation path: its own adapters and optimizer state
    for layer in adapter_layers(plain).values():
        layer.fused = False
    flop_ratio = matmul_flops(plain, ids) / matmul_flops(floor, ids)
    if args.plain:
        steps[f"minilora LoRA r={args.r}, equation path"] = make_train_step(plain, trainable(plain))
    times = timed_rounds({k: partial(fn, ids) for k, fn in steps.items()}, repeats)
    # full fine-tuning in rounds of its own against the floor: gradients and AdamW state for every weight
    # churn memory, which would add noise to the LoRA comparison above if it ran between those steps
    full_times = timed_rounds({floor_name: partial(steps[floor_name], ids),
                               "full fine-tuning": partial(make_train_step(full, list(full.parameters())), ids)}, repeats)
    del full, theirs, plain, steps  # free their weights, gradients and optimizer states before timing inference
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    # inference: base vs minilora merged (LoRA wrappers still in the model) vs merged-and-unloaded, all three on
    # the same weight tensors (merging writes W + dW into them, which changes no timing), so the ratio is the
    # wrapper's cost and not where two copies of the weights lie in memory
    base.eval()
    merged = ours.eval()
    merge(merged)
    unloaded = merge_and_unload(sharing_weights(merged))
    infer = {"base inference": base, "merged inference (LoRA layers kept)": merged, "merge_and_unload inference": unloaded}
    with torch.no_grad():
        itimes = timed_rounds({k: partial(m, input_ids=ids) for k, m in infer.items()}, 3 * repeats)

    med = {k: statistics.median(v) for k, v in {**times, **full_times, **itimes}.items()}
    n_params = sum(p.numel() for p in base.parameters())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"model: {desc}, {n_params / 1e6:.1f}M params, {args.dtype}; batch {batch}x{seq}; targets {targets}; "
          f"{where}; torch {torch.__version__}, peft {peft.__version__}; {repeats} rounds (inference {3 * repeats})")
    print("ratios are medians over rounds of the ratio within a round, so a slow spell of the machine cancels out")
    print(f"{'variant':<40} {'median ms':>10} {'/ floor':>8} {'/ peft':>8}")
    for name in times:
        print(f"{name:<40} {1e3 * med[name]:>10.1f} {ratio(times, name, floor_name):>8.3f} {ratio(times, name, peft_name):>8.3f}")
    full_floor = ratio(full_times, "full fine-tuning", floor_name)
    print(f"{'full fine-tuning (own rounds)':<40} {1e3 * med['full fine-tuning']:>10.1f} {full_floor:>8.3f} "
          f"{full_floor / ratio(times, peft_name, floor_name):>8.3f}")
    for name in itimes:
        print(f"{name:<40} {1e3 * med[name]:>10.1f} {'':>8} {'':>8}   / base {ratio(itimes, name, 'base inference'):.3f}")
    print(f"LoRA/floor in matrix-product FLOPs: {flop_ratio:.3f} (the ratio if the rank-{args.r} products ran at the base GEMMs' rate)")
    print(f"LoRA/frozen-floor ratio: {ratio(times, ours_name, floor_name):.3f}")
    print(f"minilora/peft step ratio: {ratio(times, ours_name, peft_name):.3f}")
    print(f"merged/base inference ratio: {ratio(itimes, 'merged inference (LoRA layers kept)', 'base inference'):.3f}")


if __name__ == "__main__":
    main()
