"""Checkers for lesson 03 (DoRA)'s exercises (the machinery and how to write one: core.py)."""

import math

import torch
from torch.overrides import TorchFunctionMode

from minilora import LoraConfig, LoraLayer
from minilora.methods.dora import weight_norm_plain

from .core import (call, checker, ExerciseError, expect_differentiable, expect_parameters, expect_tensor,
                   parameter_grad, passed, _choice, _clones, _generator, _linear, _randint, _random_lora)
from .lesson01 import _scaling_mistakes


def _dora_layer(W, b, A, B, m, alpha, r) -> LoraLayer:
    """An ml.LoraLayer with a DoRA adapter holding exactly these W, b, A, B and m (the reference layer)."""
    layer = LoraLayer(_linear(W, b).requires_grad_(False))
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, target_modules=["layer"], use_dora=True))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        if m is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(m)
    return layer


def _random_dora(g, d_in, d_out, r, dtype=torch.float32):
    """W, b, A, B as for LoRA (an update about as large as W) and a trained-looking m: the row norms of
    W + s B A moved by up to 30%, so that leaving out m, or the norm, shows."""
    W, b, A, B = _random_lora(g, d_in, d_out, r, dtype)
    m = W.norm(dim=1) * (1 + 0.3 * (2 * torch.rand(d_out, generator=g, dtype=dtype) - 1))
    return W, b, A, B, m


def _rows(M: torch.Tensor) -> torch.Tensor:
    return M.norm(dim=1)


def _cols(M: torch.Tensor) -> torch.Tensor:
    return M.norm(dim=0)


# ----------------------------------------------------------------------------- 1. the magnitude at initialisation

MAGNITUDE_HINT = ("DoRA's magnitude has one entry per output feature of the layer, the Euclidean length of the "
                  "vector of weights that feeds that output. Which axis of nn.Linear's (d_out, d_in) weight is that?")


@checker
def dora_magnitude(student_fn, seed: int | None = None) -> None:
    """Exercise 1: dora_magnitude(W) -> the magnitude m that DoRA starts from, for W of shape (d_out, d_in)."""
    g = _generator(seed)
    trials = [(16, 16, torch.float32), (24, 40, torch.float32), (48, 32, torch.float32), (20, 12, torch.float64)]
    for d_in, d_out, dtype in trials:
        W, _, A, B = _random_lora(g, d_in, d_out, 2, dtype)
        want = _dora_layer(W, None, A, torch.zeros_like(B), None, 4.0, 2).lora_magnitude_vector["default"].weight.detach()
        got = call(student_fn, W.clone(), name="dora_magnitude", hint=MAGNITUDE_HINT)
        what = f"dora_magnitude for W of shape {tuple(W.shape)}"
        if isinstance(got, torch.Tensor) and got.shape == (d_out, 1):
            raise ExerciseError(f"{what} has the wrong shape: expected ({d_out},), got {tuple(got.shape)}. Hint: "
                                "the magnitude is a vector with one entry per output feature, not a column matrix.")
        mistakes = [
            (W.square().sum(dim=1), "that is the squared length of each row; the magnitude is the length itself."),
            (W.abs().sum(dim=1), "that is the sum of absolute values (the 1-norm); DoRA uses the Euclidean norm."),
        ]
        if d_in == d_out:
            mistakes.append((_cols(W), "that is one norm per input feature (a column of nn.Linear's weight). DoRA, "
                                       "like peft and the released code, takes one per output feature."))
        expect_tensor(got, want, what, mistakes, MAGNITUDE_HINT)
    passed(f"dora_magnitude gives the magnitude that ml.LoraConfig(use_dora=True) starts from, on {len(trials)} "
           "random weights.")


# ----------------------------------------------------------------------------- 2. the forward pass, norm detached

FORWARD_HINT = ("h = (m / n) * (W x + s B (A x)) + b with s = alpha / r, where n holds the norm of each row of "
                "the adapted weight W + s B A and is treated as a constant in the backward pass (section 4.3).")


