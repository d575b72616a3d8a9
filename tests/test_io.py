"""Adapter files: peft's layout, round trips, and loads that fail without touching the model."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minilora.inject import inject, lora_layers, set_adapter
from minilora.io import load_adapter, lora_state_dict, save_adapter
from minilora.lora import LoraConfig


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


def assert_untouched(model, snap):
    state, names = snap
    assert [n for n, _ in model.named_modules()] == names
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not hasattr(model, "lora_configs") or "default" not in model.lora_configs


def test_lora_state_dict_uses_peft_keys():
    _, model = trained(lora_bias=True)
    assert set(lora_state_dict(model)) == {f"lin{i}.lora_{m}.{p}" for i in (0, 1) for m, p in
                                           [("A", "weight"), ("B", "weight"), ("B", "bias")]}
    _, model = trained(bias="lora_only")
    assert "lin0.base_layer.bias" in lora_state_dict(model)
    with pytest.raises(ValueError, match="no adapter 'x'"):
        lora_state_dict(model, "x")


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
    assert torch.equal(loaded(x), model(x))
    assert loaded.lora_configs["mine"] == model.lora_configs["default"]
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_load_a_second_adapter_next_to_the_first(tmp_path):
    base, model = trained()
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path, "one")
    load_adapter(loaded, tmp_path, "two")
    assert set(lora_layers(loaded)["lin0"].lora_A) == {"one", "two"}
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
        config["peft_type"] = "IA3"
    elif case == "unsupported":
        config["use_dora"] = True
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
    ("peft_type", "only peft_type 'LORA'"),
    ("unsupported", "use_dora"),
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
