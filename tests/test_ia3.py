"""IA³ on its own: config checks, the equation (output and feed-forward vectors, Conv1D storage), several adapters,
merge / unmerge with peft's epsilon, mixed batches, dtypes; then through inject / save / load.

Expected values are the equation written out in float64: y = l ⊙ (W x + b), or y = W (l ⊙ x) + b feed-forward."""

import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import minilora as ml
from minilora.methods.ia3 import IA3Config, IA3Layer
from minilora.methods.qlora import Linear4bit

from adapters import MLP, assert_close_fp32, rel_fro, tiny_decoder

F64 = 1e-13  # float64, relative: the same few products and sums in another order, far below any wrong formula


def config(**kw):
    return IA3Config(**{"target_modules": ["k", "ff"], "feedforward_modules": ["ff"], **kw})


def make_layer(feedforward=False, in_f=16, out_f=12, bias=True, names=("default",), dtype=torch.float64, conv1d=False):
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # Conv1D's bias starts at zero, which would hide a missing bias scaling
        if base.bias is not None:
            base.bias.normal_()
    layer = IA3Layer(base.to(dtype))
    for name in names:
        layer.add_adapter(name, config(), "mlp.ff" if feedforward else "attn.k")
        with torch.no_grad():  # ones would hide mistakes
            layer.ia3_l[name].uniform_(0.5, 1.5)
    layer.active_adapters = [names[0]]
    return layer.eval()


def weight_out_in(layer):
    w = layer.base_layer.weight.detach()
    return w.T if isinstance(layer.base_layer, Conv1D) else w


def equation(layer, x, names):
    """The paper's scaling in float64, with the product of the named vectors."""
    W, b = weight_out_in(layer).double(), layer.base_layer.bias
    l = torch.ones(layer.in_features if layer.is_feedforward else layer.out_features, dtype=torch.float64)
    for n in names:
        l = l * layer.ia3_l[n].detach().double().flatten()
    x = x.double()
    b = 0 if b is None else b.detach().double()
    return (x * l) @ W.T + b if layer.is_feedforward else (x @ W.T + b) * l


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, fix", [
    (dict(target_modules=None), "target_modules must be a non-empty list"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules=["k", ""]), "target_modules must be a non-empty list"),
    (dict(exclude_modules=[3]), "exclude_modules must be a non-empty list"),
    (dict(feedforward_modules=["ff", 3]), "feedforward_modules must be a non-empty list"),
    (dict(feedforward_modules=["ff", "w0", "up"]), r"feedforward_modules \['up', 'w0'\] are not in target_modules "
                                                  r".*add them to target_modules"),
])
def test_config_rejects_bad_values_naming_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        config(**kwargs)


def test_config_normalises_target_sets_and_empty_feedforward():
    c = IA3Config(target_modules={"v", "k"}, feedforward_modules=set(), exclude_modules=("b", "a"))
    assert (c.target_modules, c.feedforward_modules, c.exclude_modules) == (["k", "v"], None, ["b", "a"])
    assert IA3Config(target_modules=".*(k|ff)", feedforward_modules=".*ff").feedforward_modules == ".*ff"
    assert IA3Config.peft_type == "IA3"


def test_config_round_trips_through_the_peft_dict():
    c = config(exclude_modules=["x.k"], init_ia3_weights=False, fan_in_fan_out=True, modules_to_save=["norm"])
    d = c.to_peft_dict()
    assert d["peft_type"] == "IA3" and d["peft_version"] == "0.21.2" and d["feedforward_modules"] == ["ff"]
    assert IA3Config.from_peft_dict(d) == c
    assert IA3Config(target_modules=["k"]).to_peft_dict()["feedforward_modules"] == []