def _expect_grads(got_x, got_A, got_B, got_m, layer, x_ref, where, wrong_grads=None):
    refs = {"x": (got_x, x_ref.grad), "A": (got_A, layer.lora_A["default"].weight.grad),
            "B": (got_B, layer.lora_B["default"].weight.grad),
            "m": (got_m, layer.lora_magnitude_vector["default"].weight.grad)}
    for name, (mine, ref) in refs.items():
        if mine.grad is None:
            raise ExerciseError(f"no gradient reached {name} ({where}). Hint: compute the output from {name} itself "
                                "with torch operations (no .detach(), .data or torch.no_grad() around it).")
        mistakes = []
        if wrong_grads is not None and name in wrong_grads:
            mistakes = [(wrong_grads[name], "the output is right, but the norm n receives a gradient: section 4.3 "
                                            "treats it as a constant, so that no gradient flows through it.")]
        expect_tensor(mine.grad, ref, f"the gradient of {name} ({where})", mistakes,
                      "the output must depend on x, A, B and m exactly as in the forward equation, with n constant.")


@checker
def dora_forward(student_fn, seed: int | None = None) -> None:
    """Exercise 2: dora_forward(x, W, b, A, B, m, alpha, r) -> h, differentiable in x, A, B and m."""
    g = _generator(seed)
    # (leading dims of x, square W, with bias)
    trials = [((6,), True, True), ((2, 3), False, True), ((5,), False, False), ((4,), True, False)]
    for lead, square, with_bias in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        d_in = _choice(g, [12, 16, 24])
        d_out = d_in if square else d_in + 4 * _randint(g, 1, 3)
        W, b, A, B, m = _random_dora(g, d_in, d_out, r)
        b = b if with_bias else None
        x = torch.randn(*lead, d_in, generator=g)
        layer = _dora_layer(W, b, A, B, m, alpha, r)
        x_ref = x.clone().requires_grad_(True)
        want = layer(x_ref)
        grad_out = torch.randn(want.shape, generator=g)
        (want * grad_out).sum().backward()

        x_in, A_in, B_in, m_in = (t.clone().requires_grad_(True) for t in (x, A, B, m))
        b_in = None if b is None else b.clone()
        got = call(student_fn, x_in, W.clone(), b_in, A_in, B_in, m_in, alpha, r, name="dora_forward",
                   hint=FORWARD_HINT)
        bias = 0 if b is None else b
        s = alpha / r
        with torch.no_grad():
            Wx, update = x @ W.T, (x @ A.T) @ B.T
            adapted = W + s * B @ A
            mistakes = [(Wx + s * update + bias, "that is LoRA's output: the magnitude m, and the division by the "
                                                 "norm, are missing."),
                        (m / _rows(W) * (Wx + s * update) + bias, "divide by the norm of the adapted weight "
                                                                  "W + s B A, which changes as A and B train, not "
                                                                  "of W alone."),
                        (m * (Wx + s * update) + bias, "the scale is m divided by the norm of each row of "
                                                       "W + s B A; the division is missing."),
                        (m / _rows(adapted) * (Wx + s * update + bias), "the bias is added after the rescaling, "
                                                                        "as in the equation (and peft)."),
                        (m / _rows(W + B @ A) * (Wx + s * update) + bias, "the norm is of the weight the layer "
                                                                          "uses, W + s B A, with the same scaling "
                                                                          "s as the update.")]
            for wrong, hint in _scaling_mistakes(alpha, r, lambda s_: s_):
                if not math.isclose(wrong, s):
                    mistakes.append((m / _rows(W + wrong * B @ A) * (Wx + wrong * update) + bias, hint))
            if square:
                mistakes.append((m / _cols(adapted) * (Wx + s * update) + bias,
                                 "n holds one norm per output feature, the rows of the (d_out, d_in) weight, not "
                                 "its columns."))
        what = f"dora_forward's output for x of shape {tuple(x.shape)}, W {d_out} x {d_in}"
        expect_tensor(got, want.detach(), what, mistakes, FORWARD_HINT)
        expect_differentiable(got, what, "A, B and m")
        (got * grad_out).sum().backward()
        # the gradients the common mistake gives: the exact gradient of eq. 5, with the norm in the graph
        Aw, Bw = (t.clone().requires_grad_(True) for t in (A, B))
        yw = m / _rows(W + s * Bw @ Aw) * (x @ W.T + s * (x @ Aw.T) @ Bw.T) + bias
        (yw * grad_out).sum().backward()
        _expect_grads(x_in, A_in, B_in, m_in, layer, x_ref, f"x of shape {tuple(x.shape)}, W {d_out} x {d_in}",
                      {"A": Aw.grad, "B": Bw.grad})
    passed(f"dora_forward matches ml.LoraLayer(use_dora=True) on {len(trials)} random layers: outputs and the "
           "gradients of x, A, B and m.")


