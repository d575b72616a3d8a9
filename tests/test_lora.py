"""The LoRA layer on its own: config checks, the equation, init variants, merge / unmerge, mixed batches."""

import math

import pytest
import torch
import torch.nn as nn

from minilora.methods.lora import LoraConfig, LoraLayer, is_conv1d

from adapters import assert_close_fp32, rel_fro


def make_layer(in_f=16, out_f=12, r=4, alpha=8.0, bias=True, **kw):
    layer = LoraLayer(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, target_modules=["x"], **kw))
    layer.active_adapters = ["default"]
    return layer


def randomize(layer, name="default"):
    with torch.no_grad():
        for p in [*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()]:
            p.normal_(0, 0.2)


@pytest.mark.parametrize("kwargs, fix", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(r=2.5), "r must be an integer >= 1"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dropout=-0.1), "dropout must be in [0, 1)"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules=None), "target_modules must be a non-empty list"),
    (dict(init="zeros"), "init must be one of"),
    (dict(bias="some"), "bias must be one of"),
])
def test_config_rejects_bad_values_naming_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix.replace("[", r"\[").replace(")", r"\)")):
        LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


@pytest.mark.parametrize("targets", [["q_proj", ""], ["q_proj", 3]])
def test_config_rejects_empty_or_non_string_target_names(targets):
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        LoraConfig(target_modules=targets)


def test_config_accepts_the_smallest_rank_and_alpha_below_one():
    config = LoraConfig(r=1, alpha=0.5, target_modules=["q_proj"])
    assert config.scaling == 0.5


def test_config_stores_target_sets_sorted_and_tuples_as_lists():
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
    # a set's iteration order follows string hashes; with 26 names it is sorted by chance with odds ~1/26!
    names = {f"{c}_proj" for c in "zyxwvutsrqponmlkjihgfedcba"}
    assert LoraConfig(target_modules=names).target_modules == sorted(names)
    assert LoraConfig(target_modules=("v_proj", "q_proj")).target_modules == ["v_proj", "q_proj"]
    assert LoraConfig(target_modules=["q_proj"], exclude_modules={"b", "a"}).exclude_modules == ["a", "b"]


def test_only_gpt2_style_conv1d_counts_as_fan_in_fan_out():
    class Conv1D(nn.Module):  # the name alone, e.g. another library's real convolution
        pass

    class Projection(nn.Linear):  # nf / nx attributes alone
        nf, nx = 12, 16

    assert not is_conv1d(Conv1D()) and not is_conv1d(Projection(16, 12))
    assert is_conv1d(GPT2Conv1D(nf=12, nx=16))


def test_config_scaling_plain_and_rslora():
    assert LoraConfig(r=16, alpha=32, target_modules=["q"]).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True, target_modules=["q"]).scaling == 8.0


def test_outputs_unchanged_at_init():
    layer = make_layer()
    x = torch.randn(5, 16)
    # B = 0, so the update adds exact zeros to the base product: equal bits whatever the summation order
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_is_W_x_plus_scaled_B_A_x():
    layer = make_layer(r=4, alpha=6.0)
    randomize(layer)
    x = torch.randn(3, 7, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x.double() @ W.double().T + b.double() + (6.0 / 4) * x.double() @ A.double().T @ B.double().T
    assert_close_fp32(layer(x), expected)


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_adapters_take_the_base_dtype_and_fp32_on_a_half_base(base_dtype, adapter_dtype):
    layer = LoraLayer(nn.Linear(16, 12, dtype=base_dtype))
    layer.add_adapter("default", LoraConfig(r=4, lora_bias=True, target_modules=["x"]))
    assert {p.dtype for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]} == {adapter_dtype}


def test_adapters_are_created_on_the_base_layer_device():
    layer = LoraLayer(nn.Linear(16, 12, device="meta"))  # a device other than the default, without a GPU
    layer.add_adapter("default", LoraConfig(r=4, lora_bias=True, target_modules=["x"]))
    assert {p.device.type for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]} == {"meta"}


def test_a_layer_with_no_active_adapter_is_its_base_layer():
    layer = LoraLayer(nn.Linear(16, 12))
    layer.add_adapter("default", LoraConfig(r=4, target_modules=["x"]))  # added, never made active
    randomize(layer)
    x = torch.randn(3, 16)
    assert layer.active_adapters == [] and torch.equal(layer(x), layer.base_layer(x))  # the base layer's own call


