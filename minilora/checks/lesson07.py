"""Checkers for lesson 07 (token-level mixture of LoRA experts)'s exercises (the machinery: core.py)."""

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from torch.overrides import TorchFunctionMode

from .core import call, checker, expect_tensor, ExerciseError, passed, _generator, _randint


def _adapters(g, n, d_in, d_out, ranks, dtype):
    """n random LoRA adapters (A_i (r_i, d_in), B_i (d_out, r_i), s_i), B non-zero so every update shows."""
    As = [torch.randn(r, d_in, generator=g, dtype=dtype) / d_in ** 0.5 for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g, dtype=dtype) for r in ranks]
    scalings = [float(_randint(g, 1, 8)) / _randint(g, 1, 4) for _ in range(n)]
    return As, Bs, scalings


def _task_adapters(module: str):
    """The committed task adapters' A_i, B_i (float64) and s_i at one module of decoder-base."""
    from minilora.task_adapters import adapter_dir
    from minilora.tasks import DECODER_TASKS

    As, Bs, scalings = [], [], []
    for task in DECODER_TASKS:
        path = adapter_dir(task)
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(str(path / "adapter_model.safetensors"))
        As.append(tensors[f"base_model.model.{module}.lora_A.weight"].double())
        Bs.append(tensors[f"base_model.model.{module}.lora_B.weight"].double())
        scalings.append(config["lora_alpha"] / config["r"])
    return As, Bs, scalings


def _weights(g, B, n, dtype):
    return torch.softmax(3 * torch.randn(B, n, generator=g, dtype=dtype), -1)


# ----------------------------------------------------------------------------- 1. the routing rule

TLE_HINT = ("only one similarity per row is changed before the softmax: the largest one. Everything else goes into "
            "the softmax as it is, and each row's weights sum to 1.")


@checker
def tle_weights(student_fn, seed: int | None = None) -> None:
    """Exercise 1: tle_weights(similarities (B, n), T) -> LoRA-TLE's weights (B, n)."""
    g = _generator(seed)
    for B, n, T, dtype in ((5, 4, 4.0, torch.float64), (3, 6, 1.7, torch.float32), (4, 3, 9.0, torch.float64)):
        s = torch.rand(B, n, generator=g, dtype=dtype) * 2 - 1
        s[0] = -s[0].abs()  # a row whose every similarity is negative: its top score times T gets smaller
        top = F.one_hot(s.argmax(-1), n).bool()
        want = torch.softmax(torch.where(top, s * T, s), -1)
        mistakes = [
            (torch.softmax(s * T, -1), "multiply only the largest similarity by T, not every one."),
            (torch.softmax(torch.where(top, s / T, s), -1), "the largest similarity is multiplied by T, not divided."),
            (torch.softmax(torch.where(top, s.abs() * T, s), -1), "keep the sign: the original multiplies the score "
                                                                  "itself, even when it is negative."),
            (torch.softmax(s, -1), "the largest similarity must be changed before the softmax."),
            (torch.where(top, s * T, s), "the weights come out of a softmax over each row."),
        ]
        got = call(student_fn, s.clone(), T, name="tle_weights", hint=TLE_HINT)
        expect_tensor(got, want, f"tle_weights (B={B}, n={n}, T={T})", mistakes, TLE_HINT)
    passed("tle_weights is LoRA-TLE's rule, negative top scores included.")


# ----------------------------------------------------------------------------- 2. exact mixing

MIX_HINT = ("each adapter adds its own update B_i (A_i x), scaled by its s_i and by the example's weight w_i, to the "
            "base's x W^T. Weights are per example (one row of w per row of x); never build a d_out x d_in matrix.")


def _exact(x, W, As, Bs, scalings, w):
    return x @ W.T + sum(w[:, i, None, None] * s * (x @ A.T) @ B.T for i, (A, B, s) in enumerate(zip(As, Bs, scalings)))


def _faithful_out(x, W, As, Bs, scalings, w):
    h = sum(w[:, i, None, None] * s * (x @ A.T) for i, (A, s) in enumerate(zip(As, scalings)))
    return x @ W.T + h @ sum(Bs).T


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
            torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.einsum, torch.addmm, torch.outer, torch.tensordot,
            F.linear}


class _WeightShapedProducts(TorchFunctionMode):
    """Records the matrix products whose result is d_out x d_in (or its transpose): a B_i A_i or a merged weight."""

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.shapes, self.found = {(d_out, d_in), (d_in, d_out)}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and isinstance(out, torch.Tensor) and out.dim() >= 2 and tuple(out.shape[-2:]) in self.shapes:
            self.found.append(getattr(func, "__name__", str(func)))
        return out