# ----------------------------------------------------------------------------- 3. the row norm without W + s B A

NORM_HINT = ("expand ||W_i + s B_i A||^2 (B_i: row i of B) into three terms. ||W_i||^2 is given; the other two need "
             "only products that involve A, whose results are small (r x d_out, r x r), never d_out x d_in.")


class _WatchFullSize(TorchFunctionMode):
    """Notes whether any operation in the block made a new tensor of the weight's full size (views of the inputs,
    such as W.T, do not count)."""

    def __init__(self, shapes, inputs):
        super().__init__()
        self.shapes, self.seen = shapes, False
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if (isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in self.inputs):
                self.seen = True
        return out


@checker
def dora_norm(student_fn, seed: int | None = None) -> None:
    """Exercise 3: dora_norm(w_sq, W, A, B, scaling) -> ||W_i + s B_i A|| per row, without a (d_out, d_in) tensor."""
    g = _generator(seed)
    trials = [(24, 40, torch.float32), (32, 20, torch.float32), (40, 56, torch.float64), (16, 28, torch.float32)]
    for d_in, d_out, dtype in trials:
        r = _choice(g, [2, 4, 8])
        s = _choice(g, [0.5, 2.0, 3.0])
        W, _, A, B = _random_lora(g, d_in, d_out, r, dtype)
        w_sq = W.square().sum(dim=1)
        want = weight_norm_plain(W, A, B, s)
        inputs = _clones(w_sq, W, A, B)
        watch = _WatchFullSize({(d_out, d_in), (d_in, d_out)}, inputs)
        with watch:
            got = call(student_fn, *inputs, s, name="dora_norm", hint=NORM_HINT)
        with torch.no_grad():
            cross = (B * (A @ W.T).T).sum(dim=1)  # B_i . (A W_i^T)
            quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||B_i A||^2
            mistakes = [
                ((w_sq + 2 * s * cross + s * s * quad), "that is the squared norm; take the square root."),
                ((w_sq + s * cross + s * s * quad).clamp_min(0).sqrt(), "the cross term of (a + b)^2 appears twice."),
                ((w_sq + 2 * s * cross + s * quad).clamp_min(0).sqrt(), "the update s B_i A enters the squared norm "
                                                                       "squared, so its own term carries s^2."),
                ((w_sq + 2 * s * cross + quad).clamp_min(0).sqrt(), "the update is s B_i A, scaled: its own term "
                                                                    "carries the scaling too."),
                ((2 * s * cross + s * s * quad).clamp_min(0).sqrt(), "the row of the pretrained weight, ||W_i||^2, is "
                                                                      "part of the norm."),
                ((s * s * quad).sqrt(), "that is the norm of the update alone; the pretrained row W_i belongs in it."),
            ]
        what = f"dora_norm for W of shape {tuple(W.shape)}, r = {r} ({dtype})"
        expect_tensor(got, want, what, mistakes, NORM_HINT)
        if watch.seen:
            raise ExerciseError(f"{what} has the right values, but your function makes a new {d_out} x {d_in} tensor "
                                "(W + s B A, B A, or a product with every entry of W): the point of this exercise is "
                                f"never to need one. Hint: {NORM_HINT}")
    passed(f"dora_norm equals ||W + s B A|| row by row on {len(trials)} random layers, without a (d_out, d_in) "
           "tensor.")


