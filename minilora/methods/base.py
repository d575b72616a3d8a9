"""What every adapter layer has in common: the half of the adapter contract that lives in the methods.

A method is a config dataclass plus a layer class (inject.py registers the pair under peft's `peft_type`).

The config (a dataclass that validates itself in `__post_init__`, raising ValueError that names the fix) has
  - `peft_type`: a class attribute, peft's name for the method ("LORA", "IA3", ...);
  - `target_modules` / `exclude_modules`, matched by inject.py the way peft matches them
    (`check_target_list` normalises and validates them);
  - optionally `bias` ("none", "lora_only" or "all": which base biases train with the adapter);
  - optionally `modules_to_save` (modules outside the targets that train as a full copy per adapter, e.g. T5's
    relative position bias or a norm; `check_modules_to_save` validates it, inject.py wraps them);
  - `to_peft_dict()` and the classmethod `from_peft_dict(d)`: the adapter_config.json that peft writes and reads.

The layer subclasses `AdapterLayer`: it wraps one frozen `base_layer` and holds any number of named adapters of
its method. Its per-adapter tensors live in the ModuleDict / ParameterDict attributes listed in
`adapter_tensors`, under peft's names; io.py saves them under peft's keys (`lora_A.weight`, `ia3_l`, ...,
the adapter name taken out) without knowing the method. A subclass writes
  - `add_adapter(name, config, module_name)` (module_name: the layer's name in the model, for options that
    depend on it, e.g. IA3's feedforward_modules), `adapter_forward(x, pending)` (the output with the active, unmerged
    adapters `pending` applied; `forward` has already handled disabled, merged and mixed-batch calls),
    `merged_weights(name)` (the base weight and bias with the adapter folded in, in the
    base's storage layout: `merge` writes them) and `unmerge()`;
  - the classmethods `check_target(module_name, module, config)` (raise ValueError naming the fix when it cannot wrap
    `module`, which is the base layer or a layer of this class that already holds adapters) and `expected_shapes(module_name, module, config)` (the keys and shapes one adapter has in a layer wrapping
    `module`, so a file is checked before anything changes);
  - `mixed_batch_forward(x, names)` if it runs a different adapter per example (LoRA does), and
    `saved_state(name)` if a file should hold less than `adapter_state(name)` (AdaLoRA's masked ranks).
Everything else (which adapters exist, are active, merged, disabled; deleting one; its tensors in peft's
naming; loading them) is written here once.
"""

import re

import torch
import torch.nn as nn


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
    raise TypeError(f"adapters wrap nn.Linear, 4-bit Linear4bit and GPT-2 Conv1D, not {type(module).__name__}.")


