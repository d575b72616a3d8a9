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

modules_to_save: a config may list other modules (a norm, an lm_head, T5's relative position bias tables) that
train as a full copy per adapter. `inject` wraps each in a `ModulesToSave`: peft's ModulesToSaveWrapper with its
attribute names, so the state-dict keys are peft's (`<module>.original_module.weight`,
`<module>.modules_to_save.<adapter>.weight`). The copy of the active adapter runs; the frozen original runs when
no adapter with a copy there is active, or adapters are disabled. set_adapter / disable / delete / the mixed-batch
hook / trainable_report treat the copies like adapter tensors, merge leaves them running (there is nothing to
fold), and merge_and_unload puts the running module back as a plain module. Deliberate differences from peft:
  - names match like target_modules (the whole name or a ".name" suffix); peft matches a bare suffix, so its
    "norm" also wraps every "input_layernorm";
  - a name that matches nothing is an error (peft skips it), and so is a module both targeted and listed, or
    one inside the other (peft silently drops such targets);
  - the original stays frozen under bias="all" (peft unfreezes its bias, which then trains for no adapter);
  - a mixed batch runs each adapter's examples through its copy for any module whose first argument is the
    batch (peft allows Linear, Embedding and Conv only); a module that takes no batch (RelativePositionBias
    takes lengths) cannot mix copies, and says so;
  - add_weighted_adapter refuses adapters with copies (peft gives the combination a fresh, untrained copy).

Mixed batches: after `inject`, `model(x, adapter_names=["a", "__base__", "b", ...])` runs example i through
adapter names[i] ("__base__" means no adapter). The model itself knows nothing about adapters: a forward
pre-hook on the root module takes `adapter_names` out of the kwargs, hands it to every adapter layer, and a
forward hook that also runs when the forward raises clears it again. Examples whose adapter has no copy of a
modules_to_save module go through its original, like "__base__" ones. `generate()` of minilora's models passes
extra keyword arguments to every forward call, so `model.generate(ids, n, adapter_names=[...])` works too.
"""

import contextlib
import copy
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


# ----------------------------------------------------------------------------- modules_to_save

class ModulesToSave(nn.Module):
    """A module of a config's `modules_to_save`: the frozen original plus one full copy per adapter, trainable
    while its adapter is active (peft's ModulesToSaveWrapper; the same attribute names give the same state-dict
    keys). It runs the copy of its active adapter, or the original when none is active or adapters are disabled."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []  # at most one: set_adapter refuses two copies of one module
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None  # set per call by inject's hook for mixed batches

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)  # training starts from the original

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def saved_state(self, name: str) -> dict[str, torch.Tensor]:
        """What a file holds for the adapter, as peft saves it: the copy's state_dict (buffers too)."""
        return self.modules_to_save[name].state_dict()

    @torch.no_grad()
    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.modules_to_save[name].load_state_dict(tensors)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def module_for(self, name: str) -> nn.Module:
        """What runs for adapter `name`: its copy, or the original if it has none here (or is "__base__")."""
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def running_module(self) -> nn.Module:
        return self.module_for(self.active_adapters[0] if self.active_adapters else BASE)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original_module(*args, **kwargs)
        if self.batch_adapter_names is not None:
            return self.mixed_batch_forward(self.batch_adapter_names, *args, **kwargs)
        return self.running_module()(*args, **kwargs)

    def mixed_batch_forward(self, names: list[str], x, *args, **kwargs):
        """Example i through module_for(names[i]), as peft does it: each module runs on its rows of the batch
        (x's first dimension), and the outputs go back in the batch's order. The examples must not interact,
        which holds for the layers of these models in eval mode (mixed batches require it)."""
        rows = {}  # the module that runs -> the examples it runs on
        for i, name in enumerate(names):
            rows.setdefault(self.module_for(name), []).append(i)
        if len(rows) == 1:
            return next(iter(rows))(x, *args, **kwargs)
        if not (isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == len(names)):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a mixed batch runs a different copy of this {type(self.original_module).__name__} "
                             f"(modules_to_save) per example, which needs the batch of {len(names)} examples as its "
                             f"first argument; it got {got}. Run these adapters one at a time with "
                             "set_adapter(model, name).")
        outputs = torch.cat([module(x[idx], *args, **kwargs) for module, idx in rows.items()])
        order = torch.tensor([i for idx in rows.values() for i in idx], device=outputs.device)
        return outputs[order.argsort()]  # back in the batch's order

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}"


# ----------------------------------------------------------------------------- finding targets

