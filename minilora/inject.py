"""The adapter contract: putting adapters into a model, and managing them once they are there.

A method is a config dataclass plus a layer class (methods/base.py says what each must provide), registered
once in `METHODS` under peft's `peft_type`. Everything here goes through that table and the `AdapterLayer`
interface, so it works the same for every method: adding a method is one file in methods/ and one line in
`METHODS`.

`inject(model, config, adapter_name)` finds the target layers the way peft does (exact name, `.name` suffix,
or one full-match regex string), swaps each for the method's layer, which holds it as `base_layer`, freezes
the base and leaves only the active adapters trainable. The rest works on all adapter layers of a model at
once: merge / unmerge / merge_and_unload, choosing active adapters, disabling them for a block of code,
deleting them, and counting trainable parameters; `add_weighted_adapter` combines LoRA adapters. The model
keeps its adapters' configs in `model.adapter_configs` and the active names in `model.adapter_active`.
One model may hold several methods on different layers; one layer holds adapters of one method.

Mixed batches: after `inject`, `model(x, adapter_names=["a", "__base__", "b", ...])` runs example i through
adapter names[i] ("__base__" means no adapter). The model itself knows nothing about adapters: a forward
pre-hook on the root module takes `adapter_names` out of the kwargs, hands it to every adapter layer, and a
forward hook that also runs when the forward raises clears it again. `generate()` of minilora's models passes
extra keyword arguments to every forward call, so `model.generate(ids, n, adapter_names=[...])` works too.
"""

import contextlib
import dataclasses
import difflib
import re
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

from .methods.adalora import AdaLoraConfig, AdaLoraLayer
from .methods.base import AdapterLayer, at_least_fp32, name_matches
from .methods.ia3 import IA3Config, IA3Layer
from .methods.lora import LoraConfig, LoraLayer
from .methods.qlora import Linear4bit, LoraLinear4bit

BASE = "__base__"  # the name that means "no adapter" in a mixed batch, as in peft


# ----------------------------------------------------------------------------- the method registry

@dataclasses.dataclass(frozen=True)
class Method:
    """A method as the shared code sees it: its config class and the layer class that wraps a base layer."""

    config: type
    layer: type  # wraps nn.Linear and GPT-2 Conv1D
    layer_for_base: dict = dataclasses.field(default_factory=dict)  # other base types -> their layer (peft's dispatchers)

    def layer_class(self, base: nn.Module) -> type:
        return self.layer_for_base.get(type(base), self.layer)


# peft's peft_type -> the method. DoRA is LoRA with use_dora=True, as in peft.
METHODS = {
    "LORA": Method(LoraConfig, LoraLayer, {Linear4bit: LoraLinear4bit}),
    "IA3": Method(IA3Config, IA3Layer),
    "ADALORA": Method(AdaLoraConfig, AdaLoraLayer),
}


def method_of(config) -> Method:
    method = METHODS.get(getattr(type(config), "peft_type", None))
    if method is None or not isinstance(config, method.config):
        known = ", ".join(m.config.__name__ for m in METHODS.values())
        raise TypeError(f"config must be one of {known}; got {type(config).__name__}.")
    return method


# ----------------------------------------------------------------------------- finding targets

def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _candidate_modules(model: nn.Module):
    """Every module a user could target: adapter layers count under their own name, their insides do not."""
    inside = set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.add(name + ".")
        if name:
            yield name, module


def find_targets(model: nn.Module, config, check_target: bool = True) -> dict[str, nn.Module]:
    """Module names the config targets, checked without changing anything (inject and load_adapter rely on it).
    `check_target=False` skips the method's own checks (add_weighted_adapter's concatenated ranks may exceed
    min(in, out) and still be exact)."""
    method = method_of(config)
    candidates = dict(_candidate_modules(model))
    found = {n: m for n, m in candidates.items()
             if name_matches(config.target_modules, n) and not name_matches(config.exclude_modules, n)}
    if isinstance(config.target_modules, str):
        unmatched = [] if found else [config.target_modules]
    else:
        unmatched = [p for p in config.target_modules if not any(name_matches([p], n) for n in found)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        close = difflib.get_close_matches(unmatched[0], short + list(candidates), n=5, cutoff=0.4)
        raise ValueError(f"target module(s) {unmatched} match no module of {type(model).__name__}"
                         f"{' (after exclude_modules)' if config.exclude_modules else ''}. "
                         f"Closest module names: {close or short[:10]}.")
    for name, module in found.items():
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_class(module.base_layer)):
            other = next(n for n, m in METHODS.items() if isinstance(module, m.layer_class(module.base_layer)))
            raise ValueError(f"{name!r} already holds {other} adapters ({module.adapters}); one layer holds one method, "
                             f"so {config.peft_type} cannot go there. Exclude it (exclude_modules=[{name!r}]), or fold the "
                             "others in with merge_and_unload(model) first.")
        if check_target:  # the base layer, or the method's layer that already wraps it (checked against its adapters)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            method.layer_class(base).check_target(name, module, config)
    return found


# ----------------------------------------------------------------------------- injecting

