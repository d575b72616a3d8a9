"""Adapter files: peft's layout, round trips, and loads that fail without touching the model."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minilora.inject import adapter_layers, inject, merge, set_adapter
from minilora.io import (adapter_state_dict, config_from_peft_dict, load_adapter,
                         save_adapter)
from minilora.methods.lora import PEFT_DEFAULTS, LoraConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def trained(**kw):
    torch.manual_seed(0)
    base = MLP()
    model = inject(copy.deepcopy(base), LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["lin0", "lin1"], **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return base, model.eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()]


def assert_untouched(model, snap, name="default"):
    state, names = snap
    assert [n for n, _ in model.named_modules()] == names
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # not a bit changed
    assert not hasattr(model, "adapter_configs") or name not in model.adapter_configs


def test_lora_state_dict_uses_peft_keys():
    _, model = trained(lora_bias=True)
    assert set(adapter_state_dict(model)) == {f"lin{i}.lora_{m}.{p}" for i in (0, 1) for m, p in
                                           [("A", "weight"), ("B", "weight"), ("B", "bias")]}
    _, model = trained(bias="lora_only")
    assert "lin0.base_layer.bias" in adapter_state_dict(model)
    with pytest.raises(ValueError, match="no adapter 'x'"):
        adapter_state_dict(model, "x")


def test_save_writes_peft_layout(tmp_path):
    _, model = trained(use_rslora=True, dropout=0.1)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["lora_dropout"] == 0.1 and config["init_lora_weights"] is True
    assert config["target_modules"] == ["lin0", "lin1"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.lin{i}.lora_{m}.weight" for i in (0, 1) for m in "AB"}


@pytest.mark.parametrize("kw", [{}, {"bias": "all"}, {"lora_bias": True}, {"init": "gaussian"}])
def test_round_trip_gives_identical_outputs(tmp_path, kw):
    base, model = trained(**kw)
    x = torch.randn(3, 10)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path, adapter_name="mine").eval()
    assert torch.equal(loaded(x), model(x))  # the same weights through the same operations
    assert loaded.adapter_configs["mine"] == model.adapter_configs["default"]
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    # exactly what training the saved adapter trains: A and B, and the biases its `bias` option names
    assert trainable_names(trainable) == trainable_names(model)
    assert {n for n in trainable_names(trainable) if ".lora_" not in n} == {
        "all": {"lin0.base_layer.bias", "lin1.base_layer.bias"}}.get(kw.get("bias"), set())


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_loading_an_adapter_with_trained_biases_into_a_model_that_has_an_adapter(tmp_path, bias):
    base, model = trained(bias=bias)  # biases trained: they are part of the file
    x = torch.randn(3, 10)
    save_adapter(model, tmp_path)
    other = inject(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lin0"]), "first")  # bias="none"
    load_adapter(other, tmp_path, "second")
    # lin1 gets wrapped now, lin0 already was: the file's biases land in both base layers
    for name in ("lin0", "lin1"):
        assert torch.equal(adapter_layers(other)[name].base_layer.bias, adapter_layers(model)[name].base_layer.bias)
    assert not any(p.requires_grad for n, p in other.named_parameters() if "second" in n or ".bias" in n)
    set_adapter(other, "second")
    assert torch.equal(other.eval()(x), model(x))  # the same weights through the same operations
    assert other.adapter_configs["second"].bias == bias and other.adapter_configs["first"].bias == "none"


def test_loading_into_a_merged_model_raises_and_leaves_it_untouched(tmp_path):
    base, model = trained()
    save_adapter(model, tmp_path)
    merged = inject(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lin0"]), "first")
    merge(merged)
    snap = snapshot(merged)
    with pytest.raises(ValueError, match="merged adapters; call unmerge"):
        load_adapter(merged, tmp_path, "second")
    assert_untouched(merged, snap, name="second")


def test_exclude_modules_survive_a_round_trip(tmp_path):
    base, model = trained(target_modules=r"lin\d", exclude_modules=["lin1"])
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exclude_modules"] == ["lin1"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert set(adapter_layers(loaded)) == {"lin0"}
    assert loaded.adapter_configs["default"].exclude_modules == ["lin1"]


def test_load_a_second_adapter_next_to_the_first(tmp_path):
    base, model = trained()
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path, "one")
    load_adapter(loaded, tmp_path, "two")
    assert set(adapter_layers(loaded)["lin0"].lora_A) == {"one", "two"}
    set_adapter(loaded, "two")
    x = torch.randn(2, 10)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    with pytest.raises(ValueError, match="already in this model"):
        load_adapter(loaded, tmp_path, "two")


def corrupt(tmp_path, case):
    _, model = trained()
    save_adapter(model, tmp_path)
    cfg_path, w_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    config, tensors = json.loads(cfg_path.read_text()), load_file(w_path)
    if case == "wrong_shapes":
        tensors["base_model.model.lin0.lora_A.weight"] = torch.zeros(4, 11)
    elif case == "wrong_rank":
        config["r"] = 2
    elif case == "wrong_target":
        config["target_modules"] = ["lin0", "lin7"]
    elif case == "extra_key":
        tensors["base_model.model.lin9.lora_A.weight"] = torch.zeros(4, 10)
    elif case == "missing_key":
        del tensors["base_model.model.lin1.lora_B.weight"]
    elif case == "peft_type":
        config["peft_type"] = "VERA"
    elif case == "unsupported":
        config["use_qalora"] = True
    elif case == "missing_config":
        cfg_path.unlink()
        return
    elif case == "missing_weights":
        w_path.unlink()
        return
    elif case == "pickle_only":
        w_path.unlink()
        torch.save(tensors, tmp_path / "adapter_model.bin")
        return
    elif case == "bad_json":
        cfg_path.write_text("{not json")
        return
    cfg_path.write_text(json.dumps(config))
    save_file(tensors, w_path)


@pytest.mark.parametrize("case, message", [
    ("wrong_shapes", "shape mismatch"),
    ("wrong_rank", "shape mismatch"),
    ("wrong_target", r"\['lin7'\] match no module"),
    ("extra_key", "unexpected"),
    ("missing_key", "missing"),
    ("peft_type", r"this is a 'VERA' adapter; minilora loads peft_type \["),
    ("unsupported", "use_qalora"),
    ("missing_config", "adapter_config.json is missing"),
    ("missing_weights", "adapter_model.safetensors is missing"),
    ("pickle_only", "never loaded"),
    ("bad_json", "not valid JSON"),
])
def test_failed_load_leaves_model_untouched(tmp_path, case, message):
    corrupt(tmp_path, case)
    for model in (MLP(), inject(MLP(), LoraConfig(r=2, target_modules=["lin0"]), "other")):
        snap = snapshot(model)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_adapter(model, tmp_path)
        assert_untouched(model, snap)


def test_config_from_a_minimal_peft_file_takes_peft_defaults():
    """peft leaves out nothing it writes, but older files and hand-written ones may: missing fields mean
    peft's defaults (r 8, lora_alpha 8, no dropout, no rsLoRA, default init, bias "none", ...)."""
    config = config_from_peft_dict({"peft_type": "LORA", "target_modules": ["lin0"]})
    assert config == LoraConfig(r=8, alpha=8, dropout=0.0, target_modules=["lin0"], exclude_modules=None,
                                use_rslora=False, init="default", bias="none", lora_bias=False, fan_in_fan_out=False)


