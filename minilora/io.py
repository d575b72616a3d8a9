"""Saving and loading adapters in peft's file format.

A directory holds two files, exactly as peft 0.21 writes them:
  adapter_config.json        the method's config under peft's field names (`peft_type` says which method;
                             each config class converts itself: `to_peft_dict` / `from_peft_dict`)
  adapter_model.safetensors  tensors keyed "base_model.model.<module>.<key>", <key> as the layer's
                             `adapter_state` names it: lora_A.weight, lora_B.weight, lora_magnitude_vector.weight,
                             ia3_l, lora_E (the adapter name is not part of the key; it is chosen again at
                             load time); a copy of a `modules_to_save` module under the module's own keys,
                             "base_model.model.<module>.<key of its state_dict>" (peft drops the wrapper's
                             "modules_to_save.<adapter>." from them, so the file reads like the module itself)

Nothing here knows a method: shapes come from the layer class's `expected_shapes`, tensors go in through
`load_adapter_state`, and a config may provide `for_loading()` (the config to inject with before the file's
tensors are copied in, e.g. LoRA without PiSSA's data-dependent init).

So `peft.PeftModel.from_pretrained(hf_model, dir)` loads what `save_adapter` wrote, and `load_adapter` loads
what peft's `save_pretrained` wrote. Loading reads safetensors only, never a pickle, and checks the whole file
against the model before changing anything: a bad file raises and leaves the model as it was. A file holds
nothing else: a key naming a base weight that is neither a copy of a modules_to_save module nor a bias the
config's `bias` trains is refused rather than written into the base (a peft file whose modules_to_save entry
matched more modules by peft's bare suffix, e.g. "norm" for "input_layernorm", shows up this way).

A PiSSA adapter's A and B belong with the residual base that PiSSA left behind (section 3 of the paper), so
load it into a model whose base weights were saved after injection, as with peft.
"""

import difflib
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .inject import (METHODS, AdapterLayer, ModulesToSave, _adapter_modules, _check_new_name, _configs, adapter_layers,
                     base_biases, find_modules_to_save, find_targets, inject, method_of)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def config_from_peft_dict(d: dict):
    """The config of the method peft's `peft_type` names, read from an adapter_config.json dict."""
    method = METHODS.get(d.get("peft_type"))
    if method is None:
        raise ValueError(f"this is a {d.get('peft_type')!r} adapter; minilora loads peft_type {sorted(METHODS)}.")
    return method.config.from_peft_dict(d)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's checkpoint keys (adapter name removed, no "base_model.model." prefix):
    its layers' tensors, its copies of modules_to_save modules, and the base biases `config.bias` made trainable."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r} in this model; it has {sorted(configs)}.")
    out = {}
    for name, module in _adapter_modules(model).items():
        if adapter_name in module.adapters:
            out.update({f"{name}.{k}": v for k, v in module.saved_state(adapter_name).items()})
    layers = adapter_layers(model)
    bias = getattr(configs[adapter_name], "bias", "none")
    if bias == "all":
        out.update(base_biases(model))
    elif bias == "lora_only":
        out.update({f"{n}.base_layer.bias": m.base_layer.bias for n, m in layers.items()
                    if getattr(m.base_layer, "bias", None) is not None})
    return {k: v.detach() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Write adapter_config.json and adapter_model.safetensors as peft's save_pretrained does."""
    tensors = {PREFIX + k: v.cpu().contiguous().clone() for k, v in adapter_state_dict(model, adapter_name).items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    d = _configs(model)[adapter_name].to_peft_dict()
    d["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    d["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True))


def _read(directory: str) -> tuple[object, dict[str, torch.Tensor]]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist.")
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        raise FileNotFoundError(f"{weights_path} is missing" + (
            "; found adapter_model.bin, which is a pickle and is never loaded here. Re-save it with "
            "safe_serialization=True." if pickled else "."))
    try:
        with open(config_path) as f:
            config = config_from_peft_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    tensors = load_file(weights_path)
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Inject the saved adapter under `adapter_name` and load its weights.

    Like peft, the loaded adapter (its copies of modules_to_save modules too) is frozen unless `is_trainable`;
    it is active if it is the model's first adapter, otherwise pick it with set_adapter. Everything is
    validated before the model is touched.
    """
    config, tensors = _read(directory)
    _check_new_name(model, adapter_name)
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config, targets)

    expected = {}  # file key -> (name of the layer or wrapper, key inside it, shape)
    for name, module in targets.items():
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        layer_cls = method_of(config).layer_class(base)
        for key, shape in layer_cls.expected_shapes(name, base, config).items():
            expected[f"{name}.{key}"] = (name, key, shape)
    for name, module in saved.items():  # a copy has the original's state_dict
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for key, t in original.state_dict().items():
            expected[f"{name}.{key}"] = (name, key, tuple(t.shape))
    params = dict(model.named_parameters())
    bias_targets = {}  # file key -> the base bias it fills (config.bias != "none")
    adapter_attrs = {a for m in METHODS.values() for cls in (m.layer, *m.layer_for_base.values()) for a in cls.adapter_tensors}
    for key in sorted(set(tensors) - set(expected)):
        if adapter_attrs & set(key.split(".")):
            continue  # an adapter tensor this config does not have: reported as unexpected below
        module_name = key.removesuffix(".base_layer.bias")
        param_key = f"{module_name}.bias" if module_name in targets and not isinstance(targets[module_name], AdapterLayer) else key
        if param_key not in params:
            close = difflib.get_close_matches(param_key, list(params), n=3)
            raise ValueError(f"{WEIGHTS_NAME} has {key!r}, which matches no parameter of the model (closest: {close}).")
        bias = getattr(config, "bias", "none")
        if not param_key.endswith(".bias") or bias == "none":
            listed = getattr(config, "modules_to_save", None)
            raise ValueError(f"{WEIGHTS_NAME} has {key!r}, a tensor of the base model that neither the adapter "
                             f"(bias={bias!r}) nor its modules_to_save={listed} covers, so it is not written into the "
                             "base. If peft wrote it, its modules_to_save matched this module by a bare suffix: add "
                             "the module's own name to modules_to_save in adapter_config.json.")
        bias_targets[key] = params[param_key]
        expected[key] = (None, None, tuple(params[param_key].shape))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{WEIGHTS_NAME} does not fit this {config.peft_type} adapter on this model with "
                         f"target_modules={config.target_modules}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {shape}" for k, (_, _, shape) in expected.items()
             if tuple(tensors[k].shape) != shape]
    if wrong:
        raise ValueError(f"shape mismatch between {WEIGHTS_NAME} and the model: {wrong[:5]}.")

    # everything checked: now change the model (without data-dependent init, so loading never rewrites base weights)
    inject(model, config.for_loading() if hasattr(config, "for_loading") else config, adapter_name)
    model.adapter_configs[adapter_name] = config
    modules = _adapter_modules(model)
    with torch.no_grad():
        per_module = {}
        for key, t in tensors.items():
            lname, inner, _ = expected[key]
            if lname is None:
                bias_targets[key].copy_(t)
            else:
                per_module.setdefault(lname, {})[inner] = t
        for lname, ts in per_module.items():
            modules[lname].load_adapter_state(adapter_name, ts)
    if not is_trainable:
        for module in modules.values():
            if adapter_name in module.adapters:
                for p in module.adapter_parameters(adapter_name):
                    p.requires_grad_(False)
        for p in bias_targets.values():
            p.requires_grad_(False)
    return model
