"""NF4 throughput and a QLoRA training step, minilora against bitsandbytes (and peft) in one run.

Part 1, on one (size x size) weight in fp16 and in bf16 (and fp32, shown but not in the ratio):
  quantize    minilora.quantize          vs bitsandbytes.functional.quantize_4bit (its portable PyTorch code on CPU)
  dequantize  minilora.dequantize        vs bitsandbytes.functional.dequantize_4bit (its native C kernel on CPU)
Throughput is bytes of the unquantised weight per second. Both sides produce the same bytes and values (checked
before timing, as in tests/reference/test_nf4_bnb.py), so the ratio compares equal work.

Part 2, one linear layer (size x size, no bias) trained with LoRA r=16 on a batch of tokens in fp32, gradients
flowing to the input as they do in any layer but the first (forward, backward, AdamW on the adapters):
  minilora QLoRA     ml.quantize_model + ml.inject: the NF4 weight is dequantised in the forward and again
                     in the backward, inside minilora's fused LoRA node
  minilora LoRA      the same adapters over an nn.Linear holding the dequantised weight: the floor QLoRA adds to
  peft QLoRA         peft.get_peft_model over bitsandbytes.nn.Linear4bit (quant_type="nf4"), the same adapters
The two 4-bit variants read the very same packed codes and absmax tensors (bitsandbytes' copies are pointed at
minilora's after checking they are equal), so where the bytes lie in memory cannot favour either.

Each round runs every variant once, starting from a different one each round; a ratio is the median over rounds
of the ratio within a round (bench/lora_step.py has the helpers and the reasons).

    python bench/nf4.py            # 4096 x 4096, 15 rounds
    python bench/nf4.py --quick    # fewer rounds, under a minute on 2 cores
    python bench/nf4.py --double-quant --blocksize 128
"""

import argparse
import statistics
from functools import partial

import torch
import torch.nn as nn

import minilora as ml
from lora_step import ratio, timed_rounds


def weight_of(size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, size, generator=g) * 0.02).to(dtype)  # nn.Linear-scale values


