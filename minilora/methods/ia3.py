"""IA³: infused adapter by inhibiting and amplifying inner activations.

Instead of adding an update to a frozen weight, IA³ rescales activations with learned vectors (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.3): keys
and values of attention, and the hidden activation of the feed-forward block,

    softmax(Q (l_k ⊙ K^T) / sqrt(d_k)) (l_v ⊙ V)        (l_ff ⊙ γ(W1 x)) W2       (x a row vector, as there)

so a layer either scales its output (k_proj: l_k ⊙ k) or, marked feed-forward, its input (down_proj is W2):

         output vector (k_proj, v_proj)              input vector (feed-forward: down_proj = W2)

                  x                                          h = γ(W1 x)
                  │                                          │
            ┌─────┴─────┐                                    ⊙ ── l_ff  (1 × in), ones at init
            │ W  frozen │                                    │
            │  out × in │                              ┌─────┴─────┐
            └─────┬─────┘                              │ W2 frozen │
                  ⊙ ── l  (out × 1), ones at init      │  out × in │
                  │                                    └─────┬─────┘
                  y                                          y

The vectors start at ones, so the wrapped model computes exactly what the base did; a layer trains d_out (or
d_in) numbers. Scaling commutes with the matmul, so merging folds l into W: W' = l ⊙ W (rows for an
output vector, also scaling the bias; columns for an input vector). Several active adapters multiply.

Numerics follow peft 0.21's `ia3.Linear` (same casts, product order, merge and unmerge), which
tests/reference/test_ia3_peft.py checks. peft's unmerge divides by l + 1e-8 so that a zero in l does not divide
by zero: in float64 that shifts the result by 1e-8 / l relative; in float32 l + 1e-8 rounds to l for |l| > 0.17,
and (W ⊙ l) / l is W only to an ulp. So unmerge is close, not exact (and ill-posed where l is near zero).

Deliberate differences from peft: `feedforward_modules` matches like `target_modules` (exact name or ".name"
suffix), where peft uses a bare suffix ("proj" would mark "down_proj" and "k_proj"); None means no feed-forward
module (peft fills in a per-architecture default or raises), and is written to files as [].
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .base import (PEFT_FORMAT_VERSION, AdapterLayer, check_modules_to_save, check_peft_dict, check_target_list,
                   in_out_features, is_conv1d, name_matches)

# Every field peft 0.21 writes for an IA3 adapter, with its default value.
PEFT_DEFAULTS = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "peft_version": PEFT_FORMAT_VERSION, "revision": None, "target_modules": None,
    "task_type": None,
}


@dataclass
class IA3Config:
    """Which layers get a vector, and which of them scale their input (feed-forward) rather than their output."""

    peft_type: ClassVar[str] = "IA3"
    target_modules: list[str] | str | None = None  # names, `.name` suffixes, or one full-match regex string
    feedforward_modules: list[str] | str | None = None  # the targets whose input is scaled (l_ff), same matching
    exclude_modules: list[str] | str | None = None  # same matching rules; wins over target_modules
    init_ia3_weights: bool = True  # ones (identity at init); False draws N(0, 1) like peft, which it discourages
    fan_in_fan_out: bool = False  # weight stored (in, out), like GPT-2's Conv1D; detected automatically
    modules_to_save: list[str] | None = None  # other modules trained as a full copy per adapter (e.g. ["lm_head"])

    def __post_init__(self):
        self.target_modules = check_target_list(self.target_modules, "target_modules")
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.feedforward_modules = check_target_list(self.feedforward_modules or None, "feedforward_modules",
                                                     required=False)
        self.exclude_modules = check_target_list(self.exclude_modules, "exclude_modules", required=False)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:  # as peft: a feed-forward module that is not a target would silently get nothing
                raise ValueError(f"feedforward_modules {outside} are not in target_modules "
                                 f"{self.target_modules}; add them to target_modules (or drop them).")

    def to_peft_dict(self) -> dict:
        """adapter_config.json as peft's IA3Config.save_pretrained writes it (io.py adds where it came from)."""
        return {**PEFT_DEFAULTS, "target_modules": self.target_modules, "exclude_modules": self.exclude_modules,
                "feedforward_modules": self.feedforward_modules or [],  # [], not None: peft would fill in its own
                "init_ia3_weights": self.init_ia3_weights, "fan_in_fan_out": self.fan_in_fan_out,
                "modules_to_save": self.modules_to_save}

    @classmethod
    def from_peft_dict(cls, d: dict) -> "IA3Config":
        ours = {"target_modules", "feedforward_modules", "exclude_modules", "init_ia3_weights", "fan_in_fan_out",
                "modules_to_save"}
        check_peft_dict(d, cls.peft_type, PEFT_DEFAULTS, ours)
        return cls(**{k: d[k] for k in ours if k in d})