# ----------------------------------------------------------------------------- 4. merging

MERGE_HINT = ("the merged weight is the matrix DoRA's layer computes with: each row of W + s B A rescaled to "
              "the length that m gives it, with s = alpha / r.")


@checker
def dora_merge(student_fn, seed: int | None = None) -> None:
    """Exercise 4: dora_merge(W, A, B, m, alpha, r) -> the merged (d_out, d_in) weight."""
    g = _generator(seed)
    trials = [(16, True, torch.float32), (12, False, torch.float32), (20, False, torch.float64)]
    for d_in, square, dtype in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        d_out = d_in if square else d_in + 4 * _randint(g, 1, 3)
        W, _, A, B, m = _random_dora(g, d_in, d_out, r, dtype)
        layer = _dora_layer(W, None, A, B, m, alpha, r)
        with torch.no_grad():
            want = layer.merged_weights("default")[0].clone()
        got = call(student_fn, *_clones(W, A, B, m), alpha, r, name="dora_merge", hint=MERGE_HINT)
        s = alpha / r
        with torch.no_grad():
            adapted = W + s * B @ A
            mistakes = [
                (adapted, "that is LoRA's merge, W + s B A: DoRA also rescales every row to its magnitude."),
                (m[:, None] * adapted, "each row of W + s B A must first be divided by its own length, so that m "
                                       "alone sets it."),
                ((m / _rows(W))[:, None] * adapted, "divide by the length of each row of the adapted weight "
                                                    "W + s B A, not of W."),
                ((m / _rows(W + B @ A))[:, None] * (W + B @ A), "the update is scaled by s = alpha / r, in the "
                                                                "norm and in the weight."),
                (adapted / _rows(adapted)[:, None], "the direction alone has rows of length 1: multiply each by "
                                                    "its magnitude."),
            ]
            if square:
                mistakes.append(((m / _rows(adapted))[None, :] * adapted,
                                 "m / n has one entry per output feature, so it scales the rows of the (d_out, "
                                 "d_in) weight, not its columns."))
        expect_tensor(got, want, f"dora_merge's result for W of shape {tuple(W.shape)} ({dtype})", mistakes, MERGE_HINT)
    passed(f"dora_merge equals the merged weight of ml.LoraLayer(use_dora=True) on {len(trials)} random layers.")


# ----------------------------------------------------------------------------- 5. stretch: a DoRA layer

DORA_LINEAR_HINT = ("DoraLinear(base, r, alpha) keeps base frozen and holds three nn.Parameter: lora_A (r x d_in, "
                    "random), lora_B (d_out x r, zero) and magnitude (d_out,), set as in exercise 1. Its forward is "
                    "exercise 2's, with s = alpha / r.")