@pytest.mark.parametrize("change, fix", [
    (dict(peft_type="LORA"), "this is a 'LORA' adapter, not 'IA3'"),
    (dict(layers_to_transform=[0]), r"IA3 features minilora does not implement: \['layers_to_transform'\]"),
])
def test_from_peft_dict_rejects_other_methods_and_unimplemented_fields(change, fix):
    with pytest.raises(ValueError, match=fix):
        IA3Config.from_peft_dict({**config().to_peft_dict(), **change})


# ----------------------------------------------------------------------------- which modules, which shapes

@pytest.mark.parametrize("module, fix", [
    (nn.Embedding(10, 4), "is a Embedding; IA3 wraps nn.Linear and GPT-2 Conv1D only: narrow target_modules"),
    (Linear4bit(torch.randn(8, 64)), "Conv1D only: call dequantize_model\\(model\\) first, or use LoRA"),
])
def test_check_target_rejects_what_it_cannot_wrap(module, fix):
    with pytest.raises(ValueError, match=fix):
        IA3Layer.check_target("attn.k", module, config())


def test_check_target_rejects_a_feedforward_module_that_is_not_a_target():
    c = IA3Config(target_modules=".*k", feedforward_modules=".*f+")
    IA3Layer.check_target("attn.k", nn.Linear(4, 4), c)
    with pytest.raises(ValueError, match="'mlp.ff' matches feedforward_modules but not target_modules.*widen"):
        IA3Layer.check_target("mlp.ff", nn.Linear(4, 4), c)


def test_a_second_adapter_must_scale_the_same_side():
    layer = make_layer(feedforward=False)
    other = config(target_modules=["k"], feedforward_modules=["k"])
    with pytest.raises(ValueError, match="layer 'attn.k' already scales its output .*list it in all"):
        IA3Layer.check_target("attn.k", layer, other)
    with pytest.raises(ValueError, match="layer 'attn.k' already scales its output for adapters \\['default'\\]"):
        layer.add_adapter("second", other, "attn.k")
    assert layer.adapters == ["default"]
    layer.add_adapter("second", config(), "attn.k")  # agrees: fine


def test_a_feedforward_layer_refuses_an_output_vector_naming_its_input_side():
    layer = make_layer(feedforward=True)  # added as "mlp.ff", a feed-forward module of config()
    output_only = config(feedforward_modules=None)
    with pytest.raises(ValueError, match=r"layer 'mlp.ff' already scales its input \(feed-forward\) for adapters"):
        IA3Layer.check_target("mlp.ff", layer, output_only)
    with pytest.raises(ValueError, match=r"layer 'mlp.ff' already scales its input \(feed-forward\) for adapters"):
        layer.add_adapter("second", output_only, "mlp.ff")
    assert layer.adapters == ["default"] and layer.is_feedforward


@pytest.mark.parametrize("conv1d", [False, True])
def test_vectors_scale_the_output_or_the_input_of_a_feedforward_layer(conv1d):
    base = Conv1D(12, 16) if conv1d else nn.Linear(16, 12)
    assert IA3Layer.expected_shapes("attn.k", base, config()) == {"ia3_l": (12, 1)}
    assert IA3Layer.expected_shapes("mlp.ff", base, config()) == {"ia3_l": (1, 16)}
    for name, shape in [("attn.k", (12, 1)), ("mlp.ff", (1, 16))]:
        layer = IA3Layer(copy.deepcopy(base))
        layer.add_adapter("default", config(), name)
        assert layer.ia3_l["default"].shape == shape and layer.fan_in_fan_out == conv1d
        assert torch.equal(layer.ia3_l["default"], torch.ones(shape))  # ones: the identity at init
        assert IA3Layer.expected_shapes(name, layer, config()) == {"ia3_l": shape}