@checker
def mixed_lora_output(student_fn, seed: int | None = None) -> None:
    """Exercise 2: mixed_lora_output(x (B, T, d_in), W, As, Bs, scalings, w (B, n)) -> the exact mixture's output."""
    g = _generator(seed)
    for ranks, dtype in (([2, 3, 4], torch.float64), ([3, 3], torch.float32), ([1, 5, 2, 4], torch.float64)):
        n, B, T, d_in, d_out = len(ranks), 3, 5, 8, 6
        x = torch.randn(B, T, d_in, generator=g, dtype=dtype)
        W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
        As, Bs, scalings = _adapters(g, n, d_in, d_out, ranks, dtype)
        w = _weights(g, B, n, dtype)
        want = _exact(x, W, As, Bs, scalings, w)
        mistakes = [
            (_exact(x, W, As, Bs, [1.0] * n, w), "each adapter's update carries its own scaling s_i = alpha_i / r_i."),
            (_exact(x, W, As, Bs, scalings, w[:1].expand(B, n)), "every example has its own row of weights."),
            (_exact(x, W, As, Bs, scalings, torch.ones_like(w)), "weight each adapter's update by w_i."),
        ]
        if len(set(ranks)) == 1:
            mistakes.append((_faithful_out(x, W, As, Bs, scalings, w), "that is the original's summed A and B, with "
                             "cross terms B_j A_i; the exact mixture keeps each adapter's B_i with its own A_i."))
        with _WeightShapedProducts(d_out, d_in) as watch:
            got = call(student_fn, x.clone(), W.clone(), [a.clone() for a in As], [b.clone() for b in Bs],
                       list(scalings), w.clone(), name="mixed_lora_output", hint=MIX_HINT)
        expect_tensor(got, want, f"mixed_lora_output (ranks {ranks})", mistakes, MIX_HINT)
        if watch.found:
            raise ExerciseError(f"mixed_lora_output gives the right values but forms a d_out x d_in matrix "
                                f"({watch.found[0]} gave a {d_out} x {d_in} product). Hint: multiply x by A_i first; "
                                "the point of mixing in activation space is never to build B_i A_i or a merged W.")
    passed("mixed_lora_output is W x + sum_i w_i s_i B_i (A_i x), per example, for adapters of different ranks.")


# ----------------------------------------------------------------------------- 3. the original's combination

FAITHFUL_HINT = ("peft's old linear combination builds one new adapter: its A is a weighted sum of the scaled A_i, "
                 "its B the plain sum of the B_j, and its scaling is 1. Return the update that adapter applies.")


@checker
def faithful_delta_weight(student_fn, seed: int | None = None) -> None:
    """Exercise 3: faithful_delta_weight(As, Bs, scalings, w (n,)) -> the original's Delta W (d_out, d_in)."""
    g = _generator(seed)
    for n, r, dtype in ((3, 2, torch.float64), (4, 3, torch.float32), (2, 4, torch.float64)):
        d_in, d_out = 7, 5
        As, Bs, scalings = _adapters(g, n, d_in, d_out, [r] * n, dtype)
        w = _weights(g, 1, n, dtype)[0]
        A = sum(w[i] * s * a for i, (a, s) in enumerate(zip(As, scalings)))
        want = sum(Bs) @ A
        mistakes = [
            (sum(w[i] * s * b @ a for i, (a, b, s) in enumerate(zip(As, Bs, scalings))),
             "that is the exact weighted sum of the updates; the original's combination sums the B_j without "
             "weights, so every B_j meets every A_i."),
            (sum(w[i] * b for i, b in enumerate(Bs)) @ A, "the weights go on the A side only; the B_j are summed as "
                                                         "they are."),
            (sum(Bs) @ sum(w[i] * a for i, a in enumerate(As)), "each A_i carries its adapter's scaling s_i."),
        ]
        got = call(student_fn, [a.clone() for a in As], [b.clone() for b in Bs], list(scalings), w.clone(),
                   name="faithful_delta_weight", hint=FAITHFUL_HINT)
        expect_tensor(got, want, f"faithful_delta_weight (n={n}, r={r})", mistakes, FAITHFUL_HINT)
    passed("faithful_delta_weight is (sum_j B_j)(sum_i w_i s_i A_i), the original's combination.")
    As, Bs, scalings = _task_adapters("model.layers.0.self_attn.q_proj")
    w = torch.full((len(As),), 1 / len(As), dtype=torch.float64)
    got = call(student_fn, As, Bs, scalings, w, name="faithful_delta_weight", hint=FAITHFUL_HINT)
    exact = sum(w[i] * s * b @ a for i, (a, b, s) in enumerate(zip(As, Bs, scalings)))
    print(f"  the four task adapters' q_proj of layer 0, equal weights: ||faithful - exact|| / ||exact|| = "
          f"{float((got - exact).norm() / exact.norm()):.2f}")


# ----------------------------------------------------------------------------- 4. each position's weights

POSITIONS_HINT = ("with the KV cache, every forward feeds the positions it appends once, with the weights routed "
                  "for that step: the prompt's positions in step 0, then one generated token per step. Which step "
                  "feeds the k-th generated token?")


@checker
def position_weights(student_fn, seed: int | None = None) -> None:
    """Exercise 4: position_weights(history (steps, n), prompt_len) -> (prompt_len + steps - 1, n), the weights each
    position's keys and values were computed with."""
    g = _generator(seed)
    for steps, T, n in ((5, 3, 4), (2, 6, 3), (7, 1, 2)):
        history = _weights(g, steps, n, torch.float64)
        want = torch.cat([history[:1].expand(T, n), history[1:]])
        mistakes = [
            (torch.cat([history[:1].expand(T, n), history[:-1]]), "the k-th generated token is fed by the step after "
                                                                 "the one that chose it."),
            (history[-1:].expand(T + steps - 1, n), "that is the original's re-run: every position with the newest "
                                                     "weights. With the cache each position keeps its own."),
        ]
        got = call(student_fn, history.clone(), T, name="position_weights", hint=POSITIONS_HINT)
        expect_tensor(got, want, f"position_weights (steps={steps}, prompt_len={T})", mistakes, POSITIONS_HINT)
    passed("position_weights gives each position the weights of the step that fed it, as Mixture.position_weights.")