def test_default_init_is_kaiming_uniform_and_B_zero():
    layer = make_layer(in_f=64, r=8)
    A = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_gaussian_init_has_std_one_over_r():
    layer = make_layer(in_f=512, out_f=512, r=16, init="gaussian")
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 16) < 0.003
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_pissa_puts_principal_part_in_B_A_and_residual_in_W():
    torch.manual_seed(0)
    base = nn.Linear(20, 10)
    W = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("default", LoraConfig(r=3, alpha=6, init="pissa", target_modules=["x"]))
    s = layer.scaling["default"]
    BA = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert_close_fp32(BA, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])  # fp32 SVD and products: float32 rounding
    assert_close_fp32(layer.base_layer.weight + BA, W)  # W_res + s B A = W up to the rounding of W_res


class Conv1D(nn.Module):
    """The shape of GPT-2's Conv1D (weight stored (in, out)), without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


GPT2Conv1D = Conv1D


def test_conv1d_is_wrapped_with_fan_in_fan_out():
    conv = Conv1D(nf=12, nx=16)
    linear = nn.Linear(16, 12)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = LoraLayer(conv), LoraLayer(linear)
    assert a.fan_in_fan_out and not b.fan_in_fan_out
    assert (a.in_features, a.out_features) == (16, 12)
    for layer in (a, b):
        layer.add_adapter("default", LoraConfig(r=4, target_modules=["x"]))
        layer.active_adapters = ["default"]
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = torch.randn_like(getattr(a, name)["default"].weight)
            getattr(a, name)["default"].weight.copy_(w)
            getattr(b, name)["default"].weight.copy_(w)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(a(x), b(x))
    a.eval(), b.eval()
    a.merge()
    b.merge()
    torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight.T)


def exact_merged_weight(layer, name="default"):
    """W + (alpha / r) B A written out in float64 from the stored tensors, as (out, in)."""
    A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return layer.base_weight_out_in().double() + layer.scaling[name] * B @ A


def test_merge_then_unmerge_restores_weights():
    layer = make_layer()
    randomize(layer)
    W = layer.base_layer.weight.detach().clone()
    exact = exact_merged_weight(layer)
    x = torch.randn(4, 16)
    layer.eval()
    before = layer(x)
    layer.merge()
    assert_close_fp32(layer.base_layer.weight, exact)
    assert_close_fp32(layer(x), before)  # W' x against W x + s B (A x): the same sum in another order
    layer.unmerge()
    # (W + dW) - dW in fp32 is W within one ulp of |W + dW| < 1, i.e. 1.2e-7; no reduction is involved
    torch.testing.assert_close(layer.base_layer.weight, W, atol=2.5e-7, rtol=0)
    assert not layer.merged


def test_merge_and_unmerge_of_a_float64_layer_stay_in_float64():
    layer = make_layer().double()
    randomize(layer)
    W = layer.base_layer.weight.detach().clone()
    exact = exact_merged_weight(layer)
    layer.merge()
    # float64 throughout: only the rounding of one product and one sum, far below fp32's 1.2e-7
    assert rel_fro(layer.base_layer.weight, exact) < 1e-14
    layer.unmerge()
    assert rel_fro(layer.base_layer.weight, W) < 1e-14


def test_merge_twice_is_noop():
    layer = make_layer()
    randomize(layer)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)  # nothing may be computed at all the second time
    assert layer.merged_adapters == ["default"]


def test_merge_unmerge_drift_stays_bounded_over_1000_cycles():
    layer = make_layer(in_f=64, out_f=64, r=8, lora_bias=True)
    randomize(layer)
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4000 tiny ops: extra threads only wait on each other on a busy machine
    try:
        for _ in range(1000):
            layer.merge()
            layer.unmerge()
    finally:
        torch.set_num_threads(threads)
    # fp32 rounding adds ~1 ulp per cycle at worst and mostly cancels: a random walk, not growth
    assert (layer.base_layer.weight - W).abs().max() < 1e-5
    assert (layer.base_layer.bias - b).abs().max() < 1e-5


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W) and not layer.merged  # untouched: no arithmetic on W


def test_training_a_merged_layer_raises():
    layer = make_layer()
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 16))
    layer.eval()
    layer(torch.randn(2, 16))  # inference on merged weights is fine
    with torch.no_grad():
        layer.train()(torch.randn(2, 16))


def equation(layer, x, lora_input=None, name="default"):
    """W x + b + (alpha / r) B A x' in float64, x' the input of A (x itself, or x after dropout)."""
    x64 = x.double()
    xa = x64 if lora_input is None else lora_input.double()
    W, A, B = (t.double() for t in (layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight))
    out = x64 @ W.T + layer.scaling[name] * xa @ A.T @ B.T
    return out + layer.base_layer.bias.double() if layer.base_layer.bias is not None else out


def test_dropout_in_train_mode_masks_the_input_of_A_with_the_inverted_dropout_scale():
    layer = make_layer(dropout=0.5)
    randomize(layer)
    layer.train()
    x = torch.randn(8, 16)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)  # the same generator state, so the same mask as the layer's own dropout
    dropped = nn.functional.dropout(x, 0.5, training=True)  # zeros, and survivors times 1 / (1 - p) = 2
    assert 0 < (dropped == 0).sum() < x.numel()
    assert_close_fp32(got, equation(layer, x, lora_input=dropped))


def test_dropout_leaves_the_base_path_clean():
    layer = make_layer(dropout=0.5)  # B = 0: in train mode the output must be the base's, untouched by dropout
    layer.train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # the update adds exact zeros


def test_dropout_is_off_in_eval_mode():
    layer = make_layer(dropout=0.5)
    randomize(layer)
    x = torch.randn(8, 16)
    layer.eval()
    assert_close_fp32(layer(x), equation(layer, x))


def test_mixed_batch_equals_each_example_alone():
    layer = make_layer(r=4)
    layer.add_adapter("b", LoraConfig(r=2, alpha=3, use_rslora=True, lora_bias=True, target_modules=["x"]))
    randomize(layer, "default")
    randomize(layer, "b")
    x = torch.randn(5, 3, 16)
    names = ["b", "default", "__base__", "b", "missing_here"]
    layer.batch_adapter_names = names
    mixed = layer(x)
    layer.batch_adapter_names = None
    base = x.double() @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    for i, n in enumerate(names):
        if n in layer.lora_A:
            expected = equation(layer, x[i], name=n)
            if n == "b":
                expected = expected + layer.scaling["b"] * layer.lora_B["b"].bias.double()
        else:  # "__base__", and an adapter this layer does not have: the base alone
            expected = base[i]
        assert_close_fp32(mixed[i], expected)


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward takes more arguments: the LoRA layer must pass them on."""

    def forward(self, x, scale=1.0, *, shift=0.0):
        return super().forward(x) * scale + shift


