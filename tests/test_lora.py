"""The LoRA layer on its own: config checks, the equation, init variants, merge / unmerge, mixed batches."""

import math

import pytest
import torch
import torch.nn as nn

from minilora.lora import LoraConfig, LoraLayer

from adapters import rel_fro


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


def test_config_scaling_plain_and_rslora():
    assert LoraConfig(r=16, alpha=32, target_modules=["q"]).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True, target_modules=["q"]).scaling == 8.0


def test_outputs_unchanged_at_init():
    layer = make_layer()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0, so B A x = 0 exactly


def test_forward_is_W_x_plus_scaled_B_A_x():
    layer = make_layer(r=4, alpha=6.0)
    randomize(layer)
    x = torch.randn(3, 7, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (6.0 / 4) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


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
    torch.testing.assert_close(BA, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight + BA, W, atol=1e-6, rtol=1e-6)


class Conv1D(nn.Module):
    """The shape of GPT-2's Conv1D (weight stored (in, out)), without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


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


def test_merge_then_unmerge_restores_weights():
    layer = make_layer()
    randomize(layer)
    W = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 16)
    layer.eval()
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, W + layer.delta_weight("default"))
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W, atol=1e-7, rtol=0)
    assert not layer.merged


def test_merge_twice_is_noop():
    layer = make_layer()
    randomize(layer)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_adds_in_fp32(dtype):
    layer = make_layer(in_f=32, out_f=32)
    layer.base_layer.to(dtype)
    randomize(layer)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters train in fp32
    W = layer.base_layer.weight.detach().clone()
    layer.merge()
    expected = (W.float() + layer.delta_weight("default")).to(dtype)
    assert torch.equal(layer.base_layer.weight, expected)
    assert layer.base_layer.weight.dtype == dtype


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W) and not layer.merged


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


def test_dropout_applies_to_lora_input_only_in_train_mode():
    layer = make_layer(dropout=0.5)
    randomize(layer)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


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
    for i, n in enumerate(names):
        layer.active_adapters = [n] if n in layer.lora_A else []
        torch.testing.assert_close(mixed[i], layer(x[i:i + 1])[0], atol=1e-6, rtol=1e-6)


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
    assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 3, 4, 16)])
def test_fused_node_equals_the_equation_outputs_and_gradients(bias, shape):
    layer = frozen_layer(r=4, alpha=6.0, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "FrozenLinearWithLoraBackward"
    reference = equation_path(layer, x)
    assert torch.equal(fused, reference)  # the forward runs the equation's own operations
    upstream = torch.randn_like(fused)
    for got, want in zip(grads_of(layer, x, fused, upstream), grads_of(layer, x, reference, upstream)):
        assert_equal_up_to_summation_order(got, want)


def test_fused_node_with_non_contiguous_input_and_no_input_grad():
    layer = frozen_layer()
    x = torch.randn(16, 6).T  # (6, 16), transposed view
    fused, reference = layer(x), equation_path(layer, x)
    assert torch.equal(fused, reference)
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
                                   "two_adapters", "half_adapter", "switched_off", "plain_frozen", "half_base"])
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
    layer.fused = setup != "switched_off"
    x = torch.randn(3, 16, dtype=layer.base_layer.weight.dtype, requires_grad=True)
    fused = type(layer(x).grad_fn).__name__ == "FrozenLinearWithLoraBackward"
    assert fused == (setup in ("plain_frozen", "half_base"))  # only these are fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_node_on_a_half_base_is_as_accurate_as_the_equation(dtype):
    """fp32 adapters on a half-precision base: the node runs the update in half precision (as autocast would),
    the equation path in fp32. Both are measured against float64 on the same rounded inputs."""
    layer = frozen_layer(in_f=64, out_f=48, r=8)
    layer.base_layer.to(dtype)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(6, 10, 64).to(dtype).requires_grad_()
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "FrozenLinearWithLoraBackward" and fused.dtype == dtype
    layer.fused = False
    equation = layer(x)
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
