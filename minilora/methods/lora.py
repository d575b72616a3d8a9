"""LoRA: low-rank adaptation of a frozen linear layer.

A frozen weight W (d_out x d_in) gets a trainable low-rank update B A, with A (r x d_in) and B (d_out x r),
r << min(d_in, d_out) (Hu et al. 2021, "LoRA", section 4.1):

    h = W x + (alpha / r) * B A dropout(x)

            x ──────────────┬─────────────────┐
                            │                 │ dropout
                      ┌─────┴─────┐      ┌────┴────┐
                      │  W frozen │      │ A  r×in │  kaiming-uniform (or gaussian) init
                      │  out × in │      └────┬────┘
                      └─────┬─────┘      ┌────┴────┐
                            │            │ B out×r │  zeros, so B A = 0 at init
                            │            └────┬────┘
                            └──── + ──────────┘ × alpha / r
                                  h

Because B starts at zero the wrapped model computes exactly what the base did (section 4.1), and after
training the update can be merged, W' = W + (alpha / r) B A, so inference costs nothing extra (section 4.2).

Variants:
  - DoRA (Liu et al. 2024, `use_dora=True`): W' = m (W + s B A) / ||W + s B A||_c, a trainable magnitude m per
    output row; its equations and fast paths live in dora.py.
  - rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", section 3):
    scaling alpha / sqrt(r) keeps the update's magnitude stable as r grows.
  - PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", section 3):
    W = U S V^T; the top-r singular triplets initialise A and B, and the frozen W keeps only the residual,
    so training starts on the principal part of W instead of a zero update.

Numerics follow peft's `lora.Linear` (same init, scaling, merge order), which the reference tests check.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .base import (PEFT_FORMAT_VERSION, AdapterLayer, at_least_fp32, check_modules_to_save, check_peft_dict,
                   check_target_list, in_out_features, is_conv1d)
from . import dora
from .lora_fused import FrozenLinearWithLora

INITS = ("default", "gaussian", "pissa")
BIASES = ("none", "lora_only", "all")


@dataclass
class LoraConfig:
    """Hyper-parameters of one adapter. Field names follow the LoRA paper; `to_peft_dict` / `from_peft_dict`
    map them to peft's (lora_alpha, lora_dropout, init_lora_weights, ...)."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8  # rank of B A
    alpha: float = 8.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the input of A only
    target_modules: list[str] | str | None = None  # names, `.name` suffixes, or one full-match regex string
    exclude_modules: list[str] | str | None = None  # same matching rules; wins over target_modules
    use_rslora: bool = False
    init: str = "default"  # "default" (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r^2)), "pissa"
    bias: str = "none"  # which base biases also train: "none", "lora_only" (targeted layers), "all"
    lora_bias: bool = False  # give B its own bias
    fan_in_fan_out: bool = False  # weight stored (in, out), like GPT-2's Conv1D; detected automatically
    use_dora: bool = False  # DoRA (dora.py): a trainable magnitude per output times the normalised W + s B A
    modules_to_save: list[str] | None = None  # other modules trained as a full copy per adapter (e.g. ["lm_head"])

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1 (got {self.r!r}); try r=8.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha!r}); a common choice is alpha=2*r.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout!r}); use 0.0 to disable it.")
        self.target_modules = check_target_list(self.target_modules, "target_modules")
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} (got {self.init!r}).")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES} (got {self.bias!r}).")
        if self.use_dora and self.lora_bias:  # as in peft
            raise ValueError("lora_bias=True is not supported with use_dora=True; set one of them to False.")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_dict(self) -> dict:
        """adapter_config.json as peft 0.21 writes it for this adapter."""
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[self.init]
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {**PEFT_DEFAULTS, "r": self.r, "lora_alpha": alpha, "lora_dropout": self.dropout,
                "target_modules": self.target_modules, "exclude_modules": self.exclude_modules,
                "use_rslora": self.use_rslora, "init_lora_weights": init, "bias": self.bias,
                "lora_bias": self.lora_bias, "fan_in_fan_out": self.fan_in_fan_out, "use_dora": self.use_dora,
                "modules_to_save": self.modules_to_save}

    def for_loading(self) -> "LoraConfig":
        """The config load_adapter injects with: default init, so that PiSSA never rewrites the base weights."""
        return dataclasses.replace(self, init="default")

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        check_peft_dict(d, "LORA", PEFT_DEFAULTS, {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                                                   "use_rslora", "init_lora_weights", "bias", "lora_bias",
                                                   "fan_in_fan_out", "use_dora", "modules_to_save"})
        init = d.get("init_lora_weights", True)
        init = "gaussian" if init == "gaussian" else "pissa" if str(init).startswith("pissa") else "default"
        return cls(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                   target_modules=d.get("target_modules"), exclude_modules=d.get("exclude_modules"),
                   use_rslora=d.get("use_rslora", False), init=init, bias=d.get("bias", "none"),
                   lora_bias=d.get("lora_bias", False), fan_in_fan_out=d.get("fan_in_fan_out", False),
                   use_dora=d.get("use_dora", False), modules_to_save=d.get("modules_to_save"))


