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
  - rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", section 3):
    scaling alpha / sqrt(r) keeps the update's magnitude stable as r grows.
  - PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", section 3):
    W = U S V^T; the top-r singular triplets initialise A and B, and the frozen W keeps only the residual,
    so training starts on the principal part of W instead of a zero update.

Numerics follow peft's `lora.Linear` (same init, scaling, merge order), which the reference tests check.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

INITS = ("default", "gaussian", "pissa")
BIASES = ("none", "lora_only", "all")


@dataclass
class LoraConfig:
    """Hyper-parameters of one adapter. Field names follow the LoRA paper; peft's names map over in io.py."""

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

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1 (got {self.r!r}); try r=8.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha!r}); a common choice is alpha=2*r.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout!r}); use 0.0 to disable it.")
        tm = self.target_modules
        if isinstance(tm, (set, tuple)):
            tm = self.target_modules = sorted(tm) if isinstance(tm, set) else list(tm)
        if not tm or not (isinstance(tm, str) or all(isinstance(t, str) and t for t in tm)):
            raise ValueError("target_modules must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']) "
                             f"or one regex string; got {self.target_modules!r}.")
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} (got {self.init!r}).")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES} (got {self.bias!r}).")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half precision goes to fp32, fp32 and float64 stay as they are: the precision updates are formed in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return tuple(module.weight.shape)  # (in, out)
    if isinstance(module, nn.Linear) or all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features")):
        return module.in_features, module.out_features  # nn.Linear, and quantised linears (qlora.Linear4bit)
    raise TypeError(f"LoRA wraps nn.Linear, 4-bit Linear4bit and GPT-2 Conv1D, not {type(module).__name__}.")