@pytest.mark.parametrize("path", ["equation", "disabled", "merged", "nothing_active", "mixed_batch"])
def test_extra_forward_arguments_reach_the_base_layer(path):
    layer = LoraLayer(ScaledLinear(16, 12))
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, target_modules=["x"]))
    layer.active_adapters = ["default"]
    randomize(layer)
    layer.eval()
    x = torch.randn(3, 16)
    update = 2.0 * x.double() @ layer.lora_A["default"].weight.double().T @ layer.lora_B["default"].weight.double().T
    base = layer.base_layer(x, 3.0, shift=0.5).double()
    expected = base + update
    if path == "disabled":
        layer.disabled, expected = True, base
    elif path == "merged":
        layer.merge()
        expected = base + 3.0 * update  # the merged update goes through the base's own scale
    elif path == "nothing_active":
        layer.active_adapters, expected = [], base
    elif path == "mixed_batch":
        layer.batch_adapter_names = ["default", "__base__", "default"]
        expected = torch.stack([expected[0], base[1], expected[2]])
    assert_close_fp32(layer(x, 3.0, shift=0.5), expected)


def test_mixed_batch_where_no_example_uses_this_layer_is_the_base_alone():
    layer = make_layer()
    randomize(layer)
    x = torch.randn(3, 16)
    layer.batch_adapter_names = ["__base__", "elsewhere", "__base__"]  # "elsewhere": an adapter of other layers
    assert torch.equal(layer(x), layer.base_layer(x))  # adds an exact zero to the same base product


def test_mixed_batch_length_mismatch_raises():
    layer = make_layer()
    layer.batch_adapter_names = ["default"]
    with pytest.raises(ValueError, match="adapter_names has 1 entries but the batch has 2"):
        layer(torch.randn(2, 16))


