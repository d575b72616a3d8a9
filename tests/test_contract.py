"""The adapter contract: a method is a config dataclass plus an AdapterLayer subclass, registered in one line.

A toy method written here, a learned additive bias per output feature (y = W x + b + d), is registered the
way a new method file would be, and every shared operation (inject, set_adapter, disable, delete, merge,
merge_and_unload, trainable_report, save and load) works on it without any change to the shared code. Then
the rules that hold between methods: one layer holds one method; a file of one method never loads into a
layer of another; a config that is not a registered method is refused.
"""

import copy
import importlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from minilora.io import adapter_state_dict, load_adapter, save_adapter
from minilora.methods.base import PEFT_FORMAT_VERSION, AdapterLayer, check_peft_dict, check_target_list
from minilora.methods.ia3 import IA3Config
from minilora.methods.lora import LoraConfig

from adapters import MLP

inj = importlib.import_module("minilora.inject")  # the module: `minilora.inject` the attribute is the function


@dataclass
class ShiftConfig:
    peft_type: ClassVar[str] = "SHIFT"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def __post_init__(self):
        self.target_modules = check_target_list(self.target_modules, "target_modules")

    def to_peft_dict(self) -> dict:
        return {"peft_type": "SHIFT", "peft_version": PEFT_FORMAT_VERSION, "target_modules": self.target_modules,
                "exclude_modules": self.exclude_modules}

    @classmethod
    def from_peft_dict(cls, d):
        check_peft_dict(d, "SHIFT", {}, {"target_modules", "exclude_modules"})
        return cls(d["target_modules"], d.get("exclude_modules"))


class ShiftLayer(AdapterLayer):
    adapter_tensors = ("shift",)

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.shift = nn.ParameterDict()

    @classmethod
    def check_target(cls, module_name, module, config):
        module = module.base_layer if isinstance(module, ShiftLayer) else module
        if not isinstance(module, nn.Linear) or module.bias is None:
            raise ValueError(f"{module_name!r}: SHIFT needs an nn.Linear with a bias")

    @classmethod
    def expected_shapes(cls, module_name, module, config):
        return {"shift": (module.out_features,)}

    def add_adapter(self, name, config, module_name=""):
        dtype, device = self.base_dtype_device()
        self.shift[name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))

    def merged_weights(self, name):
        return self.base_layer.weight, self.base_layer.bias + self.shift[name]

    @torch.no_grad()
    def unmerge(self):
        while self.merged_adapters:
            self.base_layer.bias -= self.shift[self.merged_adapters.pop()]

    def adapter_forward(self, x, pending):
        y = self.base_layer(x)
        for name in pending:
            y = y + self.shift[name]
        return y


@pytest.fixture
def shift_registered(monkeypatch):
    """One registry line, as a new method file would add."""
    monkeypatch.setitem(inj.METHODS, "SHIFT", inj.Method(ShiftConfig, ShiftLayer))