# Every field peft 0.21 writes for a LoRA adapter, with its default value.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}


class LoraLayer(AdapterLayer):
    """A frozen `base_layer` plus any number of named low-rank updates (lora_A[name], lora_B[name])."""

    adapter_tensors = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")
    adapter_dicts = ("r", "scaling", "dora_merge_norm")
    base_types: tuple[type, ...] = (nn.Linear,)  # what it wraps, besides GPT-2's Conv1D (recognised by name)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.r, self.scaling = {}, {}
        self.dora_merge_norm, self.dora_w_sq = {}, dora.SquaredRowNorms()  # DoRA: n at merge time, cached ||W_i||^2
        self.fused = True  # False: always run the equation as written, never the fused nodes or DoRA's fast norm

    @classmethod
    def check_target(cls, module_name: str, module: nn.Module, config: LoraConfig) -> None:
        module = module.base_layer if isinstance(module, LoraLayer) else module
        if not isinstance(module, cls.base_types) and not is_conv1d(module):
            raise ValueError(f"target {module_name!r} is a {type(module).__name__}; LoRA here wraps nn.Linear, Linear4bit "
                             "and GPT-2 Conv1D only. Narrow target_modules so it skips this module.")
        in_f, out_f = in_out_features(module)
        if config.r > min(in_f, out_f):
            raise ValueError(f"r={config.r} is larger than min(in, out)={min(in_f, out_f)} of layer {module_name!r} "
                             f"({in_f} -> {out_f}); a rank-{config.r} update cannot exist there. Use r <= {min(in_f, out_f)}.")
        if getattr(config, "use_dora", False) and not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"DoRA cannot wrap {module_name!r}, a {type(module).__name__}: it needs the full-precision"
                             " weight. Use use_dora=False, or dequantize_model(model) first.")

    @classmethod
    def expected_shapes(cls, module_name: str, module: nn.Module, config: LoraConfig) -> dict[str, tuple]:
        in_f, out_f = in_out_features(module)
        shapes = {"lora_A.weight": (config.r, in_f), "lora_B.weight": (out_f, config.r)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (out_f,)
        if getattr(config, "use_dora", False):
            shapes["lora_magnitude_vector"] = (out_f,)  # peft's file key: no ".weight" (see adapter_state)
        return shapes

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        """AdapterLayer's, but DoRA's m is "lora_magnitude_vector": peft's files drop the ".weight" of the module."""
        return {k.removesuffix(".weight") if k.startswith("lora_magnitude_vector.") else k: v
                for k, v in super().adapter_state(name).items()}

    def add_adapter(self, name: str, config: LoraConfig, module_name: str = "") -> None:
        r = config.r
        base_dtype, device = self.base_dtype_device()
        # peft keeps half-precision bases but trains their adapters in fp32
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device, dtype=dtype)
        self.r[name], self.scaling[name] = r, config.scaling
        if config.init == "pissa":
            self.pissa_init(name)
        else:
            if config.init == "default":  # nn.Linear's own init, as in the LoRA reference code
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        if config.lora_bias:
            nn.init.zeros_(self.lora_B[name].bias)
        if getattr(config, "use_dora", False):
            dora.add_magnitude(self, name)

    def frozen_weight(self):
        """What `FrozenLinearWithLora` multiplies by: the frozen (out, in) weight itself."""
        return self.base_layer.weight

    @torch.no_grad()
    def pissa_init(self, name: str) -> None:
        """PiSSA (Meng et al. 2024, eq. 2-4): W = U S V^T, A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), W_res = W - B A."""
        r, s = self.r[name], self.scaling[name]
        W = at_least_fp32(self.base_weight_out_in())  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        S_r = S[:r] / s  # so that scaling * B A reproduces the top-r part exactly
        A = torch.diag(S_r.sqrt()) @ Vh[:r]  # (r, in)
        B = U[:, :r] @ torch.diag(S_r.sqrt())  # (out, r)
        self.lora_A[name].weight.data = A.to(self.lora_A[name].weight.dtype)
        self.lora_B[name].weight.data = B.to(self.lora_B[name].weight.dtype)
        self.set_base_weight_out_in(W - s * B @ A)  # the residual W_res

    def delta_weight(self, name: str) -> torch.Tensor:
        """Delta W = scaling * B A in at least fp32, shaped like the stored base weight."""
        delta = self.scaling[name] * (at_least_fp32(self.lora_B[name].weight) @ at_least_fp32(self.lora_A[name].weight))
        return delta.T if self.fan_in_fan_out else delta

    def merged_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + Delta W (DoRA: (m/n)(W + Delta W)) and bias + scaling * b_B, in at least fp32, cast back to the
        base dtype."""
        base, w = self.base_layer, at_least_fp32(self.base_layer.weight)
        self.dora_w_sq.clear()  # merge writes through .data, which the cache cannot see
        is_dora = name in self.lora_magnitude_vector
        weight = (dora.layer_merged_weight(self, name, w) if is_dora else w + self.delta_weight(name)).to(base.weight.dtype)
        bias = None
        if self.lora_B[name].bias is not None:
            if base.bias is None:
                raise RuntimeError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into.")
            bias = at_least_fp32(base.bias) + self.scaling[name] * at_least_fp32(self.lora_B[name].bias)
            bias = bias.to(base.bias.dtype)
        return weight, bias

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (stored layout, at least fp32) with the merge of adapter `name` undone."""
        is_dora = name in self.lora_magnitude_vector
        return dora.layer_unmerged_weight(self, name, weight) if is_dora else weight - self.delta_weight(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merged adapters again, last merged first."""
        base = self.base_layer
        self.dora_w_sq.clear()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data.copy_(self.unmerged_weight(name, at_least_fp32(base.weight)).to(base.weight.dtype))
            if self.lora_B[name].bias is not None:
                b = at_least_fp32(base.bias) - self.scaling[name] * at_least_fp32(self.lora_B[name].bias)
                base.bias.data.copy_(b.to(base.bias.dtype))

    def adapter_forward(self, x: torch.Tensor, pending: list[str], *args, **kwargs) -> torch.Tensor:
        if self.fused and len(pending) == 1 and not args and not kwargs and self.fusable(pending[0], x):
            name = pending[0]
            if name in self.lora_magnitude_vector:
                return dora.layer_fused_forward(self, name, x)
            return FrozenLinearWithLora.apply(x, self.frozen_weight(), self.base_layer.bias,
                                              self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in pending:  # the equation as written; a half-precision base adds fp32 updates, rounded once
            A, B = self.lora_A[name], self.lora_B[name]
            if name in self.lora_magnitude_vector:
                result = result + dora.layer_update(self, name, x.to(A.weight.dtype), result)
            else:
                result = result + B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]
        return result.to(dtype)

    def fusable(self, name: str, x: torch.Tensor) -> bool:
        """The common training case that `FrozenLinearWithLora` computes in one autograd node: a frozen
        nn.Linear, one adapter without dropout or bias, no autocast, and either every tensor in x's dtype or
        a half-precision base (x in its dtype) with fp32 adapters (DoRA's node: every tensor in x's dtype)."""
        base, A = self.base_layer, self.lora_A[name].weight
        half_base = x.dtype in (torch.float16, torch.bfloat16) and A.dtype == torch.float32
        return (self.base_is_frozen_linear()
                and (base.bias is None or not base.bias.requires_grad)
                and self.lora_B[name].bias is None
                and (isinstance(self.lora_dropout[name], nn.Identity) or not self.training)
                and x.dtype == self.base_dtype_device()[0]
                and (A.dtype == x.dtype or half_base and name not in self.lora_magnitude_vector)
                and (x.is_meta or not torch.is_autocast_enabled(x.device.type)))  # meta: no autocast to ask

    def base_is_frozen_linear(self) -> bool:
        """True when the base computes exactly x W^T + b with W frozen, which the fused node then does itself."""
        return type(self.base_layer) is nn.Linear and not self.base_layer.weight.requires_grad

    def mixed_batch_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return result + self.mixed_batch_delta(x, names).to(result.dtype)

    def mixed_batch_delta(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Example i gets adapter names[i] ("__base__": none). Ranks are padded to the largest r with zeros so
        every example runs through one batched matmul against its own gathered (A, B)."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} examples.")
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge(model) first.")
        if set(names) & set(self.lora_magnitude_vector):  # peft refuses too
            raise ValueError("adapter_names cannot include DoRA adapters; run them one at a time with "
                             "set_adapter(model, name).")
        present = [n for n in dict.fromkeys(names) if n in self.lora_A]
        if not present:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        r_max = max(self.r[n] for n in present)
        ref = self.lora_A[present[0]].weight
        A = ref.new_zeros(len(present) + 1, r_max, self.in_features)  # slot 0 stays zero: the base model
        B = ref.new_zeros(len(present) + 1, self.out_features, r_max)
        b = ref.new_zeros(len(present) + 1, self.out_features)
        for k, n in enumerate(present, start=1):
            A[k, : self.r[n]] = self.lora_A[n].weight
            B[k, :, : self.r[n]] = self.lora_B[n].weight * self.scaling[n]
            if self.lora_B[n].bias is not None:
                b[k] = self.lora_B[n].bias * self.scaling[n]
        slot = {n: k for k, n in enumerate(present, start=1)}
        idx = torch.tensor([slot.get(n, 0) for n in names], device=x.device)
        xb = x.to(ref.dtype).reshape(x.shape[0], -1, self.in_features)  # (N, T, in)
        h = torch.bmm(xb, A[idx].transpose(1, 2))  # (N, T, r_max)
        out = torch.bmm(h, B[idx].transpose(1, 2)) + b[idx].unsqueeze(1)  # (N, T, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        ranks = {n: self.r[n] for n in self.lora_A}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


Linear = LoraLayer  # peft's name for the same thing