def equation_path(layer, x, name="default"):
    """The layer's output by the equation, with autograd's own backward (the reference for the fused node)."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    return layer.base_layer(x) + B(A(x)) * layer.scaling[name]


def frozen_layer(**kw):
    layer = make_layer(**kw)
    layer.base_layer.requires_grad_(False)  # as inject leaves it
    randomize(layer)
    return layer


def grads_of(layer, x, out, upstream):
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    wanted = [x, *params] if x.requires_grad else params
    return torch.autograd.grad(out, wanted, upstream)


def assert_equal_up_to_summation_order(got, want):
    assert got.shape == want.shape and got.stride() == want.stride()
    assert_close_fp32(got, want)  # the node's backward sums the same products in another order


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 3, 4, 16)])
def test_fused_node_equals_the_equation_outputs_and_gradients(bias, shape):
    layer = frozen_layer(r=4, alpha=6.0, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "FrozenLinearWithLoraBackward"
    reference = equation_path(layer, x)
    assert torch.equal(fused, reference)  # the forward runs the equation's own operations, in its order
    upstream = torch.randn_like(fused)
    for got, want in zip(grads_of(layer, x, fused, upstream), grads_of(layer, x, reference, upstream)):
        assert_equal_up_to_summation_order(got, want)


def test_fused_node_with_non_contiguous_input_and_no_input_grad():
    layer = frozen_layer()
    x = torch.randn(16, 6).T  # (6, 16), transposed view
    fused, reference = layer(x), equation_path(layer, x)
    assert torch.equal(fused, reference)  # the same operations in the same order, by construction
    upstream = torch.randn_like(fused)
    for got, want in zip(grads_of(layer, x, fused, upstream), grads_of(layer, x, reference, upstream)):
        assert_equal_up_to_summation_order(got, want)


def test_fused_node_skips_gradients_of_a_frozen_adapter():
    layer = frozen_layer()
    layer.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_A["default"].weight.grad is None
    assert layer.lora_B["default"].weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("setup", ["trainable_bias", "trainable_weight", "lora_bias", "dropout_train",
                                   "two_adapters", "half_adapter", "fp32_adapter_on_fp64", "switched_off",
                                   "plain_frozen", "half_base"])
def test_other_cases_take_the_equation_path(setup):
    layer = make_layer(lora_bias=setup == "lora_bias", dropout=0.3 if setup == "dropout_train" else 0.0)
    layer.base_layer.weight.requires_grad_(setup == "trainable_weight")
    layer.base_layer.bias.requires_grad_(setup == "trainable_bias")
    if setup == "two_adapters":
        layer.add_adapter("b", LoraConfig(r=2, target_modules=["x"]))
        layer.active_adapters = ["default", "b"]
    if setup == "half_base":
        layer.base_layer.to(torch.bfloat16)
    if setup == "half_adapter":  # adapters in lower precision than the base: the equation path casts
        layer.lora_A.to(torch.bfloat16), layer.lora_B.to(torch.bfloat16)
    if setup == "fp32_adapter_on_fp64":  # only a half-precision base runs fp32 adapters in the node
        layer.base_layer.double()
    layer.fused = setup != "switched_off"
    x = torch.randn(3, 16, dtype=layer.base_layer.weight.dtype, requires_grad=True)
    fused = type(layer(x).grad_fn).__name__ == "FrozenLinearWithLoraBackward"
    assert fused == (setup in ("plain_frozen", "half_base"))  # only these are fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_node_on_a_half_base_is_as_accurate_as_the_equation(dtype):
    """fp32 adapters on a half-precision base: the node runs the update in half precision (as autocast would),
    the equation path in fp32. Both are measured against float64 on the same rounded inputs."""
    layer = frozen_layer(in_f=64, out_f=48, r=8, alpha=20.0)  # scaling 2.5: a dropped or doubled s shows
    layer.base_layer.to(dtype)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(6, 10, 64).to(dtype).requires_grad_()
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "FrozenLinearWithLoraBackward" and fused.dtype == dtype
    layer.fused = False
    equation = layer(x)
    # the plain path's own operations (fp32 update added to the half output, rounded once): equal bits
    assert equation.dtype == dtype and torch.equal(equation, (layer.base_layer(x).float() + (x.float() @ A.T) @ B.T * s).to(dtype))

    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    exact = x64 @ W.T + b + s * (x64 @ A64.T) @ B64.T
    assert rel_fro(fused, exact) <= 2 * rel_fro(equation, exact)

    upstream = torch.randn_like(exact).to(dtype)
    got = torch.autograd.grad(fused, [x, A, B], upstream)
    want = torch.autograd.grad(exact, [x64, A64, B64], upstream.double())
    assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert rel_fro(g, w) <= 1e-2  # half-precision products: about 3e-3 in bf16, 4e-4 in fp16
