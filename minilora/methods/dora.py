"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The pretrained weight W0 (out x in) is split into a magnitude m (one number per output feature) and a direction
that LoRA adapts, eq. (5), with the LoRA scaling s = alpha / r on B A as in peft:

    W' = m (W0 + s B A) / ||W0 + s B A||_c        ||.||_c: the norm of each row W_i (the paper's column of W^T)

            x ──────────────┬─────────────────┐
                            │                 │ dropout
                      ┌─────┴─────┐      ┌────┴────┐
                      │ W0 frozen │      │ A  r×in │
                      │  out × in │      └────┬────┘
                      └─────┬─────┘      ┌────┴────┐
                            │            │ B out×r │
                            │            └────┬────┘
                            └──── + ──────────┘ × s
                                  │
                   × m / ||W0 + s B A||_c      m: out, trainable; the norm detached (section 4.3)
                                  │ + bias
                                  h

m starts as ||W0 + s B A||_c (B = 0 unless PiSSA), so W' = W0 at injection. Section 4.3 treats the norm as
a constant, detached from the graph: m gets the gradient of the scale, B A only through the numerator.

peft adds the update to the base output h0 = W0 x + b instead of forming W' (`dora_update`):
    h = h0 + (m/n - 1) W0 x + (m/n) s B A x,    n = ||W0 + s B A||_c
With dropout active peft feeds x~ = dropout(x) to both terms and recomputes W0 x~ (a second base product),
so h = W0 x + b + (m/n - 1) W0 x~ + (m/n) s B A x~: the base path still sees the undropped x. Without
dropout the base product is reused, never computed twice; `FrozenLinearWithDora` then computes
h = (m/n) (W0 x + s B A x) + b in one autograd node (the same sum, rounded differently).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import at_least_fp32

CANCELLATION = 16.0  # weight_norm recomputes a row directly when its n^2 is this much below its terms' size


