"""QLoRA: LoRA on a frozen base whose weights are stored in 4-bit NF4 (Dettmers et al. 2023, "QLoRA", section 3).

    Y = X · dequant(W_NF4)^T + s · (X A^T) B^T        (paper eq. 5, with A, B in the compute dtype)

            x ─────────────────────┬──────────────────────┐
                                   │                      │
                    ┌──────────────┴───────────┐     ┌────┴────┐
                    │ W: 4-bit codes + absmax  │     │ A  r×in │
                    │ dequantised on the fly   │     └────┬────┘
                    │ (compute dtype), frozen  │     ┌────┴────┐
                    └──────────────┬───────────┘     │ B out×r │
                                   └──────── + ──────┴─────────┘ × s

The base never exists in full precision for longer than one matrix product: the forward dequantises W, uses
it and drops it; the backward needs W again for the input gradient (g W) and dequantises a second time. Only
the 4-bit codes stay in memory, and gradients flow through the frozen base into the adapters of earlier
layers. "The 4-bit weights are the storage data type, the compute data type is BF16" (section 3): here
`compute_dtype` is whatever the model runs in (fp32 on CPU, bf16 on a GPU).

Merging: adding s B A to a 4-bit weight means dequantising, adding and re-quantising, which rounds the sum to
the 16 levels again; `LoraLinear4bit.merge` records that error. Merging into a full-precision copy of the base
(`dequantize_model`, then `merge_and_unload`) is exact.

Reference: peft's LoRA over `bitsandbytes.nn.Linear4bit` (tests/reference/test_qlora_peft.py).
"""

import torch
import torch.nn as nn

from .base import at_least_fp32, is_conv1d
from .lora import LoraLayer
from .nf4 import NF4Tensor, dequantize, quantize