class IA3Layer(AdapterLayer):
    """A frozen `base_layer` plus named scaling vectors ia3_l[name]: (out, 1) on the output, or (1, in) on the
    input of a feed-forward layer. All of a layer's adapters scale the same side."""

    adapter_tensors = ("ia3_l",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: bool | None = None  # fixed by the first adapter

    @classmethod
    def check_target(cls, module_name: str, module: nn.Module, config: IA3Config) -> None:
        base = module.base_layer if isinstance(module, IA3Layer) else module
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            hint = ("call dequantize_model(model) first, or use LoRA (QLoRA trains over 4-bit weights)"
                    if type(base).__name__ == "Linear4bit" else "narrow target_modules so it skips this module")
            raise ValueError(f"target {module_name!r} is a {type(base).__name__}; IA3 wraps nn.Linear and GPT-2 "
                             f"Conv1D only: {hint}.")
        feedforward = name_matches(config.feedforward_modules, module_name)
        if feedforward and not name_matches(config.target_modules, module_name):
            raise ValueError(f"{module_name!r} matches feedforward_modules but not target_modules; feed-forward "
                             "modules must be targets too: widen target_modules to include it.")
        if isinstance(module, IA3Layer) and module.ia3_l and module.is_feedforward != feedforward:
            module.raise_side_conflict(module_name)

    @classmethod
    def expected_shapes(cls, module_name: str, module: nn.Module, config: IA3Config) -> dict[str, tuple]:
        in_f, out_f = in_out_features(module.base_layer if isinstance(module, IA3Layer) else module)
        return {"ia3_l": (1, in_f) if name_matches(config.feedforward_modules, module_name) else (out_f, 1)}

    def raise_side_conflict(self, module_name: str) -> None:
        side = "input (feed-forward)" if self.is_feedforward else "output"
        raise ValueError(f"layer {module_name!r} already scales its {side} for adapters {self.adapters}; every "
                         "adapter of a layer must agree: make feedforward_modules list it in all of them or in none.")

    def add_adapter(self, name: str, config: IA3Config, module_name: str) -> None:
        feedforward = name_matches(config.feedforward_modules, module_name)
        if self.ia3_l and feedforward != self.is_feedforward:
            self.raise_side_conflict(module_name)
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        base_dtype, device = self.base_dtype_device()
        # peft draws in fp32, casts to the base's dtype, then trains half-precision bases' vectors in fp32
        l = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape).to(base_dtype)
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        self.ia3_l[name] = nn.Parameter(l.to(device=device, dtype=dtype))

    def scale_side(self, name: str) -> torch.Tensor:
        """ia3_l[name] shaped to multiply the base weight as stored ((in, out) for Conv1D): along out, or in."""
        return self.ia3_l[name].T if self.fan_in_fan_out else self.ia3_l[name]

    def adapter_forward(self, x: torch.Tensor, pending: list[str], *args, **kwargs) -> torch.Tensor:
        scale, dtype = 1, x.dtype
        for name in pending:  # l_1 ⊙ l_2 ⊙ ..., multiplied in this order as peft does
            scale = scale * self.ia3_l[name].flatten()
            dtype = self.ia3_l[name].dtype
        return self.apply_scale(x, scale, dtype, *args, **kwargs)

    def apply_scale(self, x, scale, dtype, *args, **kwargs):
        """W (l ⊙ x) for a feed-forward layer, l ⊙ (W x) otherwise, with peft's casts: x goes to the vectors'
        dtype, and the product back to the dtype the base takes (input) or gave (output)."""
        if self.is_feedforward:
            return self.base_layer((x.to(dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def mixed_batch_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """Example i scaled by ia3_l[names[i]]; "__base__" (or an adapter this layer lacks) by ones, which
        changes no bit, so each example gets what it would get alone."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} examples.")
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge(model) first.")
        present = [n for n in dict.fromkeys(names) if n in self.ia3_l]
        if not present:
            return self.base_layer(x, *args, **kwargs)
        ones = torch.ones_like(self.ia3_l[present[0]].flatten())
        scale = torch.stack([self.ia3_l[n].flatten() if n in self.ia3_l else ones for n in names])  # (N, F)
        scale = scale.view(x.shape[0], *[1] * (x.dim() - 2), -1)  # (N, 1, ..., 1, F): one vector per example
        return self.apply_scale(x, scale, ones.dtype, *args, **kwargs)

    def merged_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """l ⊙ W (and l ⊙ b for an output vector) in the vectors' precision, cast back to the base's dtypes."""
        base = self.base_layer
        weight = (base.weight * self.scale_side(name)).to(base.weight.dtype)
        bias = None
        if not self.is_feedforward and base.bias is not None:
            bias = (base.bias * self.ia3_l[name].reshape(base.bias.shape)).to(base.bias.dtype)
        return weight, bias

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide merged vectors out again, last merged first, by l + 1e-8 as peft does (see the module docstring)."""
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data.copy_((base.weight / (self.scale_side(name) + 1e-8)).to(base.weight.dtype))
            if not self.is_feedforward and base.bias is not None:
                l = self.ia3_l[name].reshape(base.bias.shape)
                base.bias.data.copy_((base.bias / (l + 1e-8)).to(base.bias.dtype))


Linear = IA3Layer  # peft's name for the same thing
