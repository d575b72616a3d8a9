"""Putting adapters into a model, and managing them once they are there.

`inject(model, config, adapter_name)` finds the target layers the way peft does (exact name, `.name` suffix,
or one full-match regex string), swaps each for a `LoraLayer` that holds it as `base_layer`, freezes the base
and leaves only the active adapters trainable. Everything else here works on all LoRA layers of a model at once:
merge / unmerge / merge_and_unload, choosing active adapters, disabling them for a block of code, deleting
them, combining them, and counting trainable parameters.

Mixed batches: after `inject`, `model(x, adapter_names=["a", "__base__", "b", ...])` runs example i through
adapter names[i] ("__base__" means no adapter). The model itself knows nothing about adapters: a forward
pre-hook on the root module takes `adapter_names` out of the kwargs, hands it to every LoRA layer, and a
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

from .methods.lora import LoraConfig, LoraLayer, at_least_fp32, in_out_features, is_conv1d
from .methods.qlora import Linear4bit, LoraLinear4bit

BASE = "__base__"  # the name that means "no adapter" in a mixed batch, as in peft

# The LoRA layer class for each kind of base layer that is not a plain nn.Linear / Conv1D (peft's "dispatchers").
LORA_LAYER_FOR_BASE = {Linear4bit: LoraLinear4bit}


# ----------------------------------------------------------------------------- finding targets

def _matches(patterns: list[str] | str | None, name: str) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _candidate_modules(model: nn.Module):
    """Every module a user could target: LoRA layers count under their own name, their insides do not."""
    inside = set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.add(name + ".")
        if name:
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig, check_rank: bool = True) -> dict[str, nn.Module]:
    """Module names the config targets, checked without changing anything (inject and load_adapter rely on it)."""
    candidates = dict(_candidate_modules(model))
    found = {n: m for n, m in candidates.items()
             if _matches(config.target_modules, n) and not _matches(config.exclude_modules, n)}
    if isinstance(config.target_modules, str):
        unmatched = [] if found else [config.target_modules]
    else:
        unmatched = [p for p in config.target_modules if not any(_matches([p], n) for n in found)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        close = difflib.get_close_matches(unmatched[0], short + list(candidates), n=5, cutoff=0.4)
        raise ValueError(f"target module(s) {unmatched} match no module of {type(model).__name__}"
                         f"{' (after exclude_modules)' if config.exclude_modules else ''}. "
                         f"Closest module names: {close or short[:10]}.")
    for name, module in found.items():
        if not isinstance(module, (nn.Linear, LoraLayer, *LORA_LAYER_FOR_BASE)) and not is_conv1d(module):
            raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA here wraps nn.Linear, Linear4bit and "
                             "GPT-2 Conv1D only. Narrow target_modules so it skips this module.")
        in_f, out_f = in_out_features(module.base_layer if isinstance(module, LoraLayer) else module)
        if check_rank and config.r > min(in_f, out_f):
            raise ValueError(f"r={config.r} is larger than min(in, out)={min(in_f, out_f)} of layer {name!r} "
                             f"({in_f} -> {out_f}); a rank-{config.r} update cannot exist there. Use r <= {min(in_f, out_f)}.")
    return found


# ----------------------------------------------------------------------------- injecting

def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the targeted layers in place and return the model.

    The first adapter becomes active; later ones are added inactive (like peft's add_adapter) until
    `set_adapter` picks them. Base weights are frozen; only active adapters (and biases chosen by
    `config.bias`) require grad.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
    _check_new_name(model, adapter_name)
    return _inject(model, config, adapter_name, check_rank=True)


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE:
        raise ValueError(f"adapter_name must be a non-empty string without '.', and not {BASE!r}; got {adapter_name!r}.")
    configs = getattr(model, "lora_configs", {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already in this model; pick another name or "
                         "delete_adapter(model, name) first.")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the model has merged adapters; call unmerge(model) before adding another adapter.")


def _inject(model, config, adapter_name, check_rank):
    targets = find_targets(model, config, check_rank)  # raises before anything changes
    configs = getattr(model, "lora_configs", {})

    first = not configs
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        if not isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            module = LORA_LAYER_FOR_BASE.get(type(module), LoraLayer)(module)
            setattr(model.get_submodule(parent_name), child, module)
        module.add_adapter(adapter_name, config)
    model.lora_configs = {**configs, adapter_name: config}
    _install_hooks(model)
    set_adapter(model, adapter_name if first else _active(model))
    return model


def _active(model: nn.Module) -> list[str]:
    return getattr(model, "lora_active", [])


def _mark_trainable(model: nn.Module) -> None:
    active = _active(model)
    for layer in lora_layers(model).values():
        for name in layer.lora_A:
            for p in [*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()]:
                p.requires_grad_(name in active)
    biases = {model.lora_configs[n].bias for n in active}
    if "all" in biases:
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ".lora_" not in name:
                p.requires_grad_(True)
    elif "lora_only" in biases:
        for layer in lora_layers(model).values():
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
    unknown = sorted(set(names) - set(model.lora_configs) - {BASE})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; known: {sorted(model.lora_configs)} and {BASE!r}.")
    for layer in lora_layers(model).values():
        layer.batch_adapter_names = names
    model._lora_batch_set = True
    return args, kwargs


def _post_forward(model, args, output):
    if getattr(model, "_lora_batch_set", False):
        for layer in lora_layers(model).values():
            layer.batch_adapter_names = None
        model._lora_batch_set = False
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
    known = getattr(model, "lora_configs", {})
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, list(known), n=3)
            raise ValueError(f"unknown adapter {n!r}; this model has {sorted(known)}"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + ".")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (their updates are summed) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError("cannot change active adapters while merged; call unmerge(model) first.")
    for layer in layers:
        layer.active_adapters = [n for n in names if n in layer.lora_A]
    model.lora_active = names
    _mark_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block. Merged layers are unmerged on entry and merged back on exit."""
    layers = list(lora_layers(model).values())
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
    layers = lora_layers(model).values()
    if any(name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {name!r} is merged; call unmerge(model) before deleting it.")
    for layer in layers:
        if name in layer.lora_A:
            for d in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                del d[name]
            del layer.r[name], layer.scaling[name]
            layer.active_adapters = [n for n in layer.active_adapters if n != name]
    model.lora_configs = {k: v for k, v in model.lora_configs.items() if k != name}
    model.lora_active = [n for n in _active(model) if n != name]


# ----------------------------------------------------------------------------- merging

def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """W <- W + Delta W for the active adapters (or `adapter_names`) in every LoRA layer.

    Adapters already merged are skipped (merging twice is a no-op, with a warning). With safe_merge every
    layer's result is checked for NaN/Inf before any weight is written.
    """
    names = _active(model) if adapter_names is None else list(adapter_names)
    _check_known(model, names)
    layers = lora_layers(model)
    if all(n in layer.merged_adapters for layer in layers.values() for n in names if n in layer.lora_A):
        warnings.warn(f"adapters {names} are already merged; nothing to do.")
        return
    if safe_merge:
        for lname, layer in layers.items():
            for n in names:
                if n in layer.lora_A and n not in layer.merged_adapters:
                    w, b = layer.merged_weights(n)
                    if not (w.isfinite().all() and (b is None or b.isfinite().all())):
                        raise ValueError(f"merging adapter {n!r} into {lname!r} gives NaN/Inf; nothing was merged.")
    for layer in layers.values():
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and put the plain base layers back; the model is adapter-free afterwards."""
    layers = lora_layers(model).values()
    if any(n not in layer.merged_adapters for layer in layers for n in layer.active_adapters):
        merge(model, safe_merge=safe_merge)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    _remove_hooks(model)
    for attr in ("lora_configs", "lora_active", "_lora_batch_set"):
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
    cfgs = [model.lora_configs[a] for a in adapters]
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
    layers = lora_layers(model)
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
    _inject(model, config, adapter_name, check_rank=False)
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