def name_matches(patterns: list[str] | str | None, name: str) -> bool:
    """peft's matching: a list matches a module named exactly like an entry or ending in "." + entry; a string
    is one regex that must match the whole name."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def check_target_list(value, field: str, required: bool = True):
    """A target list as configs keep it: a list of non-empty names (sets and tuples become lists), one regex
    string, or None where the field is optional."""
    if isinstance(value, (set, tuple)):
        value = sorted(value) if isinstance(value, set) else list(value)
    if value is None and not required:
        return None
    if not value or not (isinstance(value, str) or all(isinstance(t, str) and t for t in value)):
        raise ValueError(f"{field} must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']) "
                         f"or one regex string; got {value!r}.")
    return value


def check_modules_to_save(value) -> list[str] | None:
    """`modules_to_save` as configs keep it: None, or a list of module names (sets and tuples become lists, an
    empty one None). No regex string, as in peft: a name is matched whole or as a ".name" suffix."""
    if isinstance(value, (set, tuple)):
        value = sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, str):
        raise ValueError(f"modules_to_save takes a list of module names, not a string: write [{value!r}].")
    if value is not None and not (isinstance(value, list) and all(isinstance(n, str) and n for n in value)):
        raise ValueError(f"modules_to_save must be a list of module names (e.g. ['lm_head']) or None; got {value!r}.")
    return value or None


# ----------------------------------------------------------------------------- peft's adapter_config.json

PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose files minilora's match
# Fields that only describe where a file came from; any value is fine when loading.
PEFT_INFORMATIONAL = {"auto_mapping", "base_model_name_or_path", "inference_mode", "peft_version", "revision",
                      "task_type", "megatron_core", "qalora_group_size", "ensure_weight_tying", "peft_type"}


def check_peft_dict(d: dict, peft_type: str, defaults: dict, ours: set[str]) -> None:
    """Raise unless `d` is a `peft_type` adapter config whose fields outside `ours` keep peft's defaults (or are
    empty): a feature minilora does not implement must never be dropped silently."""
    if d.get("peft_type") != peft_type:
        raise ValueError(f"this is a {d.get('peft_type')!r} adapter, not {peft_type!r}.")
    unsupported = sorted(k for k, v in d.items() if k not in ours | PEFT_INFORMATIONAL and v != defaults.get(k)
                         and v not in (None, False, {}, []))
    if unsupported:
        raise ValueError(f"adapter_config.json uses peft {peft_type} features minilora does not implement: "
                         f"{unsupported}. Save the adapter without them to load it here.")


# ----------------------------------------------------------------------------- the layer

class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus named adapters of one method (see the module docstring for the contract)."""

    adapter_tensors: tuple[str, ...] = ()  # ModuleDict / ParameterDict attributes keyed by adapter name
    adapter_dicts: tuple[str, ...] = ()  # plain dict attributes keyed by adapter name (ranks, scalings, ...)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None  # set per call by inject's hook for mixed batches

    @property
    def weight(self) -> torch.Tensor:  # the base's, so code reading `layer.weight` / `layer.bias` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds, in the order they were added."""
        return list(dict.fromkeys(n for attr in self.adapter_tensors for n in getattr(self, attr)))

    def pending_adapters(self) -> list[str]:
        """Active adapters that are not merged: the ones the forward pass adds itself."""
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in self.adapters]

    # ------------------------------------------------------------------ tensors in peft's naming

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        """One adapter's tensors, keyed as peft keys them inside the layer: "<attr>.<param>" for a module
        ("lora_A.weight"), "<attr>" for a bare parameter ("ia3_l")."""
        out = {}
        for attr in self.adapter_tensors:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Module):
                out.update({f"{attr}.{k}": p for k, p in item.named_parameters()})
            else:
                out[attr] = item
        return out

    def saved_state(self, name: str) -> dict[str, torch.Tensor]:
        """What a file holds for the adapter, keyed like `adapter_state` (AdaLoRA keeps only its kept ranks)."""
        return self.adapter_state(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_state(name).values())

    @torch.no_grad()
    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors keyed like `adapter_state(name)` into the adapter (shapes were checked by the caller)."""
        own = self.adapter_state(name)
        for key, t in tensors.items():
            own[key].copy_(t)

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_tensors:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for attr in self.adapter_dicts:
            getattr(self, attr).pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ------------------------------------------------------------------ the base weight, whatever its storage

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

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight (and bias) as `merged_weights(name)` computes them. Already merged
        adapters are skipped, so merging twice is a no-op."""
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            weight, bias = self.merged_weights(name)
            if safe_merge and not (weight.isfinite().all() and (bias is None or bias.isfinite().all())):
                raise ValueError(f"merging adapter {name!r} gives NaN/Inf weights; the base was left untouched.")
            self.base_layer.weight.data.copy_(weight)
            if bias is not None:
                self.base_layer.bias.data.copy_(bias)
            self.merged_adapters.append(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self.mixed_batch_forward(x, self.batch_adapter_names, *args, **kwargs)
        self.check_not_training_merged()
        pending = self.pending_adapters()
        if not pending:  # merged (or nothing active): the base layer alone, W' x
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x, pending, *args, **kwargs)

    def check_not_training_merged(self) -> None:
        """Merged adapters get no gradient: training through them would silently learn nothing."""
        if self.merged_adapters and self.training and torch.is_grad_enabled() and any(
                p.requires_grad for n in self.merged_adapters for p in self.adapter_parameters(n)):
            raise RuntimeError(f"this {type(self).__name__} is merged, so its adapters get no gradient; call "
                               "unmerge(model) before training, or model.eval() / torch.no_grad() for inference.")

    def mixed_batch_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Example i through adapter names[i] ("__base__": none). Methods that cannot do this keep this error."""
        raise ValueError(f"{type(self).__name__} cannot run a different adapter per example (adapter_names); "
                         "run one adapter at a time with set_adapter(model, name).")

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"