@pytest.mark.parametrize("init_lora_weights, init", [(True, "default"), ("gaussian", "gaussian"), ("pissa", "pissa"),
                                                     ("pissa_niter_4", "pissa"), (False, "default")])
def test_config_from_peft_reads_every_field(init_lora_weights, init):
    d = {**PEFT_DEFAULTS, "r": 6, "lora_alpha": 12.5, "lora_dropout": 0.2, "target_modules": ["lin0", "lin1"],
         "exclude_modules": ["lin1"], "use_rslora": True, "init_lora_weights": init_lora_weights, "bias": "lora_only",
         "lora_bias": True, "fan_in_fan_out": True}
    assert config_from_peft_dict(d) == LoraConfig(r=6, alpha=12.5, dropout=0.2, target_modules=["lin0", "lin1"],
                                                  exclude_modules=["lin1"], use_rslora=True, init=init,
                                                  bias="lora_only", lora_bias=True, fan_in_fan_out=True)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_config_to_peft_and_back_is_the_same_config(init):
    config = LoraConfig(r=6, alpha=12.0, dropout=0.2, target_modules=r"lin\d", exclude_modules=["lin1"],
                        use_rslora=True, init=init, bias="all", lora_bias=True, fan_in_fan_out=True)
    d = config.to_peft_dict()
    assert d["init_lora_weights"] == {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[init]
    assert d["lora_alpha"] == 12 and type(d["lora_alpha"]) is int  # written as peft writes an integer alpha
    assert LoraConfig(alpha=2.5, target_modules=["x"]).to_peft_dict()["lora_alpha"] == 2.5
    assert config_from_peft_dict(d) == config


def test_peft_fields_that_are_left_at_their_default_are_accepted():
    d = {**PEFT_DEFAULTS, "target_modules": ["lin0"], "layers_to_transform": None, "rank_pattern": {},
         "alpha_pattern": {}, "use_qalora": False, "trainable_token_indices": [], "loftq_config": {}}
    assert config_from_peft_dict(d).target_modules == ["lin0"]
    with pytest.raises(ValueError, match=r"\['rank_pattern', 'use_qalora'\]"):
        config_from_peft_dict({**d, "use_qalora": True, "rank_pattern": {"lin0": 2}})


def test_state_dict_of_a_model_without_adapters_is_an_error():
    with pytest.raises(ValueError, match=r"no adapter 'default' in this model; it has \[\]"):
        adapter_state_dict(MLP())


def test_state_dict_with_bias_all_and_lora_bias_has_each_tensor_once_under_peft_keys():
    _, model = trained(bias="all", lora_bias=True)
    assert set(adapter_state_dict(model)) == {f"lin{i}.{k}" for i in (0, 1) for k in
                                           ["lora_A.weight", "lora_B.weight", "lora_B.bias", "base_layer.bias"]}


def test_saving_a_second_adapter_writes_its_own_weights(tmp_path):
    base, model = trained()
    inject(model, LoraConfig(r=2, alpha=3, target_modules=["lin1"]), "second")
    with torch.no_grad():
        adapter_layers(model)["lin1"].lora_B["second"].weight.normal_()
    save_adapter(model, tmp_path, "second")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model.lin1.lora_A.weight", "base_model.model.lin1.lora_B.weight"}
    assert torch.equal(tensors["base_model.model.lin1.lora_B.weight"], adapter_layers(model)["lin1"].lora_B["second"].weight)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2


def test_saved_files_are_formatted_as_peft_writes_them(tmp_path):
    _, model = trained()
    model.name_or_path = "bases/mlp-10-20-6"
    save_adapter(model, tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)  # peft's to_json_string layout
    assert config["base_model_name_or_path"] == "bases/mlp-10-20-6"
    assert config["auto_mapping"] == {"base_model_class": "MLP", "parent_library": MLP.__module__}
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    model.name_or_path = ""  # no name: null, as peft writes it
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_a_file_key_that_fits_no_parameter_names_the_closest_ones(tmp_path):
    _, model = trained()
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lin0.biass"] = torch.zeros(20)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'lin0.biass', which matches no parameter of the model \(closest: \['lin0.bias'"):
        load_adapter(MLP(), tmp_path)