class LoraLayer(nn.Module):
    """A frozen `base_layer` plus any number of named low-rank updates (lora_A[name], lora_B[name])."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r, self.scaling = {}, {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None  # set per call by inject's hook for mixed batches
        self.fused = True  # False: always run the equation as written, never the FrozenLinearWithLora node

    @property
    def weight(self) -> torch.Tensor:  # the base's, so code reading `layer.weight` / `layer.bias` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
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

    def base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype the base layer computes in, and its device: what a new adapter is built from."""
        w = self.base_layer.weight
        return w.dtype, w.device

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), whatever its storage order."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def set_base_weight_out_in(self, weight: torch.Tensor) -> None:
        """Overwrite the base weight with an (out, in) tensor, in the base's dtype and storage order."""
        w = self.base_layer.weight
        w.data = (weight.T if self.fan_in_fan_out else weight).to(w.dtype)

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
        """W + Delta W (and bias + scaling * b_B), added in at least fp32 then cast back to the base dtype."""
        base = self.base_layer
        weight = (at_least_fp32(base.weight) + self.delta_weight(name)).to(base.weight.dtype)
        bias = None
        if self.lora_B[name].bias is not None:
            if base.bias is None:
                raise RuntimeError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into.")
            bias = at_least_fp32(base.bias) + self.scaling[name] * at_least_fp32(self.lora_B[name].bias)
            bias = bias.to(base.bias.dtype)
        return weight, bias

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight. Already merged adapters are skipped, so merging twice is a no-op."""
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            weight, bias = self.merged_weights(name)
            if safe_merge and not (weight.isfinite().all() and (bias is None or bias.isfinite().all())):
                raise ValueError(f"merging adapter {name!r} gives NaN/Inf weights; the base was left untouched.")
            self.base_layer.weight.data.copy_(weight)
            if bias is not None:
                self.base_layer.bias.data.copy_(bias)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first."""
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data.copy_((at_least_fp32(base.weight) - self.delta_weight(name)).to(base.weight.dtype))
            if self.lora_B[name].bias is not None:
                b = at_least_fp32(base.bias) - self.scaling[name] * at_least_fp32(self.lora_B[name].bias)
                base.bias.data.copy_(b.to(base.bias.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            result = self.base_layer(x, *args, **kwargs)
            return result + self.mixed_batch_delta(x, self.batch_adapter_names).to(result.dtype)
        if self.merged_adapters and self.training and torch.is_grad_enabled() and any(
                p.requires_grad for n in self.merged_adapters for p in self.lora_A[n].parameters()):
            raise RuntimeError("this LoRA layer is merged, so its adapters get no gradient; call unmerge(model) "
                               "before training, or model.eval() / torch.no_grad() for inference.")
        pending = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        if not pending:  # merged (or nothing active): the base layer alone, W' x
            return self.base_layer(x, *args, **kwargs)
        if self.fused and len(pending) == 1 and not args and not kwargs and self.fusable(pending[0], x):
            name = pending[0]
            return FrozenLinearWithLora.apply(x, self.frozen_weight(), self.base_layer.bias,
                                              self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in pending:  # the equation as written; a half-precision base adds fp32 updates, rounded once
            A, B = self.lora_A[name], self.lora_B[name]
            result = result + B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]
        return result.to(dtype)

    def fusable(self, name: str, x: torch.Tensor) -> bool:
        """The common training case that `FrozenLinearWithLora` computes in one autograd node: a frozen
        nn.Linear, one adapter without dropout or bias, no autocast, and either every tensor in x's dtype or
        a half-precision base (x in its dtype) with fp32 adapters."""
        base, A = self.base_layer, self.lora_A[name].weight
        half_base = x.dtype in (torch.float16, torch.bfloat16) and A.dtype == torch.float32
        return (self.base_is_frozen_linear()
                and (base.bias is None or not base.bias.requires_grad)
                and self.lora_B[name].bias is None
                and (isinstance(self.lora_dropout[name], nn.Identity) or not self.training)
                and x.dtype == self.base_dtype_device()[0] and (A.dtype == x.dtype or half_base)
                and not torch.is_autocast_enabled(x.device.type))

    def base_is_frozen_linear(self) -> bool:
        """True when the base computes exactly x W^T + b with W frozen, which the fused node then does itself."""
        return type(self.base_layer) is nn.Linear and not self.base_layer.weight.requires_grad

    def mixed_batch_delta(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Example i gets adapter names[i] ("__base__": none). Ranks are padded to the largest r with zeros so
        every example runs through one batched matmul against its own gathered (A, B)."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} examples.")
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge(model) first.")
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


class FrozenLinearWithLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen, the backward written out by hand.

    When x, W, A and B share a dtype the forward runs the equation's own operations, so outputs equal the
    plain path (and peft) bit for bit; gradients agree up to float summation order (tests/test_lora.py,
    tests/reference/). The backward is where the time goes on CPU: the rank-r products are memory-bound
    and cost far more than their FLOPs.
      - The input gradient g W + (s g B) A is accumulated in one buffer instead of autograd adding two.
      - grad B = s g^T h is computed as (h^T g)^T: on our 2-core CPU (MKL) the (out, N) @ (N, r) form that
        autograd picks runs about 3x slower than (r, N) @ (N, out) on the same numbers.
      - s g B uses B^T stored row-major (r, out): (N, out) @ (out, r) with a row-major right factor runs
        about 2.5x slower than with its transpose view.

    Half-precision base (x and W in fp16/bf16) with fp32 adapters, the usual way to train on a GPU: the
    update runs in x's precision with A and B rounded to it, as autocast would run it, and is added to the
    base output inside one GEMM (`addmm`), so the sum is rounded once. peft instead upcasts x and adds in
    fp32, which costs several fp32 passes over (tokens x out) activations: on an H100, bf16 llama-1b with
    all seven projections adapted, a training step takes 0.78 of peft's. The two differ by rounding; the
    tests hold the node's error against float64 within twice peft's (outputs and the gradients of A and B,
    which come back in fp32 with a half-precision matmul's accuracy, a few 1e-3 relative).
    bench/lora_step.py measures the whole step against peft and the frozen base.

    `weight` may also be a function that returns it: a 4-bit base (qlora.py) dequantises in the forward and
    again in the backward, so no (out x in) tensor is kept in between.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        ctx.weight_fn = weight if callable(weight) else None
        if ctx.weight_fn is not None:
            weight = ctx.weight_fn()
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # no copy unless the adapters are fp32 on a half base
        h = nn.functional.linear(x2, A)  # (N, r)
        y = nn.functional.linear(x2, weight, bias)  # (N, out)
        if A is lora_A:
            y += nn.functional.linear(h, B).mul_(scaling)  # the equation's own operations, so equal bits
        else:
            y.addmm_(h, B.t(), alpha=scaling)  # half precision: y + s h B^T rounded once
        ctx.save_for_backward(x2, None if ctx.weight_fn else weight, A, B, h)
        ctx.scaling, ctx.adapter_dtype = scaling, lora_A.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight, A, B, h = ctx.saved_tensors
        B_rows = B.t().contiguous()  # (r, out): small, and the faster layout for the GEMM below
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        g_h = (g @ B_rows.t()).mul_(ctx.scaling)  # dL/dh = s * g B, (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight_fn() if ctx.weight_fn else weight
            grad_x = (g_h @ A).addmm_(g, weight).view(*grad.shape[:-1], x2.shape[-1])  # g W + g_h A
        if ctx.needs_input_grad[3]:
            grad_A = (g_h.t() @ x2).to(ctx.adapter_dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = (h.t() @ g).t().contiguous().to(ctx.adapter_dtype).mul_(ctx.scaling)  # s g^T h, as (h^T g)^T
        return grad_x, None, None, grad_A, grad_B, None


Linear = LoraLayer  # peft's name for the same thing
