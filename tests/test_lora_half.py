"""LoRA on half-precision (bf16 / fp16) weights, every path: Delta W and merge, unmerge, mixed batches,
files, weighted combinations and gradient checkpointing.

Expected values come from float64 on the same (already rounded) tensors, never from the code under test. A
result rounded once to a half format lies within half a unit in the last place (ulp) of the exact value;
a result that went through an extra half-precision step lands a whole ulp or more away in a large share of
the entries, which is what these tests look for.
"""

import copy

import pytest
import torch
import torch.nn as nn

from minilora.inject import add_weighted_adapter, inject, adapter_layers, set_adapter, unmerge
from minilora.io import load_adapter, save_adapter
from minilora.methods.lora import LoraConfig, LoraLayer

from adapters import randomize_adapters, rel_fro

HALF = [torch.bfloat16, torch.float16]


def half_layer(dtype, in_f=64, out_f=64, r=8, alpha=20.0, adapters_too=False):
    """A LoRA layer on a `dtype` base with random A and B (scaling alpha / r = 2.5, not 1)."""
    layer = LoraLayer(nn.Linear(in_f, out_f).to(dtype))
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, target_modules=["x"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for p in [layer.lora_A["default"].weight, layer.lora_B["default"].weight]:
            p.normal_(0, 0.3)
    if adapters_too:  # the whole layer in half precision, as after model.to(dtype)
        layer.to(dtype)
    return layer.eval()


def exact_delta(layer, name="default"):
    """scaling * B A in float64, from the stored A and B."""
    A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return layer.scaling[name] * B @ A


def fp32_slack(layer, name="default"):
    """A bound on the float32 rounding in W + scaling * B A: a few float32 eps of the terms' magnitudes (what
    matters where W and the update nearly cancel, so that the half-precision ulp there is tiny)."""
    A, B = layer.lora_A[name].weight.double().abs(), layer.lora_B[name].weight.double().abs()
    return 8 * torch.finfo(torch.float32).eps * (layer.base_layer.weight.double().abs() + layer.scaling[name] * B @ A)


def ulp(t, dtype):
    """The spacing of `dtype` numbers at each entry of t (float64 in, float64 out)."""
    eps = torch.finfo(dtype).eps  # spacing at 1
    tiny = torch.finfo(dtype).smallest_normal
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(tiny)))) * eps


def assert_rounded_once(got, exact, dtype, slack=0.0):
    """got is `exact` (float64) rounded to `dtype` once: within half an ulp everywhere (plus `slack`, the
    float32 arithmetic on the way), and equal to exact.to(dtype) in all but a rare entry next to a tie."""
    assert got.dtype == dtype
    err = (got.double() - exact).abs()
    assert (err <= 0.5 * ulp(exact, dtype) + slack).all(), (err - 0.5 * ulp(exact, dtype)).max()
    mismatches = (got != exact.to(dtype)).float().mean().item()
    assert mismatches <= 0.01, mismatches


@pytest.mark.parametrize("dtype", HALF)
def test_delta_weight_of_half_adapters_is_computed_in_fp32(dtype):
    layer = half_layer(dtype, adapters_too=True)
    assert layer.lora_A["default"].weight.dtype == dtype
    delta = layer.delta_weight("default")
    assert delta.dtype == torch.float32
    # the product of half-precision inputs summed in fp32: float32 rounding, about 1e-7 relative
    assert rel_fro(delta, exact_delta(layer)) <= 1e-6


@pytest.mark.parametrize("adapters_too", [False, True], ids=["fp32_adapters", "half_adapters"])
@pytest.mark.parametrize("dtype", HALF)
def test_merge_into_a_half_base_rounds_W_plus_delta_W_once(dtype, adapters_too):
    layer = half_layer(dtype, adapters_too=adapters_too)
    exact = layer.base_layer.weight.double() + exact_delta(layer)
    layer.merge()
    assert_rounded_once(layer.base_layer.weight, exact, dtype, fp32_slack(layer))


@pytest.mark.parametrize("dtype", HALF)
def test_unmerge_on_a_half_base_subtracts_delta_W_in_fp32(dtype):
    layer = half_layer(dtype)
    W = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    layer.unmerge()
    slack = fp32_slack(layer)
    assert_rounded_once(layer.base_layer.weight, merged.double() - exact_delta(layer), dtype, slack)
    # two roundings, each within half an ulp: the round trip moves an entry by about one ulp, never more
    drift = (layer.base_layer.weight.double() - W.double()).abs()
    assert (drift <= ulp(W.double(), dtype) + ulp(merged.double(), dtype) / 2 + 2 * slack).all()


