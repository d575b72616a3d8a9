"""Checkers for lesson 02 (QLoRA and NF4)'s exercises (the machinery and how to write one: core.py)."""

import torch

from minilora import Linear4bit, LoraConfig, LoraLinear4bit, dequantize, quantize
from minilora.methods.nf4 import nf4_codebook

from .core import (call, checker, ExerciseError, expect_differentiable, expect_int, expect_shape, expect_tensor, passed,
                   _choice, _generator, _randint, _random_lora)
from .lesson01 import _scaling_mistakes

def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of the package's packed bytes, in order (the reference for the code exercises)."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n]


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of `levels` to each value (a common wrong answer computes it on the wrong values)."""
    return (values.unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)


def _on_a_midpoint(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Where a scaled value sits so close to the midpoint of two levels that float rounding may pick either."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return (scaled.unsqueeze(-1) - midpoints).abs().amin(-1) < 1e-6


def _expect_codes(got, want: torch.Tensor, what: str, mistakes: list[tuple[torch.Tensor, str]], hint: str,
                  either: torch.Tensor | None = None) -> None:
    """Raise ExerciseError unless `got` is a uint8 tensor equal to `want` (except where `either` is True)."""
    expect_shape(got, want, what, hint)
    if got.dtype != torch.uint8:
        raise ExerciseError(f"{what} has the wrong dtype: expected torch.uint8 (one byte per entry), got {got.dtype}. "
                            "Hint: .to(torch.uint8) converts integer codes; shifts and | on uint8 tensors stay uint8.")
    wrong = got != want
    if either is not None:
        wrong &= ~either
    if not wrong.any():
        return
    for mistake, mistake_hint in mistakes:
        if mistake.shape == got.shape and torch.equal(got, mistake.to(got.dtype)):
            raise ExerciseError(f"{what} has the right shape but the wrong values. Hint: {mistake_hint}")
    first = int(wrong.nonzero()[0, 0])
    raise ExerciseError(f"{what} has the right shape but {int(wrong.sum())} of {want.numel()} entries are wrong "
                        f"(the first at index {first}). Hint: {hint}")


# ----------------------------------------------------------------------------- 1. bytes of a 4-bit weight

STORAGE_HINT = ("count each stored tensor the exercise lists, with and without double quantisation: how many "
                "elements it has (round up where a last block or group is partial) and how many bytes one element "
                "takes in its dtype.")


@checker
def nf4_storage_bytes(student_fn, seed: int | None = None) -> None:
    """Exercise 1: nf4_storage_bytes(numel, blocksize, double_quant) -> bytes ml.quantize stores."""
    g = _generator(seed)
    trials = [(64 * 256 * _randint(g, 2, 6), 64, False), (64 * 256 * _randint(g, 2, 6), 64, True),
              (2 * _randint(g, 300, 900) + 1, _choice(g, [32, 128]), False),
              (64 * _randint(g, 300, 900) + _randint(g, 1, 63), 64, True),
              (_randint(g, 5000, 90000), _choice(g, [32, 256, 1024]), True)]
    for numel, blocksize, double_quant in trials:
        want = quantize(torch.empty(numel, device="meta"), blocksize, double_quant).nbytes
        got = call(student_fn, numel, blocksize, double_quant, name="nf4_storage_bytes", hint=STORAGE_HINT)
        expect_int(got, "nf4_storage_bytes", what="a whole number of bytes (int)",
                   hint="use integer arithmetic (// rounds down; -(-a // b) rounds up), or int(...) on the total.")
        if got == want:
            continue
        blocks, full_blocks = -(-numel // blocksize), numel // blocksize
        codes = -(-numel // 2)
        scales = 4 * -(-blocks // 256) + 4 if double_quant else 0
        per_block = 1 if double_quant else 4
        mistakes = [
            (numel + per_block * blocks + scales, "two 4-bit codes share one byte."),
            (numel // 2 + per_block * blocks + scales, "an odd number of codes still needs a byte for its last code."),
            (codes + per_block * full_blocks + (4 * -(-full_blocks // 256) + 4 if double_quant else 0),
             "a last, partial block needs its own absmax too."),
        ]
        if double_quant:
            mistakes += [
                (codes + blocks + 4 * -(-blocks // 256), "the mean of the absmax values, subtracted before they are "
                                                         "quantised, is stored too (one float32)."),
                (codes + blocks + 4, "the 8-bit absmax codes need their own float32 scales, one per group of 256 "
                                     "blocks."),
                (codes + blocks, "the 8-bit absmax codes need their own float32 scales, and the subtracted mean "
                                 "is stored as well."),
                (codes + 4 * blocks, "with double quantisation each block's absmax is stored in 8 bits, not 32."),
            ]
        else:
            mistakes += [(codes + 2 * blocks, "the absmax of each block is stored as float32, 4 bytes."),
                         (codes + blocks, "the absmax of each block is stored as float32, 4 bytes; 8-bit absmax "
                                          "values come only with double quantisation.")]
        hint = next((h for wrong, h in mistakes if got == wrong), STORAGE_HINT)
        off = "too many" if got > want else "too few"
        raise ExerciseError(f"nf4_storage_bytes({numel:,}, blocksize={blocksize}, double_quant={double_quant}) "
                            f"returned {got:,}, {off} bytes. Hint: {hint}")
    numel = 4096 * 4096
    single, double = (call(student_fn, numel, 64, dq, name="nf4_storage_bytes", hint=STORAGE_HINT)
                      for dq in (False, True))
    passed(f"nf4_storage_bytes agrees with ml.quantize on {len(trials)} tensors.")
    print(f"  one 4096 x 4096 projection of Llama-2-7B: {2 * numel / 2**20:.0f} MiB in 16 bits, "
          f"{single / 2**20:.2f} MiB in NF4 ({8 * single / numel:.3f} bits per weight), "
          f"{double / 2**20:.2f} MiB double quantised ({8 * double / numel:.3f} bits per weight).")


# ----------------------------------------------------------------------------- 2. the nearest NF4 level

CODES_HINT = ("scale the block into [-1, 1] by its largest absolute value, then give each value the index (0 to "
              "15) of the nearest entry of `levels`.")


@checker
def nf4_codes(student_fn, seed: int | None = None) -> None:
    """Exercise 2: nf4_codes(block, levels) -> the uint8 code of each value of one block."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [(64, 1.0), (64, -1.0), (32, 1.0), (128, -1.0)]  # sign -1: the block's absmax is a negative value
    for n, sign in trials:
        block = torch.randn(n, generator=g) * 0.05 * _randint(g, 1, 4)
        i = int(block.abs().argmax())
        block[i] = sign * block[i].abs() * 1.3  # its largest |value| stands out, with the chosen sign
        q = quantize(block, blocksize=n)
        want = _unpack(q.packed, n)
        absmax = block.abs().max()
        either = _on_a_midpoint(block / absmax, levels)

        got = call(student_fn, block.clone(), levels.clone(), name="nf4_codes", hint=CODES_HINT)
        mistakes = [
            (_nearest(block, levels), "scale the block into [-1, 1] first: NF4's levels are relative to the block's "
                                      "largest absolute value, which the absmax stores."),
            (_nearest(block / block.max(), levels), "the scale is the block's largest absolute value; here the value "
                                                    "furthest from zero is negative."),
            ((block / absmax * 7).round().to(torch.int64) + 7,
             "that rounds to 15 evenly spaced levels, like int4. NF4's 16 levels are not evenly spaced: use the "
             "values in `levels`."),
            (torch.bucketize(block / absmax, levels).clamp(max=15), "take the nearest level, not the next one up."),
            ((torch.bucketize(block / absmax, levels, right=True) - 1).clamp(min=0),
             "take the nearest level, not the next one down."),
        ]
        _expect_codes(got, want, f"nf4_codes for a block of {n} values", mistakes, CODES_HINT, either)
    passed(f"nf4_codes gives ml.quantize's codes for {len(trials)} random blocks.")