def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _adapter_modules(model: nn.Module) -> dict[str, AdapterLayer | ModulesToSave]:
    """Every module that holds adapters: what choosing, disabling and deleting adapters goes through."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSave))}


def _candidate_modules(model: nn.Module):
    """Every module a user could name: adapter layers and modules_to_save wrappers count under their own name,
    their insides do not."""
    inside = set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            inside.add(name + ".")
        if name:
            yield name, module


def _closest_names(name: str, candidates: dict[str, nn.Module]) -> list[str]:
    short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    return difflib.get_close_matches(name, short + list(candidates), n=5, cutoff=0.4) or short[:10]


def _nested(a: str, b: str) -> bool:
    """Module names a and b are the same module, or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


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
        raise ValueError(f"target module(s) {unmatched} match no module of {type(model).__name__}"
                         f"{' (after exclude_modules)' if config.exclude_modules else ''}. "
                         f"Closest module names: {_closest_names(unmatched[0], candidates)}.")
    for name, module in found.items():
        if isinstance(module, ModulesToSave):
            raise ValueError(f"{name!r} holds modules_to_save copies of adapters {module.adapters}, so it cannot be a "
                             f"target too. Exclude it (exclude_modules=[{name!r}]).")
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_class(module.base_layer)):
            other = next(n for n, m in METHODS.items() if isinstance(module, m.layer_class(module.base_layer)))
            raise ValueError(f"{name!r} already holds {other} adapters ({module.adapters}); one layer holds one method, "
                             f"so {config.peft_type} cannot go there. Exclude it (exclude_modules=[{name!r}]), or fold the "
                             "others in with merge_and_unload(model) first.")
        if check_target:  # the base layer, or the method's layer that already wraps it (checked against its adapters)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            method.layer_class(base).check_target(name, module, config)
    return found


CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)  # no forward of their own