@pytest.mark.parametrize("feedforward", [False, True])
def test_outputs_unchanged_at_init(feedforward):
    base = nn.Linear(16, 12)
    layer = IA3Layer(copy.deepcopy(base))
    layer.add_adapter("default", config(), "mlp.ff" if feedforward else "attn.k")
    layer.active_adapters = ["default"]
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("init", [True, False])
def test_vectors_are_created_on_the_base_layer_device(init):
    layer = IA3Layer(nn.Linear(16, 12, device="meta"))  # a device other than the default, without a GPU
    layer.add_adapter("default", config(init_ia3_weights=init), "attn.k")
    assert layer.ia3_l["default"].device.type == "meta"


def test_init_ia3_weights_false_draws_a_standard_normal_like_peft():
    layer = IA3Layer(nn.Linear(16, 12))
    torch.manual_seed(3)
    layer.add_adapter("default", config(init_ia3_weights=False), "attn.k")
    torch.manual_seed(3)
    assert torch.equal(layer.ia3_l["default"].detach(), torch.randn(12, 1))


# ----------------------------------------------------------------------------- the equation

@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_equation(feedforward, conv1d, bias):
    layer = make_layer(feedforward, conv1d=conv1d, bias=bias or conv1d)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert rel_fro(layer(x), equation(layer, x, ["default"])) <= F64


