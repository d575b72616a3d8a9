"""Saving and loading adapters in peft's file format.

A directory holds two files, exactly as peft 0.21 writes them:
  adapter_config.json        the LoraConfig under peft's field names (lora_alpha, lora_dropout, init_lora_weights, ...)
  adapter_model.safetensors  tensors keyed "base_model.model.<module>.lora_A.weight" / ".lora_B.weight"
                             (the adapter name is not part of the key; it is chosen again at load time)

So `peft.PeftModel.from_pretrained(hf_model, dir)` loads what `save_adapter` wrote, and `load_adapter` loads
what peft's `save_pretrained` wrote. Loading reads safetensors only, never a pickle, and checks the whole file
against the model before changing anything: a bad file raises and leaves the model as it was.

A PiSSA adapter's A and B belong with the residual base that PiSSA left behind (section 3 of the paper), so
load it into a model whose base weights were saved after injection, as with peft.
"""

import dataclasses
import difflib
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .inject import _check_new_name, find_targets, inject, lora_layers
from .methods.lora import LoraConfig, LoraLayer, in_out_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose files these match

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
# Fields that only describe where the file came from; any value is fine.
INFORMATIONAL = {"auto_mapping", "base_model_name_or_path", "inference_mode", "peft_version", "revision",
                 "task_type", "megatron_core", "qalora_group_size", "ensure_weight_tying", "peft_type"}


def config_to_peft_dict(config: LoraConfig) -> dict:
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[config.init]
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {**PEFT_DEFAULTS, "r": config.r, "lora_alpha": alpha, "lora_dropout": config.dropout,
            "target_modules": config.target_modules, "exclude_modules": config.exclude_modules,
            "use_rslora": config.use_rslora, "init_lora_weights": init, "bias": config.bias,
            "lora_bias": config.lora_bias, "fan_in_fan_out": config.fan_in_fan_out}


def config_from_peft_dict(d: dict) -> LoraConfig:
    if d.get("peft_type") != "LORA":
        raise ValueError(f"this is a {d.get('peft_type')!r} adapter; only peft_type 'LORA' files can be loaded here.")
    ours = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "init_lora_weights",
            "bias", "lora_bias", "fan_in_fan_out"}
    unsupported = sorted(k for k, v in d.items() if k not in ours | INFORMATIONAL and v != PEFT_DEFAULTS.get(k)
                         and v not in (None, False, {}, []))
    if unsupported:
        raise ValueError(f"adapter_config.json uses peft features minilora's LoRA does not implement: {unsupported}. "
                         "Save the adapter without them (plain LoRA) to load it here.")
    init = d.get("init_lora_weights", True)
    init = "gaussian" if init == "gaussian" else "pissa" if str(init).startswith("pissa") else "default"
    return LoraConfig(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                      target_modules=d.get("target_modules"), exclude_modules=d.get("exclude_modules"),
                      use_rslora=d.get("use_rslora", False), init=init, bias=d.get("bias", "none"),
                      lora_bias=d.get("lora_bias", False), fan_in_fan_out=d.get("fan_in_fan_out", False))


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's checkpoint keys (adapter name removed, no "base_model.model." prefix),
    plus the base biases that `config.bias` made trainable."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r} in this model; it has {sorted(configs)}.")
    out = {}
    layers = lora_layers(model)
    for lname, layer in layers.items():
        if adapter_name in layer.lora_A:
            out[f"{lname}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{lname}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if layer.lora_B[adapter_name].bias is not None:
                out[f"{lname}.lora_B.bias"] = layer.lora_B[adapter_name].bias
    bias = configs[adapter_name].bias
    if bias == "all":
        out.update({k: v for k, v in model.state_dict().items() if k.endswith(".bias") and ".lora_" not in k})
    elif bias == "lora_only":
        out.update({f"{n}.base_layer.bias": m.base_layer.bias for n, m in layers.items()
                    if getattr(m.base_layer, "bias", None) is not None})
    return {k: v.detach() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Write adapter_config.json and adapter_model.safetensors as peft's save_pretrained does."""
    tensors = {PREFIX + k: v.cpu().contiguous().clone() for k, v in lora_state_dict(model, adapter_name).items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    d = config_to_peft_dict(model.lora_configs[adapter_name])
    d["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    d["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True))


def _read(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
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

    Like peft, the loaded adapter is frozen unless `is_trainable`; it is active if it is the model's first
    adapter, otherwise pick it with set_adapter. Everything is validated before the model is touched.
    """
    config, tensors = _read(directory)
    _check_new_name(model, adapter_name)
    targets = find_targets(model, config)

    expected = {}
    for name, module in targets.items():
        in_f, out_f = in_out_features(module.base_layer if isinstance(module, LoraLayer) else module)
        expected[f"{name}.lora_A.weight"] = (config.r, in_f)
        expected[f"{name}.lora_B.weight"] = (out_f, config.r)
        if config.lora_bias:
            expected[f"{name}.lora_B.bias"] = (out_f,)
    params = dict(model.named_parameters())
    bias_targets = {}  # file key -> the model parameter it fills
    for key in tensors:
        if ".lora_" in key:
            continue
        module_name = key.removesuffix(".base_layer.bias")
        param_key = f"{module_name}.bias" if module_name in targets and not isinstance(targets[module_name], LoraLayer) else key
        if param_key not in params:
            close = difflib.get_close_matches(param_key, list(params), n=3)
            raise ValueError(f"{WEIGHTS_NAME} has {key!r}, which matches no parameter of the model (closest: {close}).")
        bias_targets[key] = params[param_key]
        expected[key] = tuple(params[param_key].shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{WEIGHTS_NAME} does not fit this model with target_modules={config.target_modules}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {shape}" for k, shape in expected.items()
             if tuple(tensors[k].shape) != shape]
    if wrong:
        raise ValueError(f"shape mismatch between {WEIGHTS_NAME} and the model: {wrong[:5]}.")

    # everything checked: now change the model (init="default" so loading never rewrites base weights)
    inject(model, dataclasses.replace(config, init="default"), adapter_name)
    model.lora_configs[adapter_name] = config
    layers = lora_layers(model)
    with torch.no_grad():
        for key, t in tensors.items():
            if ".lora_" in key:
                lname, _, rest = key.partition(".lora_")
                kind, _, pname = rest.partition(".")
                getattr(getattr(layers[lname], f"lora_{kind}")[adapter_name], pname).copy_(t)
            else:
                bias_targets[key].copy_(t)
    if not is_trainable:
        for layer in layers.values():
            if adapter_name in layer.lora_A:
                for p in [*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()]:
                    p.requires_grad_(False)
        for p in bias_targets.values():
            p.requires_grad_(False)
    return model