# ----------------------------------------------------------------------------- 3. two codes per byte

PACK_HINT = ("byte k holds codes 2k and 2k+1: the first in the high nibble (the upper 4 bits), the second in the "
             "low nibble; an odd count is padded with the code of the level 0.0.")


def _codes_with_unit_blocks(g, n: int, blocksize: int) -> torch.Tensor:
    """Random codes such that every block holds a level of magnitude 1, so quantize(levels[codes]) keeps them."""
    codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    for start in range(0, n, blocksize):
        end = min(start + blocksize, n)
        codes[_randint(g, start, end - 1)] = _choice(g, [0, 15])  # the levels -1 and +1
    return codes


@checker
def pack_unpack(pack_fn, unpack_fn, seed: int | None = None) -> None:
    """Exercise 3: pack_codes(codes) -> uint8 bytes; unpack_codes(packed, n) -> the n codes."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [2 * _randint(g, 40, 200), 2 * _randint(g, 40, 200) + 1, 7, 2 * _randint(g, 40, 200) + 1]
    for n in trials:
        codes = _codes_with_unit_blocks(g, n, 64)
        q = quantize(levels[codes.long()], blocksize=64)
        assert torch.equal(_unpack(q.packed, n), codes)  # the package keeps these codes: its bytes are the reference
        want = q.packed

        got = call(pack_fn, codes.clone(), name="pack_codes", hint=PACK_HINT)
        padded = torch.cat([codes, codes.new_full((n % 2,), 7)])
        mistakes = [
            ((padded[1::2] << 4) | padded[0::2], "the first code of each pair goes in the high nibble (the upper 4 "
                                                 "bits), the second in the low nibble."),
        ]
        if n % 2:
            zero_padded = torch.cat([codes, codes.new_zeros(1)])
            mistakes += [((zero_padded[0::2] << 4) | zero_padded[1::2],
                          "pad an odd count with the code whose level is 0.0, so that the padding decodes to zero; "
                          "code 0 is the level -1.")]
        what = f"pack_codes for {n} codes" + (" (an odd count)" if n % 2 else "")
        if isinstance(got, torch.Tensor) and n % 2 and got.numel() == n // 2:
            raise ExerciseError(f"{what} returned {n // 2} bytes for {n} codes: the last code is missing. Hint: an "
                                "odd count is padded by one code, so it takes (n + 1) // 2 bytes.")
        _expect_codes(got, want, what, mistakes, PACK_HINT)

        got = call(unpack_fn, want.clone(), n, name="unpack_codes", hint=PACK_HINT)
        swapped = torch.stack([want & 15, want >> 4], dim=1).view(-1)
        mistakes = [(swapped[:n], "the high nibble holds the first code of each pair.")]
        what = f"unpack_codes for {n} codes" + (" (an odd count)" if n % 2 else "")
        if isinstance(got, torch.Tensor) and got.numel() == 2 * want.numel() != n:
            raise ExerciseError(f"{what} returned {got.numel()} codes instead of {n}. Hint: drop the padding code "
                                "at the end.")
        _expect_codes(got, codes, what, mistakes, PACK_HINT)
    passed(f"pack_codes writes ml.quantize's bytes and unpack_codes reads them back, for {len(trials)} code "
           "sequences (odd lengths included).")


# ----------------------------------------------------------------------------- 4. dequantising

DEQUANT_HINT = ("unpack the codes (high nibble first), look each one up in `levels`, and multiply it by the absmax "
                "of its block: value i belongs to block i // blocksize of the flattened weight. Then drop any "
                "padding and give the result the weight's shape.")


@checker
def dequantize_nf4(student_fn, seed: int | None = None) -> None:
    """Exercise 4: dequantize_nf4(packed, absmax, shape, blocksize, levels) -> the float32 weight."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [((_randint(g, 4, 10), 64), 64), ((_randint(g, 3, 6), 40), 32), ((6, 128), 64), ((7, 9), 32)]
    for shape, blocksize in trials:
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).add(0.1)  # rows of varied scale
        q = quantize(w, blocksize)
        want = dequantize(q)
        n = w.numel()

        got = call(student_fn, q.packed.clone(), q.absmax.clone(), tuple(shape), blocksize, levels.clone(),
                   name="dequantize_nf4", hint=DEQUANT_HINT)
        codes = _unpack(q.packed, n).long()
        swapped = torch.stack([q.packed & 15, q.packed >> 4], dim=1).view(-1)[:n].long()
        per_value = q.absmax.repeat_interleave(blocksize)[:n]
        mistakes = [
            (levels[codes].view(shape), "these are the levels alone, all within [-1, 1]: each block was divided by "
                                        "its absmax before rounding, so multiply it back."),
            ((levels[codes] / per_value).view(shape), "each block was divided by its absmax before rounding; undo "
                                                      "that division."),
            ((levels[swapped] * per_value).view(shape), "the high nibble of each byte holds the first value of "
                                                        "the pair."),
            ((levels[codes] * q.absmax.repeat(-(-n // q.absmax.numel()))[:n]).view(shape),
             "value i belongs to block i // blocksize: consecutive values share a block's absmax."),
        ]
        expect_tensor(got, want, f"dequantize_nf4's result for a weight of shape {tuple(shape)}, blocksize "
                                 f"{blocksize}", mistakes, DEQUANT_HINT)
    passed(f"dequantize_nf4 equals ml.dequantize on {len(trials)} random weights (odd sizes and partial blocks "
           "included).")


# ----------------------------------------------------------------------------- 5. stretch: the QLoRA forward

QLORA_HINT = ("y = x W^T + (alpha / r) (x A^T) B^T, where W (d_out, d_in) is dequantised from `packed` and `absmax` "
              "(your dequantize_nf4), A is (r, d_in) and B (d_out, r). Gradients must reach A, B and x through "
              "ordinary torch operations.")


@checker
def qlora_forward(student_fn, seed: int | None = None) -> None:
    """Exercise 5: qlora_forward(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r) -> y, differentiable."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [(32, 32, (5,), True), (64, 48, (2, 3), False), (64, 96, (4,), False)]  # d_in, d_out, lead, square
    for d_in, d_out, lead, square in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        W, _, A, B = _random_lora(g, d_in, d_out, r)
        x = torch.randn(*lead, d_in, generator=g)
        base = Linear4bit(W, blocksize=32)
        layer = LoraLinear4bit(base)
        layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, target_modules=["layer"]))
        layer.active_adapters = ["default"]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        x_ref = x.clone().requires_grad_(True)
        want = layer(x_ref)
        grad_out = torch.randn(want.shape, generator=g)
        (want * grad_out).sum().backward()

        x_in, A_in, B_in = (t.clone().requires_grad_(True) for t in (x, A, B))
        got = call(student_fn, x_in, base.packed.clone(), base.absmax.clone(), (d_out, d_in), base.blocksize,
                   levels.clone(), A_in, B_in, alpha, r, name="qlora_forward", hint=QLORA_HINT)
        with torch.no_grad():
            Wq = dequantize(base.weight)
            y0, update = x @ Wq.T, (x @ A.T) @ B.T
            mistakes = [(y0 + wrong, h) for wrong, h in _scaling_mistakes(alpha, r, lambda s: s * update)]
            mistakes += [
                (y0, "the output is x W^T alone: the adapter's update is missing."),
                (x @ (Wq / base.absmax.repeat_interleave(base.blocksize).view(d_out, d_in)).T + alpha / r * update,
                 "W must be dequantised with the absmax of each block, not only looked up in `levels`."),
            ]
            if square:
                mistakes += [(x @ Wq + alpha / r * update, "W is stored (d_out, d_in), as in nn.Linear: x W^T."),
                             (y0 + alpha / r * (x @ B) @ A, "the update is transposed: A acts first, taking d_in to r, "
                                                            "then B takes r to d_out.")]
        what = f"qlora_forward's output for x of shape {tuple(x.shape)}, W {d_out} x {d_in}"
        expect_tensor(got, want.detach(), what, mistakes, QLORA_HINT)
        expect_differentiable(got, what, "A and B")
        (got * grad_out).sum().backward()
        references = (("A", A_in, layer.lora_A["default"].weight), ("B", B_in, layer.lora_B["default"].weight),
                      ("x", x_in, x_ref))
        for name, mine, ref in references:
            if mine.grad is None:
                raise ExerciseError(f"no gradient reached {name}. Hint: compute the output from {name} itself with "
                                    "torch operations (no .detach(), .data, .numpy() or torch.no_grad()).")
            expect_tensor(mine.grad, ref.grad, f"the gradient of {name}", [],
                          "the output must depend on x, A and B exactly as in the forward equation.")
    passed(f"qlora_forward matches ml.LoraLinear4bit on {len(trials)} random layers: outputs and the gradients of "
           "A, B and x.")