def inject(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Wrap the targeted layers in place and return the model (any registered method's config).

    The first adapter becomes active; later ones are added inactive (like peft's add_adapter) until
    `set_adapter` picks them. Base weights are frozen; only active adapters (and biases chosen by
    `config.bias`) require grad.
    """
    method_of(config)
    _check_new_name(model, adapter_name)
    return _inject(model, config, adapter_name, check_target=True)


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE:
        raise ValueError(f"adapter_name must be a non-empty string without '.', and not {BASE!r}; got {adapter_name!r}.")
    if adapter_name in _configs(model):
        raise ValueError(f"adapter {adapter_name!r} is already in this model; pick another name or "
                         "delete_adapter(model, name) first.")
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("the model has merged adapters; call unmerge(model) before adding another adapter.")


def _inject(model, config, adapter_name, check_target):
    targets = find_targets(model, config, check_target)  # raises before anything changes
    configs = _configs(model)
    method = method_of(config)
    first = not configs
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        if not isinstance(module, AdapterLayer):
            parent_name, _, child = name.rpartition(".")
            module = method.layer_class(module)(module)
            setattr(model.get_submodule(parent_name), child, module)
        module.add_adapter(adapter_name, config, name)
        module.train(module.base_layer.training)  # new modules start in training mode; follow the model's mode
    model.adapter_configs = {**configs, adapter_name: config}
    _install_hooks(model)
    set_adapter(model, adapter_name if first else _active(model))
    return model


def _configs(model: nn.Module) -> dict:
    return getattr(model, "adapter_configs", {})


def _active(model: nn.Module) -> list[str]:
    return getattr(model, "adapter_active", [])


def _mark_trainable(model: nn.Module) -> None:
    active = _active(model)
    for layer in adapter_layers(model).values():
        for name in layer.adapters:
            for p in layer.adapter_parameters(name):
                p.requires_grad_(name in active)
    biases = {getattr(model.adapter_configs[n], "bias", "none") for n in active}
    if "all" in biases:
        adapter_ids = {id(p) for layer in adapter_layers(model).values() for n in layer.adapters
                       for p in layer.adapter_parameters(n)}
        for name, p in model.named_parameters():
            if name.endswith(".bias") and id(p) not in adapter_ids:
                p.requires_grad_(True)
    elif "lora_only" in biases:
        for layer in adapter_layers(model).values():
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


# ----------------------------------------------------------------------------- mixed-batch hook

def _pre_forward(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    if isinstance(names, str):
        raise TypeError(f"adapter_names takes one name per example, e.g. [{names!r}, '__base__'], not a string.")
    names = list(names)
    if model.training:
        raise ValueError("adapter_names is for inference; call model.eval() first (dropout and gradients "
                         "would differ per adapter).")
    unknown = sorted(set(names) - set(model.adapter_configs) - {BASE})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; known: {sorted(model.adapter_configs)} and {BASE!r}.")
    for layer in adapter_layers(model).values():
        layer.batch_adapter_names = names
    model._adapter_batch_set = True
    return args, kwargs


def _post_forward(model, args, output):
    if getattr(model, "_adapter_batch_set", False):
        for layer in adapter_layers(model).values():
            layer.batch_adapter_names = None
        model._adapter_batch_set = False
    return output


def _install_hooks(model: nn.Module) -> None:
    if _pre_forward not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        model.register_forward_hook(_post_forward, always_call=True)


def _remove_hooks(model: nn.Module) -> None:
    # found by function rather than by handle: handles of a deep-copied model would point at the original's hooks
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_pre_forward, _post_forward)]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)


# ----------------------------------------------------------------------------- choosing adapters

def _check_known(model: nn.Module, names: list[str]) -> None:
    known = _configs(model)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, list(known), n=3)
            raise ValueError(f"unknown adapter {n!r}; this model has {sorted(known)}"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + ".")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (their updates are summed) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    layers = adapter_layers(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError("cannot change active adapters while merged; call unmerge(model) first.")
    for layer in layers:
        layer.active_adapters = [n for n in names if n in layer.adapters]
    model.adapter_active = names
    _mark_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block. Merged layers are unmerged on entry and merged back on exit."""
    layers = list(adapter_layers(model).values())
    merged = {layer: list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[layer])


def delete_adapter(model: nn.Module, name: str) -> None:
    _check_known(model, [name])
    layers = adapter_layers(model).values()
    if any(name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {name!r} is merged; call unmerge(model) before deleting it.")
    for layer in layers:
        layer.delete_adapter(name)
    model.adapter_configs = {k: v for k, v in model.adapter_configs.items() if k != name}
    model.adapter_active = [n for n in _active(model) if n != name]


# ----------------------------------------------------------------------------- merging

def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """W <- W + Delta W for the active adapters (or `adapter_names`) in every LoRA layer.

    Adapters already merged are skipped (merging twice is a no-op, with a warning). With safe_merge every
    layer's result is checked for NaN/Inf before any weight is written.
    """
    names = _active(model) if adapter_names is None else list(adapter_names)
    _check_known(model, names)
    layers = adapter_layers(model)
    if all(n in layer.merged_adapters for layer in layers.values() for n in names if n in layer.adapters):
        warnings.warn(f"adapters {names} are already merged; nothing to do.")
        return
    if safe_merge:
        for lname, layer in layers.items():
            for n in names:
                if n in layer.adapters and n not in layer.merged_adapters:
                    w, b = layer.merged_weights(n)
                    if not (w.isfinite().all() and (b is None or b.isfinite().all())):
                        raise ValueError(f"merging adapter {n!r} into {lname!r} gives NaN/Inf; nothing was merged.")
    for layer in layers.values():
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and put the plain base layers back; the model is adapter-free afterwards."""
    layers = adapter_layers(model).values()
    if any(n not in layer.merged_adapters for layer in layers for n in layer.active_adapters):
        merge(model, safe_merge=safe_merge)
    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    _remove_hooks(model)
    for attr in ("adapter_configs", "adapter_active", "_adapter_batch_set"):
        model.__dict__.pop(attr, None)
    return model


# ----------------------------------------------------------------------------- combining adapters

@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "cat", svd_rank: int | None = None) -> dict[str, float]:
    """New adapter with Delta W = sum_i w_i Delta W_i in every layer.

    "cat" is exact: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], scaling 1, rank sum(r_i).
    "svd" keeps the best rank-`svd_rank` approximation (Eckart-Young) of the summed Delta W.
    Returns each layer's relative error ||Delta W - B A||_F / ||Delta W||_F (zeros for "cat").
    """
    if combination_type not in ("cat", "svd"):
        raise ValueError(f"combination_type must be 'cat' (exact) or 'svd' (low-rank); got {combination_type!r}.")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("give one weight per adapter, and at least one adapter.")
    _check_known(model, adapters)
    _check_new_name(model, adapter_name)
    cfgs = [model.adapter_configs[a] for a in adapters]
    if not all(isinstance(c, LoraConfig) for c in cfgs) or any(getattr(c, "use_dora", False) for c in cfgs):
        raise ValueError("add_weighted_adapter combines plain LoRA adapters (B A updates); "
                         f"{[a for a, c in zip(adapters, cfgs) if not isinstance(c, LoraConfig) or getattr(c, 'use_dora', False)]} "
                         "are not. Merge those with merge(model, [name]) instead.")
    if any(c.lora_bias for c in cfgs):
        raise ValueError("adapters with lora_bias cannot be combined here; their bias updates would need a layer of their own.")
    rank = sum(c.r for c in cfgs) if combination_type == "cat" else (svd_rank or max(c.r for c in cfgs))
    if isinstance(cfgs[0].target_modules, str) or any(isinstance(c.target_modules, str) for c in cfgs):
        targets = "|".join(f"({c.target_modules})" if isinstance(c.target_modules, str)
                           else "|".join(f"(.*\\.)?{re.escape(t)}" for t in c.target_modules) for c in cfgs)
    else:
        targets = sorted({t for c in cfgs for t in c.target_modules})
    # alpha = r and no rsLoRA make the new scaling exactly 1
    config = dataclasses.replace(cfgs[0], r=rank, alpha=float(rank), use_rslora=False, init="default", target_modules=targets)
    layers = {n: layer for n, layer in adapter_layers(model).items() if isinstance(layer, LoraLayer)}
    plans, errors = {}, {}
    for lname, layer in layers.items():
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        if combination_type == "cat":
            A = torch.cat([w * layer.scaling[a] * at_least_fp32(layer.lora_A[a].weight) for a, w in present], dim=0)
            B = torch.cat([at_least_fp32(layer.lora_B[a].weight) for a, _ in present], dim=1)
            A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])  # pad when some adapter skips this layer
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
            errors[lname] = 0.0
        else:
            delta = sum(w * layer.scaling[a] * (at_least_fp32(layer.lora_B[a].weight) @ at_least_fp32(layer.lora_A[a].weight))
                        for a, w in present)  # (out, in)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(rank, S.numel())
            B = torch.zeros(delta.shape[0], rank)
            A = torch.zeros(rank, delta.shape[1])
            B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
            total = S.square().sum()
            errors[lname] = float((S[k:].square().sum() / total).sqrt()) if total > 0 else 0.0
        plans[lname] = (A, B)
    # a concatenation may exceed min(in, out) and still be exact, so the rank check is skipped here
    _inject(model, config, adapter_name, check_target=False)
    for lname, (A, B) in plans.items():
        layer = layers[lname]
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
    return errors


# ----------------------------------------------------------------------------- counting

class TrainableReport(NamedTuple):
    trainable: int
    total: int
    percent: float


def trainable_report(model: nn.Module, verbose: bool = True) -> TrainableReport:
    """Counts of trainable and all parameters (shared tensors counted once), printed like peft's. A 4-bit
    weight counts as the out x in values it stores (peft counts bitsandbytes' packed bytes twice, the same)."""
    params = list(model.parameters())  # parameters() already skips shared duplicates
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + sum(m.weight.numel for m in model.modules() if isinstance(m, Linear4bit))
    report = TrainableReport(trainable, total, 100.0 * trainable / total if total else 0.0)
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {report.percent:.4f}")
    return report