class Magnitude(nn.Module):
    """The magnitude vector m of one adapter, `weight` (out,): peft's `lora_magnitude_vector.<adapter>.weight`."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm.detach().clone())


def weight_norm_plain(W, A, B, scaling):
    """||W_i + s (B A)_i|| for every row i, forming the (out x in) matrix W + s B A: the reference formula."""
    return torch.linalg.norm(W + scaling * (B @ A), dim=1)


def weight_norm(W, A, B, scaling, w_sq=None):
    """||W_i + s B_i A|| without forming (out x in): with the Gram matrix A A^T (r x r) and W A^T (out x r),

        ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (A W_i^T) + s^2 B_i (A A^T) B_i^T.

    `w_sq` is ||W_i||^2 (e.g. from `SquaredRowNorms`). Cost: one pass over W (the product W A^T), against
    several for the plain formula. Rounding: each term carries an error of a few eps times its size, and the
    three are bounded by T_i = (||W_i|| + s ||B_i A||)^2, so n_i^2 is accurate to about eps T_i / n_i^2
    relative. That only matters when the update cancels the row (W_i + s B_i A much shorter than W_i
    and s B_i A): in float32 a row with T_i / n_i^2 = 10^4 would lose 4 of its ~7 digits, while usual DoRA
    training (s B A small beside W) has T_i / n_i^2 close to 1. Rows with T_i > CANCELLATION n_i^2 are
    therefore recomputed directly, as the plain formula does, whose error is a few eps times sqrt(T_i) / n_i
    instead of T_i / n_i^2: within about CANCELLATION eps unless the row cancels far more (checking costs a
    device sync on a GPU). The result is clamped at 0 before the square root."""
    if w_sq is None:
        w_sq = W.square().sum(1)
    WA = F.linear(A, W)  # (r, out) = A W^T
    cross = (B * WA.t()).sum(1)  # B_i . (A W_i^T)
    quad = ((B @ (A @ A.t())) * B).sum(1).clamp_min(0)  # ||B_i A||^2
    n_sq = w_sq + (2 * scaling) * cross + (scaling * scaling) * quad
    bound = (w_sq.sqrt() + scaling * quad.sqrt()).square()
    bad = (n_sq * CANCELLATION < bound).nonzero().squeeze(1)
    norm = n_sq.clamp_min(0).sqrt()
    if bad.numel():
        norm[bad] = weight_norm_plain(W[bad], A, B[bad], scaling)
    return norm


class SquaredRowNorms:
    """||W_i||^2 of a (frozen) weight, recomputed only when W changes.

    The key is W's data_ptr, `_version`, dtype, device, shape and strides: in-place updates (optimizer steps,
    load_state_dict, `copy_` under no_grad) bump `_version`, `.to()` and `weight.data = ...` change the pointer.
    Writes through `weight.data` bypass the version counter, so code that does them (merge, unmerge) calls
    `clear()`. Summed in float64 and rounded once to `dtype` (default W's): it is computed once per weight."""

    def __init__(self):
        self.key, self.value = None, None

    def clear(self) -> None:
        self.key, self.value = None, None

    @torch.no_grad()
    def __call__(self, W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (W.data_ptr(), W._version, W.dtype, W.device, tuple(W.shape), W.stride(), dtype)
        if key != self.key:
            self.value = W.to(torch.float64).square().sum(1).to(dtype or W.dtype)
            self.key = key
        return self.value


def dora_update(x, base_result, weight, A, B, scaling, magnitude, norm):
    """peft's DoraLinearLayer.forward: the update to add to the base output, with n = `norm` detached,

        (m/n - 1) base_result + (m/n) s B A x.

    `base_result` is W x without the bias (the base output minus its bias); None computes it from x, as peft
    does when x is the dropped input."""
    mag_norm_scale = (magnitude / norm.detach()).view(-1)  # broadcasts over any leading dims; a 1-D x stays 1-D, as nn.Linear
    if base_result is None:
        base_result = F.linear(x, weight.to(x.dtype))
    lora_result = F.linear(F.linear(x, A), B)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class FrozenLinearWithDora(torch.autograd.Function):
    """h = (m/n) (x W^T + s (x A^T) B^T) + b with W, b frozen and n given (detached), backward by hand.

    Against autograd through `dora_update`, this saves the elementwise passes over (tokens x out) activations:
    the forward is the LoRA node's two GEMMs plus one scaling pass; the backward folds m/n into the small
    factors (s (m/n) B, and whichever of W or the incoming gradient is smaller) and adds one reduction for
    dL/dm = sum_tokens g (W x + s B A x) / n. Saved for backward beyond LoRA: the pre-scale output z."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = F.linear(x2, lora_A)  # (N, r)
        z = F.linear(x2, weight).addmm_(h, lora_B.t(), alpha=scaling)  # (W + s B A) x, (N, out)
        scale = magnitude / norm
        y = z * scale if bias is None else torch.addcmul(bias, z, scale)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h, z, scale, norm)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, W, A, B, h, z, scale, norm = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        c = scale * ctx.scaling  # s m / n
        g_h = g @ (B * c[:, None]).t().contiguous().t()  # s (g (m/n)) B, (N, r); row-major (r, out) is faster
        grad_x = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:  # (g (m/n)) W + g_h A, scaling the smaller of g and W
            gW = g @ (W * scale[:, None]) if g.shape[0] > W.shape[1] else (g * scale) @ W
            grad_x = gW.addmm_(g_h, A).view(*grad.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_A = g_h.t() @ x2  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = (h.t() @ g).mul_(c).t().contiguous()  # s (m/n) g^T h, as (h^T g)^T
        if ctx.needs_input_grad[5]:
            grad_m = (g * z).sum(0) / norm
        return grad_x, None, None, grad_A, grad_B, grad_m, None, None


def merge_weight(W, delta, magnitude, W_unmerged=None):
    """W' = (m/n) (W + Delta W) with n = ||W_unmerged + Delta W||_c, all (out, in); returns (W', n).

    peft takes n from the base weight without the adapters merged before (`W_unmerged`, default W), the one
    the forward pass sees, and keeps n to undo the merge: `unmerge_weight`."""
    n = torch.linalg.norm((W if W_unmerged is None else W_unmerged) + delta, dim=1)
    return (magnitude / n).unsqueeze(1) * (W + delta), n


def unmerge_weight(W_merged, delta, magnitude, norm):
    """W = W' / (m/n) - Delta W, with n the norm `merge_weight` returned."""
    return W_merged / (magnitude / norm).unsqueeze(1) - delta


# ----------------------------------------------------------------------------- inside a LoraLayer (lora.py calls these)

@torch.no_grad()
def add_magnitude(layer, name: str) -> None:
    """m = ||W + s B A||_c once A and B are initialised (peft's DoraLinearLayer.update_layer), so W' = W."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    W = layer.base_weight_out_in().to(A.dtype)
    layer.lora_magnitude_vector[name] = Magnitude(weight_norm_plain(W, A, B, layer.scaling[name]))


def unmerged_base_weight(layer) -> torch.Tensor:
    """The base weight with every merged adapter taken out again, last merged first: (out, in), at least fp32."""
    weight = at_least_fp32(layer.base_layer.weight)
    for name in reversed(layer.merged_adapters):
        weight = layer.unmerged_weight(name, weight)
    return weight.T if layer.fan_in_fan_out else weight


@torch.no_grad()
def layer_norm(layer, name: str) -> torch.Tensor:
    """n = ||W + s B A||_c of adapter `name` (detached), W the base weight with no adapter merged into it: the
    weight peft's forward and merge normalise by; in the adapter's dtype, autocast or not. The plain formula
    when `layer.fused` is False."""
    A, B, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    if layer.merged_adapters:
        W, w_sq = unmerged_base_weight(layer).to(A.dtype), None
    else:
        W = layer.base_weight_out_in()
        w_sq = layer.dora_w_sq(W, A.dtype)
        W = W.to(A.dtype)
    if W.is_meta:  # a memory estimate: no values and no autocast state; under no_grad nothing is saved either way
        return weight_norm_plain(W, A, B, s)
    with torch.autocast(W.device.type, enabled=False):
        return weight_norm(W, A, B, s, w_sq) if layer.fused else weight_norm_plain(W, A, B, s)


def layer_update(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """peft's DoraLinearVariant.forward: the update to `result` (the output so far, other adapters' updates
    included, as in peft) for x in the adapter's dtype. Without dropout the base product is result - bias."""
    dropout, bias = layer.lora_dropout[name], getattr(layer.base_layer, "bias", None)
    if isinstance(dropout, nn.Identity) or not layer.training:
        base_result = result if bias is None else result - bias
    else:
        x, base_result = dropout(x), None
    return dora_update(x, base_result, layer.base_weight_out_in(), layer.lora_A[name].weight,
                       layer.lora_B[name].weight, layer.scaling[name], layer.lora_magnitude_vector[name].weight,
                       layer_norm(layer, name))