class LinearNF4(torch.autograd.Function):
    """y = x W^T + b with W dequantised in the forward and again in the backward, never saved between them."""

    @staticmethod
    def forward(ctx, x, weight_fn, bias):
        ctx.weight_fn = weight_fn
        return nn.functional.linear(x, weight_fn(), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight_fn() if ctx.needs_input_grad[0] else None  # (..., out) @ (out, in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None  # bias="all"
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is held as NF4 codes. The codes and scales are buffers, so
    `state_dict()` and `.to(device)` carry them; the weight is never a parameter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
                 blocksize: int = 64, double_quant: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit takes an (out, in) weight, got shape {tuple(weight.shape)}.")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        self.set_weight(weight, blocksize, double_quant)
        bias = None if bias is None else bias.detach().to(self.compute_dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                    double_quant: bool = False) -> "Linear4bit":
        """From an nn.Linear, or a GPT-2 Conv1D (weight stored (in, out): quantised as its (out, in) transpose)."""
        weight = linear.weight.detach()
        return cls(weight.T if is_conv1d(linear) else weight, linear.bias, compute_dtype, blocksize, double_quant)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, blocksize: int | None = None, double_quant: bool | None = None,
                   dtype: torch.dtype | None = None) -> None:
        """(Re-)quantise an (out, in) weight; block size, double quantisation and dtype default to the current."""
        old = getattr(self, "packed", None) is not None
        weight = weight.detach()
        if weight.dtype == torch.float64:  # a float64 layer's merge or PiSSA residual: NF4 codes come from fp32 anyway
            weight = weight.float()
        q = quantize(weight, blocksize or self.blocksize,
                     self.double_quant if double_quant is None else double_quant)
        q.dtype = dtype or (self.weight_dtype if old else weight.dtype)
        for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
            self.register_buffer(name, getattr(q, name))
        self.blocksize, self.weight_dtype = q.blocksize, q.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def weight(self) -> NF4Tensor:
        """The quantised weight (it has `.shape`, `.dtype`, `.device` and `.nbytes` like a tensor)."""
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.absmax_scale, self.absmax_offset)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, `.double()` set the compute dtype (the bias follows); the NF4 scales belong to
        the codes and stay float32, only changing device (like bitsandbytes' quantisation state)."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed.device))  # where fn sends a tensor
        scales = {name: self._buffers.pop(name) for name in ("absmax", "absmax_scale", "absmax_offset")}
        super()._apply(fn, recurse)
        for name, t in scales.items():
            self._buffers[name] = None if t is None else t.to(probe.device)
        self.compute_dtype = probe.dtype
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """W in the compute dtype, (out, in): a new tensor each call."""
        return dequantize(self.weight).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = LinearNF4.apply(x.to(self.compute_dtype), self.dequantized_weight, self.bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class LoraLinear4bit(LoraLayer):
    """LoRA over a `Linear4bit`: the same adapters, scaling and file format as `LoraLayer`; the base is read
    by dequantising and written by re-quantising."""

    base_types = (Linear4bit,)

    def __init__(self, base_layer: Linear4bit):
        super().__init__(base_layer)
        self.requantization_error: dict[str, float] = {}  # per merged adapter: ||Q(W + dW) - (W + dW)|| / ||W + dW||

    def base_dtype_device(self):
        return self.base_layer.compute_dtype, self.base_layer.packed.device

    def base_weight_out_in(self) -> torch.Tensor:
        return dequantize(self.base_layer.weight)

    def set_base_weight_out_in(self, weight: torch.Tensor) -> None:
        self.base_layer.set_weight(weight)

    def frozen_weight(self):
        return self.base_layer.dequantized_weight  # a function: the fused node dequantises when it needs W

    def base_is_frozen_linear(self) -> bool:
        return True

    def merged_weights(self, name: str) -> tuple[torch.Tensor, None]:
        """dequantize(W_NF4) + Delta W in at least fp32, (out, in): the sum `merge` re-quantises, and what
        inject's safe_merge checks for NaN/Inf before any layer is written."""
        return at_least_fp32(self.base_weight_out_in()) + self.delta_weight(name), None

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W_NF4 <- quantize(dequantize(W_NF4) + s B A): lossy; the relative error of the re-quantised sum
        against the exact one is kept in `requantization_error[name]`."""
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            if self.lora_B[name].bias is not None:
                raise ValueError(f"adapter {name!r} has lora_bias; merging a bias into a 4-bit base is not supported. "
                                 "Merge into a full-precision copy instead: merge_and_unload(dequantize_model(model)).")
            exact, _ = self.merged_weights(name)
            if safe_merge and not exact.isfinite().all():
                raise ValueError(f"merging adapter {name!r} gives NaN/Inf weights; the base was left untouched.")
            self.set_base_weight_out_in(exact)
            got = at_least_fp32(self.base_weight_out_in())
            self.requantization_error[name] = ((got - exact).norm() / exact.norm()).item()
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters and re-quantise: this does not restore the original codes exactly."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.set_base_weight_out_in(at_least_fp32(self.base_weight_out_in()) - self.delta_weight(name))
            self.requantization_error.pop(name, None)


def _replace(model: nn.Module, make, should) -> nn.Module:
    """Swap every module m with should(name, m) for make(m), from the leaves up, in place."""
    for name, module in list(model.named_modules()):
        if name and should(name, module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


def quantize_model(model: nn.Module, compute_dtype: torch.dtype | None = None, skip: list[str] | tuple = ("lm_head",),
                   blocksize: int = 64, double_quant: bool = False) -> nn.Module:
    """Replace every nn.Linear (ours or a Hugging Face model's, GPT-2's Conv1D too) by a `Linear4bit`, in place,
    and return the model.

    `skip` lists module names, or `.name` suffixes, kept in full precision (the output head by default, as in
    bitsandbytes' Hugging Face integration). `compute_dtype` defaults to each layer's own dtype. The rest of the
    model (embeddings, norms) is untouched. Adapters go on top with `inject`, as on any base."""
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("quantize the base before injecting adapters: quantize_model(model), then inject(model, ...).")
    skip = [skip] if isinstance(skip, str) else list(skip)

    def should(name, module):
        return (type(module) is nn.Linear or is_conv1d(module)) and not any(name == s or name.endswith("." + s) for s in skip)

    _replace(model, lambda m: Linear4bit.from_linear(m, compute_dtype, blocksize, double_quant), should)
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError(f"no nn.Linear of {type(model).__name__} was quantised (skip={skip}).")
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `Linear4bit` by an nn.Linear holding the dequantised weight (in `dtype`, default the layer's
    compute dtype), in place; LoRA layers on them become plain `LoraLayer`s with the same adapters. The model then
    computes what the 4-bit one did, and `merge_and_unload` on it is exact."""
    def to_linear(m: Linear4bit) -> nn.Linear:
        d = dtype or m.compute_dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.packed.device, dtype=d)
        lin.weight.data = dequantize(m.weight).to(d)
        if m.bias is not None:
            lin.bias.data = m.bias.data.to(d)
        lin.requires_grad_(False)
        return lin

    def to_lora(layer: LoraLinear4bit) -> LoraLayer:
        # the same adapters over a plain base: only the class and the base layer change
        layer.__class__ = LoraLayer
        layer.base_layer = to_linear(layer.base_layer)
        del layer.requantization_error
        return layer

    _replace(model, to_lora, lambda n, m: isinstance(m, LoraLinear4bit))
    return _replace(model, to_linear, lambda n, m: isinstance(m, Linear4bit))