def test_loading_a_pissa_adapter_keeps_the_saved_residual_base(tmp_path):
    torch.manual_seed(0)
    model = inject(MLP(), LoraConfig(r=4, alpha=8, init="pissa", target_modules=["lin0", "lin1"])).eval()
    save_adapter(model, tmp_path)
    residual = MLP()  # the base as PiSSA left it, saved and loaded like any other weights
    residual.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    before = {k: v.clone() for k, v in residual.state_dict().items()}
    loaded = load_adapter(residual, tmp_path).eval()
    for name, layer in adapter_layers(loaded).items():  # no second PiSSA: the base is not decomposed again
        assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])
    assert loaded.adapter_configs["default"].init == "pissa"
    x = torch.randn(3, 10)
    assert torch.equal(loaded(x), model(x))  # the same weights through the same operations


def test_loading_an_adapter_whose_rank_cannot_exist_on_a_layer_is_refused(tmp_path):
    _, model = trained(r=2, target_modules=["lin1"])  # lin1: 20 -> 6
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8  # and tensors shaped for rank 8, so that only the rank itself is wrong
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.lin1.lora_A.weight": torch.zeros(8, 20),
               "base_model.model.lin1.lora_B.weight": torch.zeros(6, 8)}, tmp_path / "adapter_model.safetensors")
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"r=8 is larger than min\(in, out\)=6 of layer 'lin1'"):
        load_adapter(model, tmp_path)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------- modules_to_save