def layer_fused_forward(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The whole layer's output through `FrozenLinearWithDora` (LoraLayer.fusable said it may)."""
    return FrozenLinearWithDora.apply(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A[name].weight,
                                      layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight,
                                      layer_norm(layer, name), layer.scaling[name])


@torch.no_grad()  # the norm kept for the unmerge must not hold on to an autograd graph
def layer_merged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """(m/n)(W + Delta W) for `weight` W (stored layout, at least fp32), n from the unmerged base and kept in
    `layer.dora_merge_norm[name]` for the unmerge."""
    t = (lambda w: w.T) if layer.fan_in_fan_out else (lambda w: w)
    W0 = unmerged_base_weight(layer) if layer.merged_adapters else None
    merged, layer.dora_merge_norm[name] = merge_weight(t(weight), t(layer.delta_weight(name)),
                                                       layer.lora_magnitude_vector[name].weight, W0)
    return t(merged)


def layer_unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """W = W' / (m/n) - Delta W for `weight` W' (stored layout, at least fp32), with the n of the merge."""
    t = (lambda w: w.T) if layer.fan_in_fan_out else (lambda w: w)
    return t(unmerge_weight(t(weight), t(layer.delta_weight(name)), layer.lora_magnitude_vector[name].weight,
                            layer.dora_merge_norm[name]))
