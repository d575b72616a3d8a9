"""LoRA training-step and merged-inference cost, measured against peft and the base model in one run.

Every variant starts from the same base weights and sees the same batch; repeats are interleaved
(variant 1, 2, 3, 4, 1, 2, ...) so drift in machine speed hits all of them alike, and medians are reported.

  frozen floor   forward + backward to the input embeddings, no weight gradients: what any adapter pays at least
  minilora LoRA  minilora.inject, AdamW on the adapter parameters
  peft LoRA      peft.get_peft_model with the same config, same optimizer
  full FT        every weight trains, AdamW on all of them
  base / merged  inference (eval, no_grad) of the base vs the model after minilora.merge (LoRA layers still in place)

    python bench/lora_step.py            # decoder-small-sized model
    python bench/lora_step.py --quick    # smaller model and fewer repeats, under a minute on 2 cores
"""

import argparse
import copy
import statistics
import time

import torch

from minilora.inject import inject, merge, merge_and_unload
from minilora.lora import LoraConfig

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(quick: bool):
    """Our DecoderLM when it is available, otherwise HF Llama with the same shapes (both Llama-named)."""
    size = dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768) if quick else {}
    try:
        from minilora.models import DecoderLM, get_config

        return DecoderLM(get_config("decoder-small", **size)), "DecoderLM decoder-small" + (" (quick: 4x256)" if quick else "")
    except ImportError:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=size.get("d_model", 512),
                                       intermediate_size=size.get("d_ff", 1536), num_hidden_layers=size.get("n_layers", 8),
                                       num_attention_heads=size.get("n_heads", 8), num_key_value_heads=size.get("n_kv_heads", 4))
        return transformers.LlamaForCausalLM(cfg), "HF LlamaForCausalLM (decoder-small shapes)"


def loss_of(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.loss if hasattr(out, "loss") else out["loss"]


def make_train_step(model, params):
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(ids):
        loss = loss_of(model, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def embeddings(model):
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default=",".join(ALL_LINEAR))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq = args.batch or (4 if args.quick else 8), args.seq or (64 if args.quick else 128)
    repeats = args.repeats or (5 if args.quick else 7)

    import peft

    torch.manual_seed(0)
    base, desc = build_model(args.quick)
    base.train()
    targets = args.targets.split(",")
    cfg = LoraConfig(r=args.r, alpha=2 * args.r, target_modules=targets)
    ids = torch.randint(3, 2048, (batch, seq))

    ours = inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
    full = copy.deepcopy(base)
    floor = copy.deepcopy(base)
    for p in floor.parameters():
        p.requires_grad_(False)
    # gradients flow back to the embeddings' output, through every layer, with no weight gradients
    embeddings(floor).register_forward_hook(lambda m, i, out: out.requires_grad_())

    variants = {
        "frozen floor (fwd + input-grad bwd)": make_train_step(floor, []),
        f"minilora LoRA r={args.r}": make_train_step(ours, [p for p in ours.parameters() if p.requires_grad]),
        f"peft LoRA r={args.r}": make_train_step(theirs, [p for p in theirs.parameters() if p.requires_grad]),
        "full fine-tuning": make_train_step(full, list(full.parameters())),
    }
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: allocator, optimizer state
        fn(ids)
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t0)

    # inference: base vs minilora merged (LoRA wrappers still in the model) vs merged-and-unloaded
    base.eval()
    merged = ours.eval()
    merge(merged)
    unloaded = merge_and_unload(copy.deepcopy(merged))
    infer = {"base inference": base, "merged inference (LoRA layers kept)": merged, "merge_and_unload inference": unloaded}
    itimes = {k: [] for k in infer}
    with torch.no_grad():
        for m in infer.values():
            m(input_ids=ids)
        for _ in range(3 * repeats):
            for name, m in infer.items():
                t0 = time.perf_counter()
                m(input_ids=ids)
                itimes[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in {**times, **itimes}.items()}
    floor_t = med["frozen floor (fwd + input-grad bwd)"]
    ours_t, peft_t = med[f"minilora LoRA r={args.r}"], med[f"peft LoRA r={args.r}"]
    base_t, merged_t = med["base inference"], med["merged inference (LoRA layers kept)"]
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: {desc}, {n_params / 1e6:.1f}M params; batch {batch}x{seq}; targets {targets}; "
          f"torch threads {torch.get_num_threads()}; medians of {repeats} interleaved repeats (inference {3 * repeats})")
    print(f"{'variant':<40} {'median ms':>10} {'/ floor':>8} {'/ peft':>8}")
    for name in times:
        print(f"{name:<40} {1e3 * med[name]:>10.1f} {med[name] / floor_t:>8.3f} {med[name] / peft_t:>8.3f}")
    for name in itimes:
        print(f"{name:<40} {1e3 * med[name]:>10.1f} {'':>8} {'':>8}   / base {med[name] / base_t:.3f}")
    print(f"LoRA/frozen-floor ratio: {ours_t / floor_t:.3f}")
    print(f"minilora/peft step ratio: {ours_t / peft_t:.3f}")
    print(f"merged/base inference ratio: {merged_t / base_t:.3f}")


if __name__ == "__main__":
    main()