def find_modules_to_save(model: nn.Module, config, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Modules the config's `modules_to_save` names (plain, or wrappers holding other adapters' copies), checked
    against its `targets` (find_targets' result) without changing anything."""
    names = getattr(config, "modules_to_save", None)  # a method's config need not have the field
    if not names:
        return {}
    candidates = dict(_candidate_modules(model))
    found = {n: m for n, m in candidates.items() if name_matches(names, n)}
    unmatched = [p for p in names if not any(name_matches([p], n) for n in found)]
    if unmatched:
        raise ValueError(f"modules_to_save {unmatched} match no module of {type(model).__name__}. "
                         f"Closest module names: {_closest_names(unmatched[0], candidates)}.")
    for name, module in found.items():
        for target in targets:
            if _nested(target, name):
                raise ValueError(f"{target!r} is a target and {'in' if target == name else 'nested with'} "
                                 f"modules_to_save ({name!r}): one module cannot get both an adapter layer and a "
                                 "trained copy (peft silently drops such targets). Drop it from one list, e.g. "
                                 f"exclude_modules=[{target!r}].")
        inner = [n for n in found if n != name and _nested(n, name)]
        if inner:
            raise ValueError(f"modules_to_save matches {name!r} and {inner[0]!r}, one inside the other, so the "
                             "copy of one would hold the other. List only one of them.")
        if isinstance(module, CONTAINERS):
            raise ValueError(f"modules_to_save {name!r} is a {type(module).__name__}, which has no forward of its "
                             "own to run a copy of; list the modules inside it.")
        held = sorted({a for m in module.modules() if isinstance(m, AdapterLayer) for a in m.adapters})
        if held:
            raise ValueError(f"modules_to_save {name!r} is or holds adapter layers (of adapters {held}), which a copy "
                             "would copy too. List a module without adapters, or fold them in with "
                             "merge_and_unload(model) first.")
    return found


# ----------------------------------------------------------------------------- injecting

def inject(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Wrap the targeted layers in place and return the model (any registered method's config).

    The first adapter becomes active; later ones are added inactive (like peft's add_adapter) until
    `set_adapter` picks them. Base weights are frozen; only active adapters, their copies of
    `config.modules_to_save` and the biases chosen by `config.bias` require grad.
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
    targets = find_targets(model, config, check_target)  # both raise before anything changes
    saved = find_modules_to_save(model, config, targets)
    configs = _configs(model)
    method = method_of(config)
    first = not configs
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        if not isinstance(module, AdapterLayer):
            module = method.layer_class(module)(module)
            _replace(model, name, module)
        module.add_adapter(adapter_name, config, name)
        module.train(module.base_layer.training)  # new modules start in training mode; follow the model's mode
    for name, module in saved.items():
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _replace(model, name, module)
            module.train(module.original_module.training)
        module.add_adapter(adapter_name)
    model.adapter_configs = {**configs, adapter_name: config}
    _install_hooks(model)
    set_adapter(model, adapter_name if first else _active(model))
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _configs(model: nn.Module) -> dict:
    return getattr(model, "adapter_configs", {})


def _active(model: nn.Module) -> list[str]:
    return getattr(model, "adapter_active", [])


def base_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """The biases bias="all" trains: every ".bias" outside the adapters' own tensors and the modules_to_save
    wrappers (their original stays frozen; their copies train with their adapter)."""
    skip = {id(p) for layer in adapter_layers(model).values() for n in layer.adapters
            for p in layer.adapter_parameters(n)}
    skip |= {id(p) for wrapper in saved_modules(model).values() for p in wrapper.parameters()}
    return {k: p for k, p in model.named_parameters() if k.endswith(".bias") and id(p) not in skip}


def _mark_trainable(model: nn.Module) -> None:
    active = _active(model)
    for module in _adapter_modules(model).values():
        for name in module.adapters:
            for p in module.adapter_parameters(name):
                p.requires_grad_(name in active)
    biases = {getattr(model.adapter_configs[n], "bias", "none") for n in active}
    if "all" in biases:
        for p in base_biases(model).values():
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
    for module in _adapter_modules(model).values():
        module.batch_adapter_names = names
    model._adapter_batch_set = True
    return args, kwargs


def _post_forward(model, args, output):
    if getattr(model, "_adapter_batch_set", False):
        for module in _adapter_modules(model).values():
            module.batch_adapter_names = None
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
    """Make `names` the active adapters (their updates are summed) and the only trainable ones. At most one of
    them may have a copy of any one modules_to_save module, as in peft: copies are not summed."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("cannot change active adapters while merged; call unmerge(model) first.")
    for name, wrapper in saved_modules(model).items():
        copies = [n for n in names if n in wrapper.adapters]
        if len(copies) > 1:
            raise ValueError(f"adapters {copies} each have a copy of {name!r} (modules_to_save) and only one copy can "
                             f"run, so they cannot be active together; activate one of them, e.g. "
                             f"set_adapter(model, {copies[0]!r}).")
    for module in _adapter_modules(model).values():
        module.active_adapters = [n for n in names if n in module.adapters]
    model.adapter_active = names
    _mark_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (modules_to_save: their originals). Merged layers are unmerged
    on entry and merged back on exit."""
    layers = list(adapter_layers(model).values())
    merged = {layer: list(layer.merged_adapters) for layer in layers}
    modules = list(_adapter_modules(model).values())
    for layer in layers:
        layer.unmerge()
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False
        for layer in layers:
            layer.merge(merged[layer])


def delete_adapter(model: nn.Module, name: str) -> None:
    _check_known(model, [name])
    layers = adapter_layers(model).values()
    if any(name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {name!r} is merged; call unmerge(model) before deleting it.")
    for module in _adapter_modules(model).values():  # a wrapper left without copies runs its original, as in peft
        module.delete_adapter(name)
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
    """Merge the active adapters and put the plain base layers back, and for each modules_to_save module the one
    that runs (the active adapter's copy, else the original), as peft does; the model is adapter-free afterwards."""
    layers = adapter_layers(model).values()
    if any(n not in layer.merged_adapters for layer in layers for n in layer.active_adapters):
        merge(model, safe_merge=safe_merge)
    for name, layer in adapter_layers(model).items():
        _replace(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model).items():
        _replace(model, name, wrapper.running_module())
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
    with_copies = [a for a, c in zip(adapters, cfgs) if c.modules_to_save]
    if with_copies:  # peft gives the combination a fresh copy of the original instead, dropping what they learned
        raise ValueError(f"adapters {with_copies} train copies of modules (modules_to_save), which have no update to "
                         "weight; combine adapters without modules_to_save.")
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
    """Counts of trainable and all parameters (shared tensors counted once), printed like peft's: copies of
    modules_to_save modules count, as trainable while their adapter is active. A 4-bit weight counts as the
    out x in values it stores (peft counts bitsandbytes' packed bytes twice, the same)."""
    params = list(model.parameters())  # parameters() already skips shared duplicates
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + sum(m.weight.numel for m in model.modules() if isinstance(m, Linear4bit))
    report = TrainableReport(trainable, total, 100.0 * trainable / total if total else 0.0)
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {report.percent:.4f}")
    return report
