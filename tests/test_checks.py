"""The exercise checkers: the right answer passes, each plausible wrong answer fails with its own hint, and
every failure reads as one plain sentence."""

import dataclasses
import math
import re

import pytest
import torch
import torch.nn as nn

import minilora as ml
from minilora import checks
from minilora.checks import ExerciseError

from adapters import fails_with, global_random_state_unchanged, in_out, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def count_by_formula(cfg, r, targets):
    return cfg.n_layers * sum(r * (in_out(cfg)[t][0] + in_out(cfg)[t][1]) for t in targets)


def forward_unfused(x, W, b, A, B, alpha, r):
    return x @ W.T + b + (alpha / r) * ((x @ A.T) @ B.T)


def forward_with_package(x, W, b, A, B, alpha, r):
    layer = ml.LoraLayer(nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype))
    layer.add_adapter("default", ml.LoraConfig(r=r, alpha=alpha, target_modules=["layer"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for p, value in [(layer.base_layer.weight, W), (layer.base_layer.bias, b),
                         (layer.lora_A["default"].weight, A), (layer.lora_B["default"].weight, B)]:
            p.copy_(value)
        return layer(x)


def wrapped_by_suffix(model, target_modules):
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if isinstance(target_modules, str):
                hit = re.fullmatch(target_modules, name) is not None
            else:
                hit = any(name == t or name.endswith("." + t) for t in target_modules)
            if hit:
                names.append(name)
    return names


def wrapped_by_inject(model, target_modules):
    model = ml.inject(model, ml.LoraConfig(r=1, target_modules=target_modules))
    return [name for name, m in model.named_modules() if isinstance(m, ml.LoraLayer)]


def merge_weight(W, A, B, alpha, r):
    return W + (alpha / r) * (B @ A)


def unmerge_weight(W, A, B, alpha, r):
    return W - (alpha / r) * (B @ A)


class LoraLinear(nn.Module):
    def __init__(self, base, r, alpha, use_rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


@pytest.mark.parametrize("seed", SEEDS)
def test_right_answers_pass(seed, capsys):
    checks.lora_param_count(count_by_formula, seed=seed)
    checks.lora_forward(forward_unfused, seed=seed)
    checks.lora_forward(forward_with_package, seed=seed)
    checks.wrapped_modules(wrapped_by_suffix, seed=seed)
    checks.wrapped_modules(wrapped_by_inject, seed=seed)
    checks.merge_unmerge(merge_weight, unmerge_weight, seed=seed)
    checks.lora_linear(LoraLinear, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 7
    assert "4,194,304 trainable parameters" in lines[1]  # llama-7b, r=8 on q_proj, v_proj: 32 * 8 * 2 * 8192


def test_checks_leave_the_global_random_state_alone():
    with global_random_state_unchanged():
        checks.lora_forward(forward_unfused)
        checks.merge_unmerge(merge_weight, unmerge_weight)


# ----------------------------------------------------------------------------- 1. counting parameters

@pytest.mark.parametrize("seed", SEEDS)
def test_count_rejects_common_mistakes(seed):
    def one_layer(cfg, r, targets):
        return count_by_formula(cfg, r, targets) // cfg.n_layers

    def ignores_gqa(cfg, r, targets):
        return count_by_formula(dataclasses.replace(cfg, n_kv_heads=cfg.n_heads), r, targets)

    def full_matrices(cfg, r, targets):
        return cfg.n_layers * sum(in_out(cfg)[t][0] * in_out(cfg)[t][1] for t in targets)

    def off_by_one(cfg, r, targets):
        return count_by_formula(cfg, r, targets) + 1

    fails_with(checks.lora_param_count, one_layer, hint="every layer has its own adapters", seed=seed)
    fails_with(checks.lora_param_count, ignores_gqa, hint="grouped-query attention", seed=seed)
    fails_with(checks.lora_param_count, full_matrices, hint="size of the full matrices", seed=seed)
    message = fails_with(checks.lora_param_count, off_by_one, hint="every targeted matrix", seed=seed)
    assert "got" in message and "too large" in message and "expected" not in message  # says what is wrong, not the answer
    message = fails_with(checks.lora_param_count, lambda cfg, r, t: count_by_formula(cfg, r, t) - 1,
                         hint="every targeted matrix", seed=seed)
    assert "too small" in message


def test_count_must_be_an_int():
    fails_with(checks.lora_param_count, lambda cfg, r, t: float(count_by_formula(cfg, r, t)),
               hint="sum Python ints")


# ----------------------------------------------------------------------------- 2. the forward pass

@pytest.mark.parametrize("seed", SEEDS)
def test_forward_rejects_common_mistakes(seed):
    wrong = {
        "missing its scaling": lambda x, W, b, A, B, alpha, r: x @ W.T + b + (x @ A.T) @ B.T,
        "scaled by alpha alone": lambda x, W, b, A, B, alpha, r: x @ W.T + b + alpha * (x @ A.T) @ B.T,
        "rsLoRA's scaling": lambda x, W, b, A, B, alpha, r: x @ W.T + b + alpha / math.sqrt(r) * (x @ A.T) @ B.T,
        "the bias b is missing": lambda x, W, b, A, B, alpha, r: x @ W.T + alpha / r * (x @ A.T) @ B.T,
        "update is missing": lambda x, W, b, A, B, alpha, r: x @ W.T + b,
        # B A transposed: the first trial has a square W, so the shapes still fit
        "is transposed": lambda x, W, b, A, B, alpha, r: x @ W.T + b + alpha / r * (x @ B) @ A,
    }
    for hint, fn in wrong.items():
        fails_with(checks.lora_forward, fn, hint=hint, seed=seed)


def test_forward_accepts_forming_BA_and_says_so(capsys):
    checks.lora_forward(lambda x, W, b, A, B, alpha, r: x @ (W + alpha / r * B @ A).T + b)
    assert "forms the d_out × d_in matrix B A" in capsys.readouterr().out
    checks.lora_forward(forward_unfused)
    assert "forms" not in capsys.readouterr().out


def test_forward_wrong_scaling_fails_even_when_BA_is_formed():
    fails_with(checks.lora_forward, lambda x, W, b, A, B, alpha, r: x @ (W + B @ A).T + b, hint="missing its scaling")


# ----------------------------------------------------------------------------- 3. which modules get wrapped

def test_wrapped_rejects_substring_matching():
    def contains(model, targets):
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(t in n for t in targets)]
    fails_with(checks.wrapped_modules, contains, hint="merely contains it")


def test_wrapped_rejects_exact_names_only():
    def exact(model, targets):
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in targets]
    fails_with(checks.wrapped_modules, exact, hint="ends with '.' + the entry")


def test_wrapped_rejects_regex_treated_as_a_list():
    def no_regex(model, targets):
        targets = list(targets)  # a string becomes its characters
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    fails_with(checks.wrapped_modules, no_regex, hint="regular expression")


def test_wrapped_must_return_names():
    fails_with(checks.wrapped_modules, lambda model, targets: dict(model.named_modules()), hint="list of module names")


def test_wrapped_rejects_duplicates():
    fails_with(checks.wrapped_modules, lambda model, t: wrapped_by_suffix(model, t) * 2, hint="more than once")


# ----------------------------------------------------------------------------- 4. merge and unmerge

@pytest.mark.parametrize("seed", SEEDS)
def test_merge_rejects_common_mistakes(seed):
    fails_with(checks.merge_unmerge, lambda W, A, B, alpha, r: W + B @ A, unmerge_weight,
               hint="missing its scaling", seed=seed)
    fails_with(checks.merge_unmerge, lambda W, A, B, alpha, r: W + alpha / r * (B @ A).T, unmerge_weight,
               hint="delta W is transposed", seed=seed)  # the first trial is square
    fails_with(checks.merge_unmerge, lambda W, A, B, alpha, r: W, unmerge_weight,
               hint="returned W unchanged", seed=seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_unmerge_must_restore_the_weight(seed):
    fails_with(checks.merge_unmerge, merge_weight, merge_weight, hint="adds delta W a second time", seed=seed)
    fails_with(checks.merge_unmerge, merge_weight, lambda W, A, B, alpha, r: W,
               hint="returned the merged weight unchanged", seed=seed)
    fails_with(checks.merge_unmerge, merge_weight, lambda W, A, B, alpha, r: W - B @ A,
               hint="missing its scaling", seed=seed)


# ----------------------------------------------------------------------------- 5. the LoRA linear module

@pytest.mark.parametrize("seed", SEEDS)
def test_lora_linear_rejects_common_mistakes(seed):
    class NoRsLora(LoraLinear):
        def __init__(self, base, r, alpha, use_rslora=False):
            super().__init__(base, r, alpha, use_rslora=False)

    class BaseTrains(LoraLinear):
        def __init__(self, base, r, alpha, use_rslora=False):
            super().__init__(base, r, alpha, use_rslora)
            base.requires_grad_(True)

    class BStartsRandom(LoraLinear):
        def __init__(self, base, r, alpha, use_rslora=False):
            super().__init__(base, r, alpha, use_rslora)
            nn.init.normal_(self.lora_B)

    class AStartsAtZero(LoraLinear):
        def __init__(self, base, r, alpha, use_rslora=False):
            super().__init__(base, r, alpha, use_rslora)
            nn.init.zeros_(self.lora_A)

    class Detached(LoraLinear):
        def forward(self, x):
            return self.base(x) + self.scaling * ((x @ self.lora_A.detach().T) @ self.lora_B.T)

    class PlainTensor(LoraLinear):
        def __init__(self, base, r, alpha, use_rslora=False):
            super().__init__(base, r, alpha, use_rslora)
            del self.lora_B
            self.lora_B = torch.zeros(base.out_features, r)

    fails_with(checks.lora_linear, NoRsLora, hint="rsLoRA's", seed=seed)
    fails_with(checks.lora_linear, BaseTrains, hint="freezes the base layer", seed=seed)
    fails_with(checks.lora_linear, BStartsRandom, hint="B starts at zero", seed=seed)
    fails_with(checks.lora_linear, AStartsAtZero, hint="A must start random", seed=seed)
    fails_with(checks.lora_linear, Detached, hint="no gradient reached", seed=seed)
    fails_with(checks.lora_linear, PlainTensor, hint="as an nn.Parameter", seed=seed)


# ----------------------------------------------------------------------------- plain-words failures

def test_not_implemented_yet_is_reported_as_such():
    class Placeholder(nn.Module):
        def __init__(self, *args):
            super().__init__()
            raise NotImplementedError()

    for check, answer in [(checks.lora_param_count, placeholder), (checks.lora_forward, placeholder),
                          (checks.wrapped_modules, placeholder), (checks.lora_linear, Placeholder)]:
        message = fails_with(check, answer, hint="is not implemented yet")
        assert "Hint:" in message
    fails_with(checks.merge_unmerge, placeholder, placeholder, hint="merge_weight is not implemented yet")
    fails_with(checks.merge_unmerge, merge_weight, placeholder, hint="unmerge_weight is not implemented yet")


def test_an_exception_in_student_code_is_one_line_naming_it_and_its_line():
    def transposed_A(x, W, b, A, B, alpha, r):
        h = x @ A  # A is (r, d_in): this needs A.T
        return x @ W.T + b + alpha / r * h @ B.T

    message = fails_with(checks.lora_forward, transposed_A, hint="lora_forward raised RuntimeError")
    assert "(line " in message and "`h = x @ A  # A is (r, d_in): this needs A.T`" in message
    assert "\n" not in message and "Traceback" not in message
    assert "Hint: h = W x + b" in message


def test_wrong_shape_and_wrong_dtype_are_named():
    fails_with(checks.lora_forward, lambda *args: forward_unfused(*args)[..., :-1], hint="has the wrong shape: expected")
    fails_with(checks.lora_forward, lambda *args: forward_unfused(*args).float(), hint="has the wrong dtype: expected torch.float64")
    fails_with(checks.lora_forward, lambda *args: forward_unfused(*args).tolist(), hint="should be a torch.Tensor, got list")
    fails_with(checks.merge_unmerge, lambda *args: merge_weight(*args)[:-1], unmerge_weight, hint="has the wrong shape")


def test_exercise_error_is_an_assertion_shown_without_traceback():
    error = ExerciseError("lora_forward is not implemented yet.")
    assert isinstance(error, AssertionError)
    assert error._render_traceback_() == ["ExerciseError: lora_forward is not implemented yet."]


# ============================================================================= lesson 02: QLoRA and NF4

def nf4_storage_bytes(numel, blocksize, double_quant):
    blocks, codes = -(-numel // blocksize), -(-numel // 2)
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // 256) + 4  # uint8 absmax, a float32 scale per 256 blocks, the mean


def nf4_codes(block, levels):
    scaled = block / block.abs().max()
    return (scaled.unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)


def pack_codes(codes):
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed, n):
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]


def dequantize_nf4(packed, absmax, shape, blocksize, levels):
    n = math.prod(shape)
    return (levels[unpack_codes(packed, n).long()] * absmax.repeat_interleave(blocksize)[:n]).view(shape)


def qlora_forward(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
    W = dequantize_nf4(packed, absmax, shape, blocksize, levels)
    return x @ W.T + (alpha / r) * ((x @ A.T) @ B.T)


def dequantize_with_package(packed, absmax, shape, blocksize, levels):
    return ml.dequantize(ml.NF4Tensor(packed, absmax, torch.Size(shape), torch.float32, blocksize))


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_02_right_answers_pass(seed, capsys):
    checks.nf4_storage_bytes(nf4_storage_bytes, seed=seed)
    checks.nf4_codes(nf4_codes, seed=seed)
    checks.pack_unpack(pack_codes, unpack_codes, seed=seed)
    checks.dequantize_nf4(dequantize_nf4, seed=seed)
    checks.dequantize_nf4(dequantize_with_package, seed=seed)
    checks.qlora_forward(qlora_forward, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 6
    assert "(4.500 bits per weight)" in lines[1] and "(4.127 bits per weight)" in lines[1]


def test_lesson_02_checks_leave_the_global_random_state_alone():
    with global_random_state_unchanged():
        checks.nf4_codes(nf4_codes)
        checks.qlora_forward(qlora_forward)


# ----------------------------------------------------------------------------- 1. bytes of a 4-bit weight

@pytest.mark.parametrize("seed", SEEDS)
def test_storage_rejects_common_mistakes(seed):
    def absmax_rounded_down(numel, blocksize, dq):  # a partial last block forgotten
        blocks = numel // blocksize
        return -(-numel // 2) + (blocks + 4 * -(-blocks // 256) + 4 if dq else 4 * blocks)

    def no_offset(numel, blocksize, dq):
        return nf4_storage_bytes(numel, blocksize, dq) - (4 if dq else 0)

    def no_second_scales(numel, blocksize, dq):
        blocks = -(-numel // blocksize)
        return nf4_storage_bytes(numel, blocksize, dq) - (4 * -(-blocks // 256) if dq else 0)

    def fp32_absmax_always(numel, blocksize, dq):
        return nf4_storage_bytes(numel, blocksize, False)

    def one_byte_per_code(numel, blocksize, dq):
        return nf4_storage_bytes(numel, blocksize, dq) + numel // 2

    def fp16_absmax(numel, blocksize, dq):
        return -(-numel // 2) + 2 * -(-numel // blocksize)

    fails_with(checks.nf4_storage_bytes, absmax_rounded_down, hint="partial block", seed=seed)
    fails_with(checks.nf4_storage_bytes, no_offset, hint="mean of the absmax values", seed=seed)
    fails_with(checks.nf4_storage_bytes, no_second_scales, hint="one per group of 256", seed=seed)
    fails_with(checks.nf4_storage_bytes, fp32_absmax_always, hint="stored in 8 bits, not 32", seed=seed)
    fails_with(checks.nf4_storage_bytes, one_byte_per_code, hint="two 4-bit codes share one byte", seed=seed)
    fails_with(checks.nf4_storage_bytes, fp16_absmax, hint="float32, 4 bytes", seed=seed)
    message = fails_with(checks.nf4_storage_bytes, lambda *a: nf4_storage_bytes(*a) + 1, hint="count each stored",
                         seed=seed)
    assert "too many" in message and "expected" not in message  # says what is wrong, not the answer


def test_storage_must_be_an_int():
    fails_with(checks.nf4_storage_bytes, lambda *a: float(nf4_storage_bytes(*a)), hint="whole number of bytes")


def test_storage_odd_count_needs_its_byte():
    fails_with(checks.nf4_storage_bytes, lambda n, bs, dq: nf4_storage_bytes(n, bs, dq) - n % 2,
               hint="an odd number of codes")


# ----------------------------------------------------------------------------- 2. the nearest NF4 level

@pytest.mark.parametrize("seed", SEEDS)
def test_codes_reject_common_mistakes(seed):
    def unscaled(block, levels):
        return (block.unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)

    def by_max(block, levels):  # the largest value, which is not the largest |value| when that one is negative
        return ((block / block.max()).unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)

    def int4(block, levels):
        return ((block / block.abs().max() * 7).round() + 7).to(torch.uint8)

    def next_level_up(block, levels):
        return torch.bucketize(block / block.abs().max(), levels).clamp(max=15).to(torch.uint8)

    fails_with(checks.nf4_codes, unscaled, hint="scale the block into [-1, 1] first", seed=seed)
    fails_with(checks.nf4_codes, by_max, hint="furthest from zero is negative", seed=seed)
    fails_with(checks.nf4_codes, int4, hint="15 evenly spaced levels, like int4", seed=seed)
    fails_with(checks.nf4_codes, next_level_up, hint="not the next one up", seed=seed)
    fails_with(checks.nf4_codes, lambda b, levels: nf4_codes(b, levels).long(), hint="expected torch.uint8", seed=seed)


# ----------------------------------------------------------------------------- 3. two codes per byte

@pytest.mark.parametrize("seed", SEEDS)
def test_packing_rejects_common_mistakes(seed):
    def low_nibble_first(codes):
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), 7)])
        return (codes[1::2] << 4) | codes[0::2]

    def zero_padding(codes):
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        return (codes[0::2] << 4) | codes[1::2]

    def no_padding(codes):
        codes = codes[: codes.numel() - codes.numel() % 2]
        return (codes[0::2] << 4) | codes[1::2]

    def unpack_low_first(packed, n):
        return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]

    def unpack_keeps_padding(packed, n):
        return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)

    fails_with(checks.pack_unpack, low_nibble_first, unpack_codes, hint="goes in the high nibble", seed=seed)
    fails_with(checks.pack_unpack, zero_padding, unpack_codes, hint="code 0 is the level -1", seed=seed)
    fails_with(checks.pack_unpack, no_padding, unpack_codes, hint="the last code is missing", seed=seed)
    fails_with(checks.pack_unpack, pack_codes, unpack_low_first, hint="high nibble holds the first code", seed=seed)
    fails_with(checks.pack_unpack, pack_codes, unpack_keeps_padding, hint="drop the padding code", seed=seed)


# ----------------------------------------------------------------------------- 4. dequantising

@pytest.mark.parametrize("seed", SEEDS)
def test_dequantize_rejects_common_mistakes(seed):
    def no_absmax(packed, absmax, shape, blocksize, levels):
        return levels[unpack_codes(packed, math.prod(shape)).long()].view(shape)

    def divides(packed, absmax, shape, blocksize, levels):
        n = math.prod(shape)
        return (levels[unpack_codes(packed, n).long()] / absmax.repeat_interleave(blocksize)[:n]).view(shape)

    def low_nibble_first(packed, absmax, shape, blocksize, levels):
        n = math.prod(shape)
        codes = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n].long()
        return (levels[codes] * absmax.repeat_interleave(blocksize)[:n]).view(shape)

    def tiled_absmax(packed, absmax, shape, blocksize, levels):
        n = math.prod(shape)
        return (levels[unpack_codes(packed, n).long()] * absmax.repeat(-(-n // absmax.numel()))[:n]).view(shape)

    fails_with(checks.dequantize_nf4, no_absmax, hint="the levels alone", seed=seed)
    fails_with(checks.dequantize_nf4, divides, hint="undo that division", seed=seed)
    fails_with(checks.dequantize_nf4, low_nibble_first, hint="high nibble of each byte", seed=seed)
    fails_with(checks.dequantize_nf4, tiled_absmax, hint="consecutive values share", seed=seed)
    fails_with(checks.dequantize_nf4, lambda *a: dequantize_nf4(*a).flatten(), hint="has the wrong shape", seed=seed)


# ----------------------------------------------------------------------------- 5. the QLoRA forward

@pytest.mark.parametrize("seed", SEEDS)
def test_qlora_forward_rejects_common_mistakes(seed):
    def levels_only(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
        return qlora_forward(x, packed, torch.ones_like(absmax), shape, blocksize, levels, A, B, alpha, r)

    def no_scaling(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
        return qlora_forward(x, packed, absmax, shape, blocksize, levels, A, B, r, r)

    def no_update(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
        return x @ dequantize_nf4(packed, absmax, shape, blocksize, levels).T

    def detached(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
        return qlora_forward(x, packed, absmax, shape, blocksize, levels, A.detach(), B.detach(), alpha, r)

    def transposed_update(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r):
        W = dequantize_nf4(packed, absmax, shape, blocksize, levels)
        return x @ W.T + (alpha / r) * ((x @ B) @ A)  # the first trial is square

    fails_with(checks.qlora_forward, levels_only, hint="absmax of each block", seed=seed)
    fails_with(checks.qlora_forward, no_scaling, hint="missing its scaling", seed=seed)
    fails_with(checks.qlora_forward, no_update, hint="update is missing", seed=seed)
    fails_with(checks.qlora_forward, detached, hint="no gradient reached A", seed=seed)
    fails_with(checks.qlora_forward, transposed_update, hint="the update is transposed", seed=seed)


def test_lesson_02_not_implemented_yet_is_reported_as_such():
    for check, answers in [(checks.nf4_storage_bytes, [placeholder]), (checks.nf4_codes, [placeholder]),
                           (checks.dequantize_nf4, [placeholder]), (checks.qlora_forward, [placeholder]),
                           (checks.pack_unpack, [placeholder, unpack_codes])]:
        message = fails_with(check, *answers, hint="is not implemented yet")
        assert "Hint:" in message
    fails_with(checks.pack_unpack, pack_codes, placeholder, hint="unpack_codes is not implemented yet")
