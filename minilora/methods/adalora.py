"""AdaLoRA: LoRA whose rank is spent where it matters (Zhang et al. 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning"). This file holds the config and the layer; the importance scores, the budget
and the rank allocation are in adalora_budget.py.

The update is written in SVD form (section 3, eq. 3), so that dropping one singular value removes one rank:

    h = W x + (alpha / r_0) * P Λ Q x        P (out × r_0), Λ = diag(λ) (r_0), Q (r_0 × in)

peft's names are kept: `lora_B` is P, `lora_E` holds the singular values λ as an (r_0, 1) column, `lora_A`
is Q. Λ starts at zero, so the wrapped model computes exactly what the base did; P and Q start N(0, 0.02²).
r_0 is `init_r`, and the scaling stays alpha / r_0 however many values are later masked (peft divides by
`ranknum + 1e-5`, ranknum = r_0; we do the same, so outputs agree to the bit).

P and Q are not constrained to be orthogonal; the regulariser of eq. 4 pushes them there:

    R(P, Q) = ||PᵀP − I||_F + ||QQᵀ − I||_F

`orthogonal_penalty` computes it for every AdaLoRA layer of a model, averaged over the matrices. The paper
writes the norms squared; the authors' code and peft use the plain norms, and so do we (equal to peft).
peft adds it to the loss only when the model's output has a `.loss`; here a training loop adds it on
purpose (`ml.train(..., extra_loss=allocator.penalty)`), whatever the model returns.

`rank_pattern` (which of the r_0 triplets each layer keeps, as lists of bools keyed "<module>.lora_E") is
written by the allocator during training and saved in adapter_config.json; a layer built from a config that
has one is created at its kept rank, which is how peft files saved after training load.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .base import (AdapterLayer, at_least_fp32, check_modules_to_save, check_peft_dict, check_target_list,
                   in_out_features, is_conv1d)
from .lora import PEFT_DEFAULTS as LORA_PEFT_DEFAULTS

# Every field peft 0.21 writes for an AdaLoRA adapter (LoRA's, plus these), with its default value.
PEFT_DEFAULTS = {**LORA_PEFT_DEFAULTS, "peft_type": "ADALORA", "target_r": 8, "init_r": 12, "tinit": 0, "tfinal": 0,
                 "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": None,
                 "rank_pattern": None}
SCHEDULE = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


@dataclass
class AdaLoraConfig:
    """peft's AdaLoraConfig fields and defaults. The schedule over `total_step` optimizer steps: `tinit` steps at
    the full budget, a cubic decrease to `target_r` ranks per layer on average, masking every `deltaT` steps,
    then `tfinal` steps with the allocation fixed (adalora_budget.budget_at)."""

    peft_type: ClassVar[str] = "ADALORA"

    target_modules: list[str] | str | None = None  # names, `.name` suffixes, or one full-match regex string
    init_r: int = 12  # r_0: singular triplets each layer starts with
    target_r: int = 8  # average kept rank per layer at the end
    tinit: int = 0  # warm-up steps before any masking
    tfinal: int = 0  # last steps, with the final allocation fixed
    deltaT: int = 1  # mask every deltaT steps while the budget falls
    beta1: float = 0.85  # EMA of the sensitivity |θ ∇θ| (eq. 9)
    beta2: float = 0.85  # EMA of its uncertainty (eq. 10)
    orth_reg_weight: float = 0.5  # γ: the regulariser's weight in the training objective (section 3.2)
    total_step: int | None = None  # steps of the whole run: required, the schedule is laid out over it
    alpha: float = 8.0  # peft's lora_alpha: the update is scaled by alpha / init_r
    dropout: float = 0.0  # dropout on the input of Q
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # weight stored (in, out), like GPT-2's Conv1D; detected automatically
    rank_pattern: dict[str, list[bool]] | None = None  # kept triplets per "<module>.lora_E", set by the allocator
    modules_to_save: list[str] | None = None  # other modules trained as a full copy per adapter (e.g. ["lm_head"])

    def __post_init__(self):
        self.target_modules = check_target_list(self.target_modules, "target_modules")
        self.exclude_modules = check_target_list(self.exclude_modules, "exclude_modules", required=False)
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        for f in ("init_r", "target_r", "deltaT"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1 (got {v!r}).")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step < 1:
            raise ValueError(f"total_step is required: the number of optimizer steps of the run, an integer >= 1 "
                             f"(got {self.total_step!r}); the budget schedule is laid out over it.")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} is larger than init_r={self.init_r}; AdaLoRA only removes "
                             f"ranks. Use target_r <= init_r (e.g. init_r={self.target_r + self.target_r // 2}).")
        if not (0 <= self.tinit and 0 <= self.tfinal and self.tinit + self.tfinal < self.total_step):
            raise ValueError(f"the schedule does not fit: tinit={self.tinit} + tfinal={self.tfinal} must be < total_step="
                             f"{self.total_step} (both >= 0), leaving steps where the budget falls. Lower tinit or "
                             "tfinal, or raise total_step.")
        for f in ("beta1", "beta2"):
            if not 0 <= getattr(self, f) < 1:
                raise ValueError(f"{f} must be in [0, 1) (got {getattr(self, f)!r}); peft's default is 0.85.")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be >= 0 (got {self.orth_reg_weight!r}); 0 turns it off.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha!r}).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout!r}).")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
                raise ValueError(f"rank_pattern[{key!r}] must be a list of booleans (kept triplets), got {mask!r}.")
            if len(mask) != self.init_r:
                raise ValueError(f"rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}: "
                                 f"it was made with init_r={len(mask)}. Set init_r={len(mask)} to load it.")

    def kept_rank(self, module_name: str) -> int:
        """The rank a layer is built with: its kept triplets if rank_pattern lists it, init_r otherwise."""
        mask = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return self.init_r if mask is None else sum(mask)

    def to_peft_dict(self) -> dict:
        """adapter_config.json as peft 0.21 writes it for this adapter."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {**PEFT_DEFAULTS, **{f: getattr(self, f) for f in SCHEDULE}, "lora_alpha": alpha,
                "lora_dropout": self.dropout, "target_modules": self.target_modules,
                "exclude_modules": self.exclude_modules, "fan_in_fan_out": self.fan_in_fan_out,
                "rank_pattern": self.rank_pattern, "modules_to_save": self.modules_to_save}

    @classmethod
    def from_peft_dict(cls, d: dict) -> "AdaLoraConfig":
        ours = {*SCHEDULE, "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
                "rank_pattern", "modules_to_save", "r"}  # peft ignores r for AdaLoRA (init_r is the rank), and so do we
        check_peft_dict(d, cls.peft_type, PEFT_DEFAULTS, ours)
        return cls(**{f: d[f] for f in SCHEDULE if f in d}, alpha=d.get("lora_alpha", 8),
                   dropout=d.get("lora_dropout", 0.0), target_modules=d.get("target_modules"),
                   exclude_modules=d.get("exclude_modules"), fan_in_fan_out=d.get("fan_in_fan_out", False),
                   rank_pattern=d.get("rank_pattern"), modules_to_save=d.get("modules_to_save"))