@checker
def dora_linear(student_cls, seed: int | None = None) -> None:
    """Exercise 5: a from-scratch DoRA linear module against ml.LoraLayer(use_dora=True)."""
    g = _generator(seed)
    trials = [True, False, True]  # with bias
    for with_bias in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        d_in = _choice(g, [16, 20, 24])
        d_out = d_in + 4 * _randint(g, 1, 3)
        W, b, A, B, m = _random_dora(g, d_in, d_out, r)
        b = b if with_bias else None
        x = torch.randn(2, 3, d_in, generator=g)
        base = _linear(W, b)
        name = f"DoraLinear(base, r={r}, alpha={alpha:g})"
        module = call(student_cls, base, r, alpha, name=name, hint=DORA_LINEAR_HINT)

        expect_parameters(module, name, {"lora_A": (r, d_in), "lora_B": (d_out, r), "magnitude": (d_out,)},
                          "nn.Parameter(tensor) registers a tensor as a trainable parameter of the module.",
                          DORA_LINEAR_HINT)
        trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        if trainable != ["lora_A", "lora_B", "magnitude"]:
            raise ExerciseError(f"{name} trains {trainable}, expected exactly lora_A, lora_B and magnitude. Hint: "
                                "DoRA freezes the base layer (requires_grad_(False) on its weight and bias) and "
                                "trains the adapter and the magnitude.")
        reference = _dora_layer(W, b, A, torch.zeros_like(B), None, alpha, r)
        expect_tensor(module.magnitude.detach(), reference.lora_magnitude_vector["default"].weight.detach(),
                      f"{name}.magnitude at initialisation", [(W.square().sum(dim=1), "the magnitude is the length "
                                                                                      "of each row, not its square.")],
                      "the magnitude starts as the length of each row of the pretrained weight, so that the layer "
                      "starts as the base.")
        with torch.no_grad():
            start = call(module, x, name="DoraLinear.forward", hint=DORA_LINEAR_HINT)
            expect_tensor(start, base(x), "DoraLinear's output at initialisation", [],
                          "with B = 0 and m the row norms of W, m / n is 1 and the layer computes exactly what the "
                          "base did.")
            if not module.lora_A.abs().sum() > 0:
                raise ExerciseError(f"{name}.lora_A starts at zero. Hint: A must start random (peft uses "
                                    "Kaiming-uniform); with A and B both zero, neither gets a gradient.")
            module.lora_A.copy_(A)  # pretend it has been trained
            module.lora_B.copy_(B)
            module.magnitude.copy_(m)
        layer = _dora_layer(W, b, A, B, m, alpha, r)
        want = layer(x)
        got = call(module, x, name="DoraLinear.forward", hint=DORA_LINEAR_HINT)
        s = alpha / r
        bias = 0 if b is None else b
        with torch.no_grad():
            Wx, update = x @ W.T, (x @ A.T) @ B.T
            mistakes = [(m / _rows(W + s * B @ A) * (Wx + bias + s * update),
                         "base(x) includes the bias, which is added after the rescaling: rescale W x + s B A x, "
                         "then add the bias."),
                        (m / _rows(W) * (Wx + s * update) + bias, "n is the norm of the rows of W + s B A, "
                                                                  "recomputed as A and B change.")]
        expect_tensor(got, want.detach(), f"{name}'s output", mistakes, DORA_LINEAR_HINT)
        grad_out = torch.randn(want.shape, generator=g)
        (want * grad_out).sum().backward()
        (got * grad_out).sum().backward()
        Aw, Bw = (t.clone().requires_grad_(True) for t in (A, B))
        yw = m / _rows(W + s * Bw @ Aw) * (x @ W.T + s * (x @ Aw.T) @ Bw.T) + bias
        (yw * grad_out).sum().backward()
        for attr, ref, wrong in (("lora_A", layer.lora_A["default"].weight, Aw), ("lora_B", layer.lora_B["default"].weight, Bw),
                                 ("magnitude", layer.lora_magnitude_vector["default"].weight, None)):
            grad = parameter_grad(module, name, attr)
            mistakes = [] if wrong is None else [(wrong.grad, "the norm n must not receive a gradient (section "
                                                              "4.3): detach it.")]
            expect_tensor(grad, ref.grad, f"the gradient of {attr}", mistakes,
                          "the output must depend on A, B and the magnitude exactly as in the forward equation.")
    passed("DoraLinear matches ml.LoraLayer(use_dora=True): it starts at the base model, trains A, B and the "
           "magnitude, and gives the same outputs and gradients.")