def with_copy():
    """LoRA on lin0 and a trained copy of lin1 (modules_to_save), every trainable tensor moved off its init."""
    return trained(target_modules=["lin0"], modules_to_save=["lin1"])


def test_copies_are_saved_under_the_modules_own_keys_and_load_frozen_unless_trainable(tmp_path):
    base, model = with_copy()
    x = torch.randn(3, 10)
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight",
                    "base_model.model.lin1.weight", "base_model.model.lin1.bias"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lin1"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(loaded(x), model(x))  # the same weights through the same operations
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable_names(trainable) == trainable_names(model)
    assert "lin1.modules_to_save.default.weight" in trainable_names(trainable)
    load_adapter(trainable, tmp_path, "again")  # a second copy goes into the same wrapper, frozen
    assert trainable.lin1.adapters == ["default", "again"]
    assert not any(p.requires_grad for p in trainable.lin1.adapter_parameters("again"))


def corrupt_copy(tmp_path, case):
    _, model = with_copy()
    save_adapter(model, tmp_path)
    cfg_path, w_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    config, tensors = json.loads(cfg_path.read_text()), load_file(w_path)
    if case == "missing_copy_key":
        del tensors["base_model.model.lin1.bias"]
    elif case == "copy_shape":
        tensors["base_model.model.lin1.weight"] = torch.zeros(6, 21)
    elif case == "unmatched_name":
        config["modules_to_save"] = ["lin7"]
    elif case == "also_a_target":
        config["target_modules"] = ["lin0", "lin1"]
    elif case == "uncovered_base_weight":  # as peft writes "norm" copies of modules our matching does not name
        config["modules_to_save"] = None
    cfg_path.write_text(json.dumps(config))
    save_file(tensors, w_path)


@pytest.mark.parametrize("case, message", [
    ("missing_copy_key", r"missing \['lin1.bias'\]"),
    ("copy_shape", r"lin1.weight: file \(6, 21\) vs model \(6, 20\)"),
    ("unmatched_name", r"modules_to_save \['lin7'\] match no module"),
    ("also_a_target", "'lin1' (is a target and in modules_to_save|holds modules_to_save copies of adapters)"),
    # (on the second model lin1 is another adapter's wrapper: its bias is lin1.original_module.bias there)
    ("uncovered_base_weight", r"'lin1.bias', (a tensor of the base model that neither the adapter \(bias='none'\) "
                              r"nor its modules_to_save=None covers|which matches no parameter)"),
])
def test_a_failed_load_with_copies_leaves_the_model_untouched(tmp_path, case, message):
    corrupt_copy(tmp_path, case)
    for model in (MLP(), inject(MLP(), LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"]), "other")):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path)
        assert_untouched(model, snap)