class AdaLoraLayer(AdapterLayer):
    """A frozen `base_layer` plus named SVD-form updates: lora_B[name] P (out, r), lora_E[name] λ (r, 1),
    lora_A[name] Q (r, in). `rank_mask[name]` (bool (r,), or None) is the allocator's last choice of kept
    triplets; `prune` cuts the tensors down to it."""

    adapter_tensors = ("lora_A", "lora_B", "lora_E", "lora_dropout")
    adapter_dicts = ("scaling", "ranknum", "rank_mask")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A, self.lora_B, self.lora_E = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling, self.ranknum, self.rank_mask = {}, {}, {}

    @classmethod
    def check_target(cls, module_name: str, module: nn.Module, config: AdaLoraConfig) -> None:
        base = module.base_layer if isinstance(module, AdaLoraLayer) else module
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise ValueError(f"target {module_name!r} is a {type(base).__name__}; AdaLoRA wraps nn.Linear and GPT-2 "
                             "Conv1D only. Narrow target_modules so it skips this module (or dequantize_model first).")
        in_f, out_f = in_out_features(base)
        if config.init_r > min(in_f, out_f):
            raise ValueError(f"init_r={config.init_r} is larger than min(in, out)={min(in_f, out_f)} of {module_name!r}: "
                             f"P and Q cannot be orthogonal there. Use init_r <= {min(in_f, out_f)}.")

    @classmethod
    def expected_shapes(cls, module_name: str, module: nn.Module, config: AdaLoraConfig) -> dict[str, tuple]:
        in_f, out_f = in_out_features(module)
        r = config.kept_rank(module_name)
        return {"lora_A": (r, in_f), "lora_B": (out_f, r), "lora_E": (r, 1)}

    def add_adapter(self, name: str, config: AdaLoraConfig, module_name: str = "") -> None:
        r = config.kept_rank(module_name)
        base_dtype, device = self.base_dtype_device()
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype  # as peft
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype).normal_(0, 0.02))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype).normal_(0, 0.02))
        self.scaling[name], self.ranknum[name], self.rank_mask[name] = float(config.alpha), float(config.init_r), None

    def divisor(self, name: str) -> torch.Tensor:
        """ranknum + 1e-5 as peft holds it: a tensor in the adapter's dtype (fp32 over half-precision bases)."""
        A = self.lora_A[name]
        return torch.tensor(self.ranknum[name], dtype=A.dtype, device=A.device) + 1e-5

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha / r_0) P Λ Q in at least fp32, shaped like the stored base weight."""
        A, E, B = (at_least_fp32(t[name]) for t in (self.lora_A, self.lora_E, self.lora_B))
        delta = B @ (A * E)
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling[name] / self.divisor(name)

    def adapter_forward(self, x: torch.Tensor, pending: list[str], *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in pending:  # peft's order: ((x Qᵀ-with-λ) Pᵀ) * alpha / (r_0 + 1e-5)
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.dtype)) @ (A * E).T @ B.T
            result = result + h * self.scaling[name] / self.divisor(name)
        return result.to(dtype)

    def merged_weights(self, name: str) -> tuple[torch.Tensor, None]:
        w = self.base_layer.weight
        return (at_least_fp32(w) + self.delta_weight(name)).to(w.dtype), None

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w.data.copy_((at_least_fp32(w) - self.delta_weight(name)).to(w.dtype))

    def saved_state(self, name: str) -> dict[str, torch.Tensor]:
        """What a file holds: the kept triplets only (peft truncates on save too); unmasked or pruned
        layers as they are."""
        state = self.adapter_state(name)
        mask = self.rank_mask.get(name)
        if mask is None or int(mask.sum()) == state["lora_E"].shape[0]:
            return state
        return {"lora_A": state["lora_A"][mask], "lora_B": state["lora_B"][:, mask], "lora_E": state["lora_E"][mask]}

    @torch.no_grad()
    def prune(self, name: str) -> None:
        """Keep only the triplets of rank_mask[name], as new, smaller parameters (the scaling stays alpha / r_0)."""
        mask = self.rank_mask.get(name)
        if mask is None or int(mask.sum()) == self.lora_E[name].shape[0]:
            return
        for d, rows in ((self.lora_A, mask), (self.lora_E, mask)):
            d[name] = nn.Parameter(d[name][rows].clone(), requires_grad=d[name].requires_grad)
        self.lora_B[name] = nn.Parameter(self.lora_B[name][:, mask].clone(), requires_grad=self.lora_B[name].requires_grad)
        self.rank_mask[name] = None

    def extra_repr(self) -> str:
        ranks = {n: self.lora_E[n].shape[0] for n in self.lora_E}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


def orthogonal_penalty(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """Mean over the AdaLoRA layers' P and Q of ||PᵀP − I||_F and ||QQᵀ − I||_F (peft's form of eq. 4).
    Add `orth_reg_weight *` this to any training loss."""
    total, count = 0, 0
    for layer in model.modules():
        if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_A:
            for gram in (layer.lora_A[adapter_name] @ layer.lora_A[adapter_name].T,
                         layer.lora_B[adapter_name].T @ layer.lora_B[adapter_name]):
                total = total + torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                            device=gram.device))
                count += 1
    if not count:
        raise ValueError(f"the model has no AdaLoRA layer holding adapter {adapter_name!r}; inject an AdaLoraConfig first.")
    return total / count


Linear = AdaLoraLayer  # peft calls it SVDLinear