def shifted(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in inj.adapter_layers(model).values():
            if name in layer.adapters:
                layer.shift[name].copy_(torch.randn(layer.out_features, generator=g))
    return model


def by_hand(base, x, shifts):
    """The toy method's equation on the untouched base: each targeted layer adds its shifts."""
    h = x
    for i in range(base.depth):
        h = getattr(base, f"lin{i}")(h) + sum(shifts.get(f"lin{i}", []), torch.zeros(()))
        h = torch.relu(h) if i < base.depth - 1 else h
    return h


def test_a_new_method_works_through_every_shared_operation(shift_registered, tmp_path):
    base = MLP(6, 8, 5).double().eval()
    model = copy.deepcopy(base)
    x = torch.randn(3, 6, dtype=torch.float64)
    inj.inject(model, ShiftConfig(["lin0", "lin1"]), "a")
    inj.inject(model, ShiftConfig(["lin1"]), "b")
    shifted(model, "a", 0), shifted(model, "b", 1)
    sa = {n: [layer.shift["a"].detach()] for n, layer in inj.adapter_layers(model).items()}
    sb = inj.adapter_layers(model)["lin1"].shift["b"].detach()

    assert torch.allclose(model(x), by_hand(base, x, sa), rtol=0, atol=1e-12)  # first adapter active
    inj.set_adapter(model, ["a", "b"])
    both = {"lin0": sa["lin0"], "lin1": sa["lin1"] + [sb]}
    assert torch.allclose(model(x), by_hand(base, x, both), rtol=0, atol=1e-12)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.shift.a", "lin1.shift.a", "lin1.shift.b"}
    assert inj.trainable_report(model, verbose=False).trainable == 8 + 5 + 5

    with inj.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    inj.merge(model)
    assert torch.allclose(model(x), by_hand(base, x, both), rtol=0, atol=1e-12)
    inj.unmerge(model)
    assert torch.allclose(model.lin1.base_layer.bias, base.lin1.bias, rtol=0, atol=1e-12)

    assert set(adapter_state_dict(model, "b")) == {"lin1.shift"}
    save_adapter(model, tmp_path / "b", "b")
    other = load_adapter(copy.deepcopy(base), tmp_path / "b", "b")
    assert torch.equal(other.lin1.shift["b"], sb) and not other.lin1.shift["b"].requires_grad

    inj.delete_adapter(model, "b")
    assert model.lin1.adapters == ["a"] and set(model.adapter_configs) == {"a"}
    unloaded = inj.merge_and_unload(model)
    assert type(unloaded.lin0) is nn.Linear
    assert torch.allclose(unloaded(x), by_hand(base, x, sa), rtol=0, atol=1e-12)


def test_the_method_checks_its_own_targets(shift_registered):
    model = MLP(4, 4)
    model.lin0.bias = None
    with pytest.raises(ValueError, match="SHIFT needs an nn.Linear with a bias"):
        inj.inject(model, ShiftConfig(["lin0"]))
    assert not inj.adapter_layers(model)


def test_one_layer_holds_one_method():
    model = inj.inject(MLP(8, 8, 8), LoraConfig(r=2, target_modules=["lin0"]), "lora")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'lin0' already holds LORA adapters.*exclude_modules=\['lin0'\]"):
        inj.inject(model, IA3Config(target_modules=["lin0", "lin1"]), "ia3")
    assert set(model.adapter_configs) == {"lora"} and type(model.lin1) is nn.Linear  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_two_methods_on_different_layers_of_one_model():
    base = MLP(8, 8, 8)
    model = inj.inject(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lin0"]), "lora")
    inj.inject(model, IA3Config(target_modules=["lin1"]), "ia3")
    inj.set_adapter(model, ["lora", "ia3"])
    with torch.no_grad():
        model.lin0.lora_B["lora"].weight.normal_()
        model.lin1.ia3_l["ia3"].fill_(2.0)
    x = torch.randn(4, 8)
    h = torch.relu(base.lin0(x) + model.lin0.scaling["lora"] * x @ (model.lin0.lora_B["lora"].weight
                                                                      @ model.lin0.lora_A["lora"].weight).T)
    torch.testing.assert_close(model(x), 2.0 * base.lin1(h))  # IA3 scales the whole output, bias included (peft)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "lin0.lora_A.lora.weight", "lin0.lora_B.lora.weight", "lin1.ia3_l.ia3"}


def test_a_file_of_one_method_does_not_load_into_a_layer_of_another(tmp_path):
    ia3 = inj.inject(MLP(8, 8, 8), IA3Config(target_modules=["lin0"]))
    save_adapter(ia3, tmp_path)
    model = inj.inject(MLP(8, 8, 8), LoraConfig(r=2, target_modules=["lin0"]), "lora")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'lin0' already holds LORA adapters"):
        load_adapter(model, tmp_path, "ia3")
    assert set(model.adapter_configs) == {"lora"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_only_registered_configs_are_accepted():
    @dataclass
    class NotAMethod:
        target_modules: tuple = ("lin0",)

    with pytest.raises(TypeError, match="config must be one of LoraConfig, IA3Config"):
        inj.inject(MLP(4, 4), NotAMethod())


class GatedShiftLayer(ShiftLayer):
    """The toy method with an optional second tensor, listed first: only some adapters have a gate."""

    adapter_tensors = ("gate", "shift")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.gate = nn.ParameterDict()


def test_adapter_state_holds_every_tensor_an_adapter_has_and_skips_those_it_lacks():
    layer = GatedShiftLayer(nn.Linear(4, 3))
    layer.add_adapter("plain", None)
    layer.add_adapter("gated", None)
    layer.gate["gated"] = nn.Parameter(torch.ones(3))
    assert sorted(layer.adapters) == ["gated", "plain"]
    assert set(layer.adapter_state("plain")) == {"shift"}  # no gate: that container is skipped, not the rest
    assert layer.adapter_state("plain")["shift"] is layer.shift["plain"]
    assert set(layer.adapter_state("gated")) == {"gate", "shift"}
    assert layer.adapter_state("missing") == {}


@pytest.mark.parametrize("storage", ["linear", "conv1d"])
def test_a_new_base_weight_is_written_in_the_base_dtype_and_storage_order(storage):
    """set_base_weight_out_in takes an (out, in) tensor in any dtype (PiSSA and QLoRA's merge pass float32 or
    float64): the base keeps its own dtype and layout, the values rounded to it."""
    from transformers.pytorch_utils import Conv1D

    base = (Conv1D(3, 4) if storage == "conv1d" else nn.Linear(4, 3)).to(torch.bfloat16)
    layer = ShiftLayer(base)
    new = torch.randn(3, 4, dtype=torch.float64)  # (out, in)
    layer.set_base_weight_out_in(new)
    assert base.weight.dtype == torch.bfloat16
    assert base.weight.shape == ((4, 3) if storage == "conv1d" else (3, 4))
    stored_out_in = base.weight.T if storage == "conv1d" else base.weight
    assert torch.equal(stored_out_in, new.to(torch.bfloat16)) and torch.equal(layer.base_weight_out_in(), stored_out_in)