@pytest.mark.parametrize("dtype", HALF)
def test_half_base_with_lora_bias_merges_the_bias_in_fp32(dtype):
    layer = LoraLayer(nn.Linear(32, 32).to(dtype))
    layer.add_adapter("default", LoraConfig(r=4, alpha=10.0, lora_bias=True, target_modules=["x"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for p in layer.lora_B["default"].parameters():
            p.normal_(0, 0.3)
    b, b_B = layer.base_layer.bias.double(), layer.lora_B["default"].bias.double()
    exact = b + 2.5 * b_B
    layer.merge()
    assert_rounded_once(layer.base_layer.bias, exact, dtype, 4 * torch.finfo(torch.float32).eps * (b.abs() + 2.5 * b_B.abs()))


def equation64(layer, x, name):
    """x W^T + b (+ scaling * B A x) in float64 on the layer's stored tensors; name None: the base alone."""
    x64 = x.double()
    out = x64 @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    if name is None:
        return out
    A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return out + layer.scaling[name] * (x64 @ A.T) @ B.T


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_batch_on_a_half_base_gives_each_example_its_adapter(dtype):
    layer = half_layer(dtype)
    layer.add_adapter("b", LoraConfig(r=4, alpha=2.0, target_modules=["x"]))
    with torch.no_grad():
        for p in [layer.lora_A["b"].weight, layer.lora_B["b"].weight]:
            p.normal_(0, 0.3)
    x = torch.randn(4, 5, 64).to(dtype)
    names = ["b", "__base__", "default", "b"]
    layer.batch_adapter_names = names
    mixed = layer(x)
    layer.batch_adapter_names = None
    assert mixed.dtype == dtype
    for i, n in enumerate(names):
        exact = equation64(layer, x[i], None if n == "__base__" else n)
        # the base output and the update are each rounded to `dtype` before their sum is (as in peft):
        # at most about 1.5 ulps per entry, below eps relative on the whole row
        assert rel_fro(mixed[i], exact) <= torch.finfo(dtype).eps, (i, n)


def half_mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)).to(dtype)
    inject(model, LoraConfig(r=4, alpha=10.0, target_modules=["0", "2"]))
    randomize_adapters(model, std=0.3)
    return model.eval()


@pytest.mark.parametrize("dtype", HALF)
def test_save_and_load_on_a_half_base_keep_the_adapters_in_fp32(dtype, tmp_path):
    model = half_mlp(dtype)
    x = torch.randn(3, 12).to(dtype)
    save_adapter(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)).to(dtype)
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    loaded = load_adapter(fresh, tmp_path).eval()
    for name, layer in adapter_layers(loaded).items():
        for kind in ("lora_A", "lora_B"):
            got, saved = getattr(layer, kind)["default"].weight, getattr(adapter_layers(model)[name], kind)["default"].weight
            assert got.dtype == torch.float32 and torch.equal(got, saved)  # a copy: no arithmetic
    assert torch.equal(loaded(x), model(x))  # the same weights through the same operations


@pytest.mark.parametrize("dtype", HALF)
def test_half_adapters_from_a_file_load_as_fp32_on_a_half_base(dtype, tmp_path):
    model = half_mlp(dtype)
    model.to(dtype)  # adapters in `dtype` too, as after model.to(dtype): the file holds half tensors
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(model)
    for name in list(fresh.adapter_configs):
        from minilora.inject import delete_adapter
        delete_adapter(fresh, name)
    loaded = load_adapter(fresh, tmp_path, "again")
    for name, layer in adapter_layers(loaded).items():
        w = layer.lora_A["again"].weight
        assert w.dtype == torch.float32  # trained in fp32 on a half base, as peft does
        assert torch.equal(w, adapter_layers(model)[name].lora_A["default"].weight.float())  # exact upcast


@pytest.mark.parametrize("dtype", HALF)
def test_weighted_combination_on_a_half_base_is_the_weighted_sum_of_updates(dtype):
    model = half_mlp(dtype)
    inject(model, LoraConfig(r=2, alpha=3.0, use_rslora=True, target_modules=["0", "2"]), "b")
    randomize_adapters(model, "b", seed=1, std=0.3)
    layers = adapter_layers(model)
    target = {n: 0.7 * exact_delta(l, "default") - 0.4 * exact_delta(l, "b") for n, l in layers.items()}
    errors = add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "mix")
    assert errors == {n: 0.0 for n in layers}
    for n, layer in layers.items():
        assert layer.lora_A["mix"].weight.dtype == torch.float32
        assert rel_fro(exact_delta(layer, "mix"), target[n]) <= 1e-6  # fp32 products of the same numbers
    add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "mix_svd", combination_type="svd", svd_rank=6)
    for n, layer in layers.items():
        assert rel_fro(exact_delta(layer, "mix_svd"), target[n]) <= 1e-5  # rank 6 holds the rank-6 sum exactly
    set_adapter(model, "mix")
    x = torch.randn(5, 12).to(dtype)
    assert model(x).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_gradient_checkpointing_on_a_half_base_gives_the_same_loss_and_adapter_gradients(dtype):
    from minilora.models import DecoderLM, get_config

    torch.manual_seed(0)
    cfg = get_config("decoder-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                     max_seq_len=32)
    model = DecoderLM(cfg).to(dtype)
    inject(model, LoraConfig(r=4, alpha=10.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 64, (2, 12))
    model.train()

    def loss_and_grads(checkpointing):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 3 * 2
    assert all(g.dtype == torch.float32 for g in grads_ckpt.values())
    # the recomputed forward runs the same kernels on the same inputs; allow a half-precision ulp anyway
    assert abs(loss_ckpt.item() - loss.item()) <= torch.finfo(dtype).eps * abs(loss.item())
    for n, g in grads.items():
        assert g.abs().max() > 0, n
        assert rel_fro(grads_ckpt[n], g) <= 1e-3, n
    with torch.no_grad():
        model.gradient_checkpointing = False
        for p in model.parameters():
            p.grad = None
    unmerge(model)  # nothing merged: a no-op that must not touch the half weights


def test_safe_merge_refuses_a_merge_that_overflows_fp16_and_leaves_the_weights():
    layer = half_layer(torch.float16)
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 60000.0  # fp16 tops out at 65504: W + Delta W overflows there
        layer.lora_B["default"].weight[0].fill_(100.0)
        layer.lora_A["default"].weight[:, 0].fill_(100.0)
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W) and not layer.merged


def test_safe_merge_refuses_a_lora_bias_that_overflows_fp16():
    layer = LoraLayer(nn.Linear(8, 8).to(torch.float16))
    layer.add_adapter("default", LoraConfig(r=2, alpha=2.0, lora_bias=True, target_modules=["x"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_B["default"].bias[3] = 1e6  # finite in fp32, inf once rounded to the fp16 base's bias
    b = layer.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.bias, b) and not layer.merged