@pytest.mark.parametrize("feedforward", [False, True])
def test_gradient_of_the_vector_is_the_equations(feedforward):
    layer = make_layer(feedforward)
    x, g = torch.randn(4, 3, 16, dtype=torch.float64), torch.randn(4, 3, 12, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    W, b = weight_out_in(layer), layer.base_layer.bias.detach()
    if feedforward:  # y = W (l ⊙ x) + b: dL/dl_j = sum over tokens of x_j (g W)_j
        want = (x * (g @ W)).sum((0, 1)).reshape(1, -1)
    else:  # y = l ⊙ (W x + b): dL/dl_i = sum over tokens of g_i (W x + b)_i
        want = (g * (x @ W.T + b)).sum((0, 1)).reshape(-1, 1)
    assert rel_fro(layer.ia3_l["default"].grad, want) <= F64
    assert layer.base_layer.weight.grad is not None  # the layer itself does not freeze; inject does


@pytest.mark.parametrize("feedforward", [False, True])
def test_several_active_adapters_multiply(feedforward):
    layer = make_layer(feedforward, names=("a", "b", "c"))
    layer.active_adapters = ["c", "a", "b"]
    x = torch.randn(3, 16, dtype=torch.float64)
    assert rel_fro(layer(x), equation(layer, x, ["a", "b", "c"])) <= F64
    layer.active_adapters = ["b", "missing"]  # an adapter this layer does not hold is no factor
    assert rel_fro(layer(x), equation(layer, x, ["b"])) <= F64


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward takes more arguments: the IA3 layer must pass them on."""

    def forward(self, x, scale=1.0, *, shift=0.0):
        return super().forward(x) * scale + shift


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("path", ["equation", "mixed_batch", "mixed_batch_of_base_examples"])
def test_extra_forward_arguments_reach_the_base_layer(feedforward, path):
    """base(x) = 3 (W x + b) + 0.5, called as layer(x, 3.0, shift=0.5): y = l ⊙ base(x), or base(l ⊙ x)."""
    layer = IA3Layer(ScaledLinear(16, 12, dtype=torch.float64))
    layer.add_adapter("default", config(), "mlp.ff" if feedforward else "attn.k")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    l = layer.ia3_l["default"].detach().flatten()
    base = 3.0 * (x @ W.T + b) + 0.5
    scaled = 3.0 * ((x * l) @ W.T + b) + 0.5 if feedforward else base * l
    expected = scaled
    if path == "mixed_batch":  # one adapter and base examples
        layer.batch_adapter_names = ["default", "__base__", "default"]
        expected = torch.stack([scaled[0], base[1], scaled[2]])
    elif path == "mixed_batch_of_base_examples":
        layer.batch_adapter_names, expected = ["__base__"] * 3, base
    assert rel_fro(layer(x, 3.0, shift=0.5), expected) <= F64


def test_mixed_batch_of_one_adapter_and_base_examples():
    layer = make_layer(names=("a", "b"))  # the layer holds two adapters; the batch uses one
    x = torch.randn(3, 16, dtype=torch.float64)
    mixed = layer.mixed_batch_forward(x, ["__base__", "b", "__base__"])
    want = torch.stack([equation(layer, x[0], []), equation(layer, x[1], ["b"]), equation(layer, x[2], [])])
    assert rel_fro(mixed, want) <= F64


@pytest.mark.parametrize("mixed", [False, True])
def test_a_feedforward_input_is_multiplied_in_the_vectors_dtype(mixed):
    """peft's cast: x goes to the vectors' dtype before l ⊙ x, the product back to x's dtype. With bf16 vectors
    on a float32 base, x and l ⊙ x are rounded to bf16 (the product of two bf16 numbers is exact in float64,
    so rounding it once reproduces bf16's multiply); the float32 base product after that differs by float32
    rounding only, while a product left in float32 would differ by bf16's 2^-9 (~2e-3)."""
    layer = make_layer(feedforward=True, names=("a", "b"), dtype=torch.float32)
    layer.ia3_l.to(torch.bfloat16)  # vectors in lower precision than the base and the input
    x = torch.randn(2, 5, 16)
    names = ["a", "b"]
    if mixed:
        layer.batch_adapter_names = names
        got = layer(x)
    else:  # each example through its adapter alone
        outs = []
        for i, n in enumerate(names):
            layer.active_adapters = [n]
            outs.append(layer(x[i]))
        got = torch.stack(outs)
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    want = []
    for i, n in enumerate(names):
        l = layer.ia3_l[n].detach().double().flatten()
        product = (x[i].to(torch.bfloat16).double() * l).to(torch.bfloat16).double()
        want.append(product @ W.T + b)
    assert_close_fp32(got, torch.stack(want))


def test_disabled_or_nothing_active_is_the_base_layer():
    layer = make_layer()
    x = torch.randn(3, 16, dtype=torch.float64)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disabled, layer.active_adapters = False, []
    assert torch.equal(layer(x), layer.base_layer(x))


# ----------------------------------------------------------------------------- merge / unmerge

@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_folds_the_vector_into_W_and_b(feedforward, conv1d):
    layer = make_layer(feedforward, conv1d=conv1d)
    x = torch.randn(3, 16, dtype=torch.float64)
    W, b = weight_out_in(layer).clone(), layer.base_layer.bias.detach().clone()
    l = layer.ia3_l["default"].detach()
    want = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert rel_fro(weight_out_in(layer), W * l) <= F64  # (out, in) times (out, 1) rows or (1, in) columns
    assert rel_fro(layer.base_layer.bias, b if feedforward else b * l.flatten()) <= F64
    assert rel_fro(layer(x), want) <= F64


@pytest.mark.parametrize("feedforward", [False, True])
def test_unmerge_divides_by_l_plus_peft_epsilon(feedforward):
    layer = make_layer(feedforward)
    W, b = weight_out_in(layer).clone(), layer.base_layer.bias.detach().clone()
    l = layer.ia3_l["default"].detach()
    layer.merge()
    layer.unmerge()
    assert not layer.merged_adapters
    assert rel_fro(weight_out_in(layer), W * l / (l + 1e-8)) <= F64  # peft's epsilon, so not W to the bit
    assert rel_fro(weight_out_in(layer), W) <= 1e-8 / l.min().item() * 1.01  # but W within 1e-8 / l
    if not feedforward:
        assert rel_fro(layer.base_layer.bias, b * l.flatten() / (l.flatten() + 1e-8)) <= F64


def test_merging_several_adapters_multiplies_them_in_and_unmerge_takes_them_out_again():
    layer = make_layer(names=("a", "b"))
    layer.active_adapters = ["a", "b"]
    x = torch.randn(3, 16, dtype=torch.float64)
    W = weight_out_in(layer).clone()
    want = layer(x)
    layer.merge(["a"])  # b still runs in the forward
    assert rel_fro(layer(x), want) <= F64
    layer.merge()
    layer.merge()  # merging twice is a no-op
    assert layer.merged_adapters == ["a", "b"]
    assert rel_fro(weight_out_in(layer), W * layer.ia3_l["a"] * layer.ia3_l["b"]) <= F64
    assert rel_fro(layer(x), want) <= F64
    layer.unmerge()
    assert rel_fro(weight_out_in(layer), W) <= 1e-7


def test_merge_of_a_float32_layer_stays_float32_and_matches_the_float64_equation():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(3, 16)
    want = equation(layer, x, ["default"])
    layer.merge()
    assert layer.base_layer.weight.dtype == layer.ia3_l["default"].dtype == torch.float32
    assert_close_fp32(layer(x), want.float())


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    layer = make_layer()
    before = layer.base_layer.state_dict()
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="gives NaN/Inf weights; the base was left untouched"):
        layer.merge(safe_merge=True)
    assert not layer.merged_adapters
    assert all(torch.equal(v, layer.base_layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("overflowing", ["weight", "bias"])
def test_safe_merge_refuses_a_product_that_overflows_a_float16_base(overflowing):
    """l ⊙ W is finite in the vectors' fp32 but 1e5 > 65504, float16's largest number: the check must see the
    weights as the base would store them."""
    layer = make_layer(dtype=torch.float16)
    with torch.no_grad():
        layer.base_layer.weight[0] = 1.0 if overflowing == "weight" else 1e-3
        layer.base_layer.bias[0] = 1.0 if overflowing == "bias" else 0.0
        layer.ia3_l["default"][0, 0] = 1e5
    weight, bias = layer.merged_weights("default")
    assert weight.dtype == bias.dtype == torch.float16  # in the base's dtypes
    before = copy.deepcopy(layer.base_layer.state_dict())
    with pytest.raises(ValueError, match="gives NaN/Inf weights; the base was left untouched"):
        layer.merge(safe_merge=True)
    assert not layer.merged_adapters
    assert all(torch.equal(v, layer.base_layer.state_dict()[k]) for k, v in before.items())


def test_training_a_merged_layer_raises():
    layer = make_layer().train()
    layer.merge()
    with pytest.raises(RuntimeError, match="call unmerge\\(model\\) before training"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with torch.no_grad():
        layer(torch.randn(2, 16, dtype=torch.float64))


# ----------------------------------------------------------------------------- mixed batches

@pytest.mark.parametrize("feedforward", [False, True])
def test_mixed_batch_equals_each_example_alone(feedforward):
    layer = make_layer(feedforward, names=("a", "b"), dtype=torch.float32)
    x = torch.randn(4, 5, 16)
    names = ["a", "__base__", "b", "missing"]  # an adapter this layer does not hold leaves its example alone
    layer.batch_adapter_names = names
    mixed = layer(x)
    layer.batch_adapter_names = None
    for i, n in enumerate(names):
        layer.active_adapters = [n] if n in ("a", "b") else []
        assert_close_fp32(mixed[i], layer(x[i:i + 1])[0])
        assert rel_fro(mixed[i], equation(layer, x[i], layer.active_adapters)) <= 1e-6


def test_mixed_batch_of_only_base_examples_is_the_base_layer():
    layer = make_layer()
    x = torch.randn(2, 16, dtype=torch.float64)
    assert torch.equal(layer.mixed_batch_forward(x, ["__base__", "other"]), layer.base_layer(x))


def test_mixed_batch_rejects_a_length_mismatch_and_merged_adapters():
    layer = make_layer()
    x = torch.randn(3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 examples"):
        layer.mixed_batch_forward(x, ["default", "__base__"])
    layer.merge()
    with pytest.raises(ValueError, match="while adapters are merged; call unmerge\\(model\\) first"):
        layer.mixed_batch_forward(x, ["default"] * 3)


# ----------------------------------------------------------------------------- dtypes and devices

@pytest.mark.parametrize("base_dtype, adapter_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
])
@pytest.mark.parametrize("init", [True, False])
def test_vectors_take_the_base_dtype_and_fp32_on_a_half_base(base_dtype, adapter_dtype, init):
    layer = IA3Layer(nn.Linear(16, 12).to(base_dtype))
    torch.manual_seed(5)
    layer.add_adapter("default", config(init_ia3_weights=init), "attn.k")
    l = layer.ia3_l["default"]
    assert l.dtype == adapter_dtype and l.device == layer.base_layer.weight.device
    if not init:  # peft draws in fp32 and casts to the base's dtype first: the values are rounded to it
        torch.manual_seed(5)
        assert torch.equal(l.detach(), torch.randn(12, 1).to(base_dtype).to(adapter_dtype))


@pytest.mark.parametrize("feedforward", [False, True])
def test_a_bf16_base_returns_bf16_within_bf16_rounding_of_the_equation(feedforward):
    layer = make_layer(feedforward, dtype=torch.bfloat16)
    assert layer.ia3_l["default"].dtype == torch.float32
    x = torch.randn(4, 16).bfloat16()
    out, want = layer(x), equation(layer, x, ["default"])
    assert out.dtype == torch.bfloat16
    assert rel_fro(out, want) <= 2 ** -7  # a few bf16 roundings (eps 2^-8)
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert rel_fro(layer(x), want) <= 2 ** -7


# ----------------------------------------------------------------------------- through inject, save and load

def ia3_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


def randomize(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            if name in layer.ia3_l:
                layer.ia3_l[name].copy_(torch.rand(layer.ia3_l[name].shape, generator=g) + 0.5)


def test_inject_wraps_targets_freezes_the_base_and_trains_only_the_vectors():
    model = ml.inject(MLP(12, 24, 24, 6), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    layers = ia3_layers(model)
    assert sorted(layers) == ["lin0", "lin1"]
    assert [layers["lin0"].is_feedforward, layers["lin1"].is_feedforward] == [False, True]
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.ia3_l.default": (24, 1), "lin1.ia3_l.default": (1, 24)}


def test_inject_rejects_a_4bit_base_naming_the_fix():
    model = ml.quantize_model(MLP(64, 64, 8), skip=())
    with pytest.raises(ValueError, match="dequantize_model\\(model\\) first, or use LoRA"):
        ml.inject(model, IA3Config(target_modules=["lin0"]))


def test_model_mixed_batch_equals_each_example_alone():
    torch.manual_seed(0)
    base = tiny_decoder()
    model = copy.deepcopy(base)
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ml.inject(model, cfg, "a")
    ml.inject(model, cfg, "b").eval()
    randomize(model, "a", 1), randomize(model, "b", 2)
    ids = torch.randint(0, 64, (3, 8))
    names = ["b", "__base__", "a"]
    mixed = model(ids, adapter_names=names).logits
    for i, n in enumerate(names):
        if n == "__base__":
            alone = base(ids[i:i + 1]).logits
        else:
            ml.set_adapter(model, n)
            alone = model(ids[i:i + 1]).logits
        assert_close_fp32(mixed[i:i + 1], alone)


def test_save_then_load_round_trips_the_vectors(tmp_path):
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    torch.manual_seed(0)
    base = tiny_decoder()
    model = ml.inject(copy.deepcopy(base), cfg).eval()  # new layers start in train mode, as in peft
    randomize(model)
    ml.save_adapter(model, str(tmp_path))
    loaded = ml.load_adapter(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen unless is_trainable
    ml.merge(model)
    merged = model(ids).logits
    assert_close_fp32(merged, loaded(ids).logits)