def throughput(size: int, blocksize: int, double_quant: bool, rounds: int):
    """Part 1: times per variant, and per dtype the names of (minilora, bnb) for quantize and dequantize."""
    import bitsandbytes.functional as F

    fns, pairs = {}, {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w = weight_of(size, dtype)
        q = ml.quantize(w, blocksize, double_quant)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(q.packed, packed.view(-1)), "minilora and bitsandbytes codes differ"
        assert torch.equal(ml.dequantize(q), F.dequantize_4bit(packed, state)), "dequantised weights differ"
        d = str(dtype).removeprefix("torch.")
        names = {f"{who} {k}": f"{who} {k} {d}" for k in ("quantize", "dequantize") for who in ("minilora", "bnb")}
        fns[f"minilora quantize {d}"] = partial(ml.quantize, w, blocksize, double_quant)
        fns[f"bnb quantize {d}"] = partial(F.quantize_4bit, w, blocksize=blocksize, quant_type="nf4",
                                           compress_statistics=double_quant)
        fns[f"minilora dequantize {d}"] = partial(ml.dequantize, q)
        fns[f"bnb dequantize {d}"] = partial(F.dequantize_4bit, packed, state)
        pairs[dtype] = names
    return timed_rounds(fns, rounds), pairs


def qlora_variants(size: int, r: int, blocksize: int, double_quant: bool):
    """Part 2's three models, sharing their frozen weights and holding the same adapters."""
    import bitsandbytes as bnb
    import peft

    w = weight_of(size, torch.float32)
    qlora = nn.Sequential(nn.Linear(size, size, bias=False))
    qlora[0].weight.data = w
    ml.quantize_model(qlora, compute_dtype=torch.float32, skip=[], blocksize=blocksize, double_quant=double_quant)
    ml.inject(qlora, ml.LoraConfig(r=r, alpha=2 * r, target_modules=["0"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would hide a wrong adapter path
        for p in (qlora[0].lora_A["default"].weight, qlora[0].lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    base4 = qlora[0].base_layer
    adapters = {k: v for k, v in qlora.state_dict().items() if ".lora_" in k}

    lora = nn.Sequential(nn.Linear(size, size, bias=False))
    lora[0].weight.data = ml.dequantize(base4.weight)  # the values the 4-bit base computes with
    ml.inject(lora, ml.LoraConfig(r=r, alpha=2 * r, target_modules=["0"]))
    lora.load_state_dict(adapters, strict=False)

    # bitsandbytes' CPU recipe (tests/reference/test_qlora_peft.py): a Params4bit quantised on the CPU
    lin = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                   compress_statistics=double_quant)
    lin.weight = lin.weight._quantize("cpu")
    lin.support_avx512bf16_for_cpu = False  # its inference-only repacking; training never takes it
    state = lin.weight.quant_state
    assert torch.equal(lin.weight.data.view(-1), base4.packed) and torch.equal(state.absmax, base4.absmax)
    lin.weight.data = base4.packed.view(-1, 1)  # from here on both read the same tensors
    state.absmax = base4.absmax
    if double_quant:
        assert torch.equal(state.state2.absmax, base4.absmax_scale) and torch.equal(state.offset, base4.absmax_offset)
        state.state2.absmax, state.offset = base4.absmax_scale, base4.absmax_offset
    holder = nn.Sequential(lin)
    holder.is_loaded_in_4bit = True  # peft then wraps it with its bnb LoRA layer, as for a model loaded in 4-bit
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    assert type(theirs.base_model.model[0]) is peft.tuners.lora.bnb.Linear4bit
    result = theirs.load_state_dict({"base_model.model." + k: v for k, v in adapters.items()}, strict=False)
    assert not result.unexpected_keys
    return qlora, lora, theirs


def make_step(model, x, grad_out):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        x.grad = None
        y = model(x)
        y.backward(grad_out)  # gradients to the input and to A, B
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    import bitsandbytes
    import peft

    n = args.size ** 2
    times, pairs = throughput(args.size, args.blocksize, args.double_quant, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"weight {args.size}x{args.size} ({n / 1e6:.1f}M values), blocksize {args.blocksize}, double quant "
          f"{args.double_quant}; cpu capability {torch.backends.cpu.get_cpu_capability()}, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"peft {peft.__version__}; {rounds} rounds")
    print("throughput: bytes of the unquantised weight per second; ratio = median over rounds of bnb time / "
          "minilora time")
    print(f"{'':<11} {'dtype':<9} {'minilora GB/s':>13} {'bnb GB/s':>9} {'minilora/bnb':>13}")
    within = {"quantize": [], "dequantize": []}
    for dtype, names in pairs.items():
        size_bytes = n * dtype.itemsize
        for op in ("quantize", "dequantize"):
            ours, theirs = names[f"minilora {op}"], names[f"bnb {op}"]
            if dtype != torch.float32:
                within[op] += [b / a for a, b in zip(times[ours], times[theirs])]
            print(f"{op:<11} {str(dtype).removeprefix('torch.'):<9} {size_bytes / med[ours] / 1e9:>13.2f} "
                  f"{size_bytes / med[theirs] / 1e9:>9.2f} {ratio(times, theirs, ours):>13.3f}")
    # bytes each side moves per value, dequantising to 16 bits: bitsandbytes' kernel reads half a byte of codes
    # and writes 2 bytes; minilora's three tensor passes (bytes to int32 indices, indices to float32 levels,
    # levels x absmax to the output) read and write 0.5+2, 2+4 and 4+2 bytes, in chunks that stay in cache
    print("dequantize bytes moved per value, 16-bit output: bnb 2.5, minilora 14.5 (three passes, cached chunks): "
          f"a purely memory-bound minilora/bnb would be {2.5 / 14.5:.2f}")

    torch.manual_seed(0)
    qlora, lora, theirs = qlora_variants(args.size, args.r, args.blocksize, args.double_quant)
    x = torch.randn(args.batch, args.seq, args.size, requires_grad=True)
    grad_out = torch.randn(args.batch, args.seq, args.size)
    with torch.no_grad():
        y_q, y_l, y_p = qlora(x), lora(x), theirs(x)
    scale = y_p.abs().max()
    print(f"\nQLoRA step: one {args.size}x{args.size} layer, LoRA r={args.r}, batch {args.batch}x{args.seq}, fp32, "
          f"input gradients; outputs agree to {max((y_q - y_p).abs().max(), (y_l - y_p).abs().max()) / scale:.1e} "
          "of their scale")
    names = {"minilora QLoRA": qlora, "minilora LoRA (fp32 base)": lora, "peft QLoRA (bnb Linear4bit)": theirs}
    steps = timed_rounds({k: make_step(m, x, grad_out) for k, m in names.items()}, rounds)
    smed = {k: statistics.median(v) for k, v in steps.items()}
    floor, peft_name = "minilora LoRA (fp32 base)", "peft QLoRA (bnb Linear4bit)"
    print(f"{'variant':<30} {'median ms':>10} {'/ LoRA':>8} {'/ peft':>8}")
    for k in steps:
        print(f"{k:<30} {1e3 * smed[k]:>10.1f} {ratio(steps, k, floor):>8.3f} {ratio(steps, k, peft_name):>8.3f}")
    # what QLoRA adds to LoRA is two dequantisations of the fp32 weight per step (forward and input gradient)
    deq = {who: med[f"{who} dequantize float32"] for who in ("minilora", "bnb")}
    print(f"QLoRA/LoRA if two fp32 dequantisations were the only extra cost: minilora "
          f"{(smed[floor] + 2 * deq['minilora']) / smed[floor]:.3f}, bnb {(smed[floor] + 2 * deq['bnb']) / smed[floor]:.3f}")

    print(f"dequantize minilora/bnb throughput ratio: {statistics.median(within['dequantize']):.3f}")
    print(f"quantize minilora/bnb throughput ratio: {statistics.median(within['quantize']):.3f}")
    print(f"QLoRA step minilora/peft ratio: {ratio(steps, 'minilora QLoRA', peft_name):.3f}")


if __name__ == "__main__":
    main()
