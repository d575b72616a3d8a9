"""DoRA's pieces on their own (minilora/methods/dora.py), against its equations written out in float64.

W' = m (W + s B A) / ||W + s B A||_c (Liu et al. 2024, eq. 5), the norm detached from the graph (section 4.3).
The layer in a model and equality with peft: tests/test_lora.py and tests/reference/test_dora_peft.py.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn

from minilora.methods import dora
from minilora.methods.dora import (FrozenLinearWithDora, Magnitude, SquaredRowNorms, dora_update, merge_weight,
                                   unmerge_weight, weight_norm, weight_norm_plain)

U32 = 2.0 ** -24  # float32 unit roundoff


def factors(out_f=12, in_f=16, r=4, dtype=torch.float64, b_std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=dtype) / math.sqrt(in_f)
    A = torch.randn(r, in_f, generator=g, dtype=dtype) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=g, dtype=dtype) * b_std
    return W, A, B


def row_norms_by_hand(W, A, B, s):
    """n_i = sqrt(sum_j (W_ij + s sum_k B_ik A_kj)^2), summed entry by entry in float64."""
    W, A, B = W.double(), A.double(), B.double()
    out_f, in_f = W.shape
    n = torch.zeros(out_f, dtype=torch.float64)
    for i in range(out_f):
        n[i] = sum((W[i, j] + s * sum(B[i, k] * A[k, j] for k in range(A.shape[0]))) ** 2 for j in range(in_f)).sqrt()
    return n


def dora_output_by_hand(x, W, b, A, B, s, m):
    """h = m (W + s B A) x / ||W + s B A||_c + b with the norm a constant: the paper's eq. (5) applied to x."""
    V = W + s * B @ A
    n = torch.linalg.norm(V, dim=1).detach()
    return x @ (m[:, None] * V / n[:, None]).T + (0 if b is None else b)


# ----------------------------------------------------------------------------- the row norm

def test_plain_norm_is_the_norm_of_each_row_of_w_plus_s_ba():
    W, A, B = factors(6, 5, 2)
    assert torch.allclose(weight_norm_plain(W, A, B, 1.5), row_norms_by_hand(W, A, B, 1.5), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape, s", [((12, 16, 4), 2.0), ((7, 40, 1), 0.25), ((64, 33, 8), 1 / math.sqrt(8))])
def test_fast_norm_equals_the_plain_norm_in_float64(shape, s):
    W, A, B = factors(*shape)
    assert torch.allclose(weight_norm(W, A, B, s), weight_norm_plain(W, A, B, s), rtol=1e-12, atol=0)
    # the cached ||W_i||^2 gives the same numbers, and a transposed view (GPT-2's Conv1D storage) too
    assert torch.allclose(weight_norm(W, A, B, s, w_sq=(W * W).sum(1)), weight_norm_plain(W, A, B, s), rtol=1e-12, atol=0)
    Wt = W.T.contiguous().T
    assert torch.allclose(weight_norm(Wt, A, B, s), weight_norm_plain(W, A, B, s), rtol=1e-12, atol=0)


def test_fast_norm_of_b_zero_is_the_norm_of_w():
    W, A, B = factors()
    assert torch.allclose(weight_norm(W, A, torch.zeros_like(B), 2.0), W.norm(dim=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("in_f, out_f, r, b_std", [(64, 48, 4, 0.1), (512, 256, 8, 0.05), (1536, 128, 16, 0.3), (256, 64, 8, 3.0)])
def test_fast_norm_in_float32_is_as_accurate_as_the_plain_one(in_f, out_f, r, b_std):
    """Both against float64. Each of the three terms of n_i^2 is a dot product carrying a few units of
    roundoff u of its size, the sizes bounded by T_i = (||W_i|| + s||B_i A||)^2; so |error of n_i| / n_i is
    about u T_i / n_i^2 for the fast formula and a few u for the plain one. 32 u T_i/n_i^2 leaves room for
    the reductions' lengths (here up to 1536, u sqrt(1536) ~ 40 u in the worst case, ~2 u measured)."""
    W, A, B = factors(out_f, in_f, r, torch.float32, b_std)
    s = 2.0
    truth = weight_norm_plain(W.double(), A.double(), B.double(), s)
    T = (W.double().norm(dim=1) + s * (B.double() @ A.double()).norm(dim=1)) ** 2 / truth ** 2
    fast = (weight_norm(W, A, B, s).double() - truth).abs() / truth
    plain = (weight_norm_plain(W, A, B, s).double() - truth).abs() / truth
    assert (fast <= 32 * U32 * T).all(), fast.max() / U32
    assert (plain <= 32 * U32).all(), plain.max() / U32


def cancelling_factors(dtype=torch.float32):
    """Rows 0 and 3 of W + s B A nearly vanish: W_i = -s B_i A + 1e-3 noise."""
    W, A, B = factors(8, 64, 4, torch.float64, b_std=1.0)
    noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W[[0, 3]] = -2.0 * B[[0, 3]] @ A + 1e-3 * noise / 8
    return W.to(dtype), A.to(dtype), B.to(dtype)


def test_rows_that_cancel_are_recomputed_directly_in_float32(monkeypatch):
    W, A, B = cancelling_factors()
    truth = weight_norm_plain(W.double(), A.double(), B.double(), 2.0)
    # T_i / n_i^2 is ~10^6 on rows 0 and 3: the three-term sum alone loses about all of float32's digits there
    monkeypatch.setattr(dora, "CANCELLATION", math.inf)
    raw = ((weight_norm(W, A, B, 2.0).double() - truth).abs() / truth)
    assert raw[[0, 3]].min() > 32 * U32  # worse than the plain formula's bound (how much worse depends on the CPU)
    monkeypatch.undo()
    # with the fallback those rows come from W_i + s B_i A itself, as the plain formula: its float32 error is a few u
    # times how much the row cancels, (||W_i|| + s ||B_i A||) / n_i (~10^3 on rows 0 and 3, where the bound then
    # depends on the CPU's summation order), against the three-term sum's u times that ratio squared
    err = (weight_norm(W, A, B, 2.0).double() - truth).abs() / truth
    Wd, Ad, Bd = W.double(), A.double(), B.double()
    ratio = (Wd.norm(dim=1) + 2.0 * (Bd @ Ad).norm(dim=1)) / truth
    assert (err <= 32 * U32 * ratio.clamp_min(dora.CANCELLATION)).all(), (err / U32, ratio)
    assert raw[[0, 3]].min() > 30 * err[[0, 3]].max()  # the fallback is what saves those rows


def test_norm_is_clamped_at_zero_never_nan():
    A = torch.tensor([[1.0, 0.0]])
    B = torch.tensor([[1.0]])
    W = torch.tensor([[-1.0, 0.0]])  # W + B A = 0 exactly; the three terms may round to a tiny negative
    assert weight_norm(W, A, B, 1.0).tolist() == [0.0]


# ----------------------------------------------------------------------------- the ||W_i||^2 cache

def test_squared_row_norms_are_cached_until_the_weight_changes():
    lin = nn.Linear(8, 5)
    cache = SquaredRowNorms()
    first = cache(lin.weight)
    assert torch.allclose(first, (lin.weight.double() ** 2).sum(1).float(), rtol=1e-7, atol=0)
    assert cache(lin.weight) is first  # same weight: no recomputation

    with torch.no_grad():
        lin.weight.mul_(2)  # in place (an optimizer step, copy_ under no_grad): _version moves
    assert torch.allclose(cache(lin.weight), 4 * first)
    lin.load_state_dict({"weight": torch.ones(5, 8), "bias": torch.zeros(5)})
    assert cache(lin.weight).tolist() == [8.0] * 5
    lin.weight.data = torch.full((5, 8), 2.0)  # a new tensor (set_base_weight_out_in, PiSSA): new pointer
    assert cache(lin.weight).tolist() == [32.0] * 5
    lin.to(torch.float64)  # new dtype and storage
    assert cache(lin.weight).dtype == torch.float64
    assert cache(lin.weight[:3]).shape == (3,)  # another shape
    assert cache(lin.weight.T.contiguous().T).tolist() == [32.0] * 5  # same numbers, other strides: recomputed


def test_writes_through_data_bypass_the_version_so_they_need_clear():
    lin = nn.Linear(4, 3, bias=False)
    cache = SquaredRowNorms()
    before = cache(lin.weight)
    lin.weight.data.copy_(torch.ones(3, 4))  # what merge / unmerge do: `.data` has a version counter of its own
    assert cache(lin.weight) is before  # stale, which is why merge and unmerge clear the cache
    cache.clear()
    assert cache(lin.weight).tolist() == [4.0] * 3


# ----------------------------------------------------------------------------- the forward update

def test_magnitude_holds_m_as_its_weight():
    m = Magnitude(torch.tensor([1.0, 2.0]))
    assert list(dict(m.named_parameters())) == ["weight"] and m.weight.requires_grad
    assert m.weight.tolist() == [1.0, 2.0]


def layer_tensors(out_f=12, in_f=16, r=4, dtype=torch.float64, bias=True, seed=0):
    W, A, B = factors(out_f, in_f, r, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    m = (weight_norm_plain(W, A, B, 2.0) * (1 + 0.3 * torch.rand(out_f, generator=g, dtype=dtype))).requires_grad_()
    x = torch.randn(3, 5, in_f, generator=g, dtype=dtype)
    return x, W, b, A.requires_grad_(), B.requires_grad_(), m


def test_update_is_eq5_minus_the_base_output():
    x, W, b, A, B, m = layer_tensors()
    s = 2.0
    n = weight_norm(W, A, B, s)
    base_out = x @ W.T + b
    got = base_out + dora_update(x, base_out - b, W, A, B, s, m, n)
    assert torch.allclose(got, dora_output_by_hand(x, W, b, A, B, s, m), rtol=1e-13, atol=1e-13)
    # without the base result the update computes W x itself: peft's dropout case
    assert torch.allclose(dora_update(x, None, W, A, B, s, m, n), dora_update(x, base_out - b, W, A, B, s, m, n),
                          rtol=1e-13, atol=1e-13)


def test_at_injection_m_equals_the_norm_and_the_update_is_zero():
    x, W, b, A, B, _ = layer_tensors()
    n = weight_norm(W, A, B.detach() * 0, 2.0)
    upd = dora_update(x, x @ W.T, W, A, torch.zeros_like(B), 2.0, n.clone(), n)
    assert upd.abs().max() < 1e-14


def test_with_dropout_the_base_path_sees_x_and_both_update_terms_the_dropped_input():
    """peft: h = W x + b + (m/n - 1) W x~ + (m/n) s B A x~ with x~ = dropout(x): not eq. (5) of x~."""
    x, W, b, A, B, m = layer_tensors()
    s, n = 2.0, weight_norm_plain(W, A, B, 2.0)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3).double() / 0.7
    xd = x * mask
    got = x @ W.T + b + dora_update(xd, None, W, A, B, s, m, n)
    scale = m / n
    want = x @ W.T + b + (scale - 1) * (xd @ W.T) + scale * s * (xd @ A.T @ B.T)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)


def grads(out, params):
    return torch.autograd.grad(out, params)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_treat_the_norm_as_a_constant(bias):
    """dL/dm, dL/dA, dL/dB (and dL/dx) of the update and of the fused node against autograd through the
    explicit eq. (5) with a detached norm, float64; and they differ from the undetached equation's."""
    x, W, b, A, B, m = layer_tensors(bias=bias)
    x.requires_grad_()
    s = 2.0
    probe = torch.randn(3, 5, 12, dtype=torch.float64)
    want = grads((dora_output_by_hand(x, W, b, A, B, s, m) * probe).sum(), [x, A, B, m])
    n = weight_norm(W, A, B, s).detach()
    base_out = x @ W.T + (0 if b is None else b)
    plain = base_out + dora_update(x, x @ W.T, W, A, B, s, m, n)
    fused = FrozenLinearWithDora.apply(x, W, b, A, B, m, n, s)
    for out in (plain, fused):
        got = grads((out * probe).sum(), [x, A, B, m])
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)
    V = W + s * B @ A  # the same equation with the norm left in the graph gives other A and B gradients
    undetached = x @ (m[:, None] * V / torch.linalg.norm(V, dim=1)[:, None]).T
    other = grads((undetached * probe).sum(), [A, B])
    assert not torch.allclose(other[0], want[1], rtol=1e-6) and not torch.allclose(other[1], want[2], rtol=1e-6)


def test_fused_node_passes_gradcheck():
    x, W, b, A, B, m = layer_tensors(6, 5, 2)
    x.requires_grad_()
    n = weight_norm(W, A, B, 1.5).detach()
    assert torch.autograd.gradcheck(lambda *t: FrozenLinearWithDora.apply(t[0], W, b, t[1], t[2], t[3], n, 1.5),
                                    (x, A, B, m))


@pytest.mark.parametrize("n_tokens", [4, 40])  # fewer / more tokens than in_features: the two ways to scale
def test_fused_node_in_float32_matches_float64_like_the_plain_update(n_tokens):
    """Output and gradients of the node and of the peft-order plain update, both in float32, against float64:
    the node's error is at most a small multiple of the plain path's (both are a few u of the scale)."""
    x64, W64, b64, A64, B64, m64 = layer_tensors(24, 16, 4)
    x64 = torch.randn(n_tokens, 16, dtype=torch.float64)
    s, probe = 2.0, torch.randn(n_tokens, 24, dtype=torch.float64)

    def run(dtype, fused):
        x, W, b = x64.to(dtype).requires_grad_(), W64.to(dtype), b64.to(dtype)
        A, B, m = (t.detach().to(dtype).requires_grad_() for t in (A64, B64, m64))
        n = weight_norm(W, A.detach(), B.detach(), s)
        out = FrozenLinearWithDora.apply(x, W, b, A, B, m, n, s) if fused else (
            x @ W.T + b + dora_update(x, x @ W.T, W, A, B, s, m, n))
        return [out, *grads((out * probe.to(dtype)).sum(), [x, A, B, m])]

    truth = run(torch.float64, False)
    for fused_t, plain_t, want in zip(run(torch.float32, True), run(torch.float32, False), truth):
        scale = want.abs().max()
        fused_err = (fused_t.double() - want).abs().max() / scale
        plain_err = (plain_t.double() - want).abs().max() / scale
        assert fused_err <= max(4 * plain_err, 64 * U32), (fused_err / U32, plain_err / U32)


def test_fused_node_without_weight_gradients_returns_none_for_them():
    x, W, b, A, B, m = layer_tensors()
    n = weight_norm(W, A, B, 2.0).detach()
    A.requires_grad_(False)
    out = FrozenLinearWithDora.apply(x, W, b, A, B, m, n, 2.0)
    out.sum().backward()
    assert A.grad is None and B.grad is not None and m.grad is not None


# ----------------------------------------------------------------------------- merge and unmerge

def test_merged_weight_is_eq5_and_gives_the_forward_output():
    x, W, b, A, B, m = layer_tensors()
    s = 2.0
    delta = s * B.detach() @ A.detach()
    merged, n = merge_weight(W, delta, m.detach())
    V = W + delta
    assert torch.allclose(n, row_norms_by_hand(W, A, B, s), rtol=1e-13, atol=0)
    assert torch.allclose(merged, m.detach()[:, None] * V / V.norm(dim=1)[:, None], rtol=1e-14, atol=1e-15)
    assert torch.allclose(x @ merged.T + b, dora_output_by_hand(x, W, b, A, B, s, m), rtol=1e-13, atol=1e-13)


def test_unmerge_restores_the_weight_in_float64():
    _, W, _, A, B, m = layer_tensors()
    delta = 2.0 * B.detach() @ A.detach()
    merged, n = merge_weight(W, delta, m.detach())
    back = unmerge_weight(merged, delta, m.detach(), n)
    assert (back - W).abs().max() <= 8 * 2.0 ** -53 * W.abs().max()


def test_merge_takes_the_norm_from_the_unmerged_weight():
    """peft: a second adapter merged onto W1 (the first already in it) is normalised by ||W + Delta W_2||,
    the norm its forward pass used, while the scale multiplies W1 + Delta W_2."""
    _, W, _, A, B, m = layer_tensors()
    delta = 2.0 * B.detach() @ A.detach()
    W1 = W + 0.1 * torch.randn_like(W)
    merged, n = merge_weight(W1, delta, m.detach(), W_unmerged=W)
    assert torch.allclose(n, (W + delta).norm(dim=1), rtol=1e-14, atol=0)
    assert torch.allclose(merged, (m.detach() / n)[:, None] * (W1 + delta), rtol=1e-14, atol=0)
    assert torch.allclose(unmerge_weight(merged, delta, m.detach(), n), W1, rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------- in a LoraLayer (LoraConfig(use_dora=True))

from minilora.methods.lora import LoraConfig, LoraLayer  # noqa: E402


def dora_layer(in_f=16, out_f=12, r=4, bias=True, dtype=torch.float64, names=("default",), use_dora=(True,), **kw):
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
    layer.base_layer.requires_grad_(False)
    for i, (name, d) in enumerate(zip(names, use_dora)):
        layer.add_adapter(name, LoraConfig(r=r, alpha=8, target_modules=["x"], use_dora=d, **kw))
        with torch.no_grad():
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                p.copy_(torch.randn(p.shape, dtype=dtype) * 0.3)
            if d:
                layer.lora_magnitude_vector[name].weight.mul_(1 + 0.3 * torch.rand(out_f, dtype=dtype))
    layer.active_adapters = list(names)
    return layer


def layer_by_hand(layer, name, x):
    """Eq. (5) with this layer's tensors, the norm detached: m (W + s B A) x / ||W + s B A||_c + b."""
    return dora_output_by_hand(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A[name].weight,
                               layer.lora_B[name].weight, layer.scaling[name], layer.lora_magnitude_vector[name].weight)


def test_config_use_dora_round_trips_peft_fields_and_refuses_lora_bias():
    cfg = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    assert cfg.to_peft_dict()["use_dora"] is True
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
    with pytest.raises(ValueError, match="lora_bias=True is not supported with use_dora=True"):
        LoraConfig(target_modules=["q_proj"], use_dora=True, lora_bias=True)


def test_magnitude_starts_at_the_row_norms_so_the_layer_computes_the_base():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(16, 12, dtype=torch.float64))
    layer.add_adapter("default", LoraConfig(r=4, target_modules=["x"], use_dora=True))
    layer.active_adapters = ["default"]
    m = layer.lora_magnitude_vector["default"].weight
    assert m.requires_grad and m.dtype == torch.float64
    assert torch.allclose(m, layer.base_layer.weight.norm(dim=1), rtol=1e-14, atol=0)  # B = 0: ||W||_c
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.base_layer(x), rtol=1e-13, atol=1e-13)


def test_state_keys_are_peft_s():
    layer = dora_layer()
    assert "lora_magnitude_vector.default.weight" in layer.state_dict()  # peft's module state_dict key
    assert set(layer.adapter_state("default")) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    cfg = LoraConfig(r=4, target_modules=["x"], use_dora=True)
    assert LoraLayer.expected_shapes("x", layer.base_layer, cfg)["lora_magnitude_vector"] == (12,)
    layer.delete_adapter("default")
    assert not layer.lora_magnitude_vector and not layer.adapters


@pytest.mark.parametrize("train, dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_fused_and_equation_paths_both_equal_eq5(train, dropout, monkeypatch):
    """Output and gradients, float64; the fused node runs exactly when it may (no active dropout)."""
    calls = []
    original = dora.FrozenLinearWithDora.apply
    monkeypatch.setattr(dora.FrozenLinearWithDora, "apply", lambda *a: calls.append(1) or original(*a))
    layer = dora_layer(dropout=dropout).train(train)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    want = layer_by_hand(layer, "default", x)
    params = layer.adapter_parameters("default")
    want_grads = grads((want ** 2).sum(), params)
    for fused in (True, False):
        layer.fused = fused
        calls.clear()
        got = layer(x)
        assert len(calls) == int(fused)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads((got ** 2).sum(), params), want_grads):
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)


def test_training_dropout_takes_the_equation_path_with_the_dropped_input():
    layer = dora_layer(dropout=0.5).train()
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    xd = layer.lora_dropout["default"](x)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.lora_magnitude_vector["default"].weight / weight_norm_plain(W, A, B, 2.0)
    want = x @ W.T + b + (scale - 1) * (xd @ W.T) + scale * 2.0 * (xd @ A.T @ B.T)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_merge_equals_the_forward_and_unmerge_restores_the_base_in_float64():
    layer = dora_layer(names=("a", "b", "c"), use_dora=(True, False, True)).eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    W0, want = layer.base_layer.weight.clone(), layer(x)
    layer.merge(["a"])  # b and c still pending: their norms use the base without a merged in
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    assert layer.merged_adapters == ["a", "b", "c"]
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.base_layer(x), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert (layer.base_layer.weight - W0).abs().max() <= 64 * 2.0 ** -53 * W0.abs().max()


def test_a_pending_dora_adapter_normalises_by_the_base_without_merged_adapters():
    """peft normalises each DoRA adapter by ||W + s B A|| with W the unmerged base, in forward and merge."""
    layer = dora_layer(names=("lora", "dora"), use_dora=(False, True)).eval()
    layer.merge(["lora"])
    W0 = layer.base_layer.weight - layer.delta_weight("lora")
    A, B = layer.lora_A["dora"].weight, layer.lora_B["dora"].weight
    assert torch.allclose(dora.layer_norm(layer, "dora"), weight_norm_plain(W0, A, B, 2.0), rtol=1e-12, atol=0)


def test_norm_cache_is_refreshed_after_a_lossy_merge_round_trip():
    """A bf16 base does not come back bit for bit from merge + unmerge; the cached ||W_i||^2 must follow it."""
    layer = dora_layer(dtype=torch.float32)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    layer(x)  # fills the cache
    before = layer.base_layer.weight.clone()
    layer.merge()
    layer.unmerge()
    assert not torch.equal(layer.base_layer.weight, before)
    W = layer.base_layer.weight.float()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(dora.layer_norm(layer, "default"), weight_norm_plain(W, A, B, 2.0), rtol=1e-6, atol=0)


def test_conv1d_storage_normalises_each_output():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16).double()  # weight (in, out) = (16, 12)
    layer = LoraLayer(conv)
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, target_modules=["x"], use_dora=True))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    x = torch.randn(3, 16, dtype=torch.float64)
    want = dora_output_by_hand(x, conv.weight.T, conv.bias, layer.lora_A["default"].weight,
                               layer.lora_B["default"].weight, 2.0, layer.lora_magnitude_vector["default"].weight)
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    assert torch.allclose(conv(x), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)


def test_mixed_batches_refuse_dora_adapters():
    layer = dora_layer(names=("lora", "dora"), use_dora=(False, True))
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert layer.mixed_batch_forward(x, ["lora", "__base__"]).shape == (2, 3, 12)
    with pytest.raises(ValueError, match="adapter_names cannot include DoRA adapters"):
        layer.mixed_batch_forward(x, ["dora", "__base__"])


def test_dora_on_a_4bit_base_names_the_fix():
    from minilora.methods.qlora import Linear4bit, LoraLinear4bit

    base = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"use_dora=False, or dequantize_model\(model\) first"):
        LoraLinear4bit.check_target("q_proj", base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    LoraLinear4bit.check_target("q_proj", base, LoraConfig(r=4, target_modules=["q_proj"]))  # LoRA is fine


def test_norm_keeps_the_adapter_precision_under_autocast():
    layer = dora_layer(dtype=torch.float32)
    want = dora.layer_norm(layer, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dora.layer_norm(layer, "default")
        layer(torch.randn(2, 16))  # the forward runs (on the equation path) under autocast
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_merged_weights_outside_no_grad_keep_no_graph():
    """safe_merge calls merged_weights with gradients on: the norm kept for the unmerge must be a plain tensor
    (a graph-attached one made the model impossible to deep-copy)."""
    layer = dora_layer(names=("a",), use_dora=(True,))
    layer.merged_weights("a")
    assert not layer.dora_merge_norm["a"].requires_grad
    copy.deepcopy(layer)


def test_exactly_the_rows_whose_terms_dwarf_n_squared_are_recomputed(monkeypatch):
    """The fallback's rule: row i is recomputed directly when T_i = (||W_i|| + s ||B_i A||)^2 exceeds
    CANCELLATION n_i^2, with T_i / n_i^2 worked out here in float64 from W_i = -a_i s B_i A + w_i, w_i
    orthogonal to B_i A. Rows at ratio ~1, ~34 (between CANCELLATION = 16 and 4 x 16: an error bound off by
    a factor on either term of T_i would misplace it) and ~10^6; none near 16."""
    W, A, B = factors(6, 32, 4, torch.float64, b_std=3.0)
    s = 2.0
    u = s * B @ A  # rows s B_i A, each of norm ~10: s ||B_i A|| dominates ||W_i|| in T_i
    w = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w = w - ((w * u).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True)) * u  # orthogonal to u_i
    w = w / w.norm(dim=1, keepdim=True) * u.norm(dim=1, keepdim=True)  # ||w_i|| = ||u_i||
    a = torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 0.3], dtype=torch.float64)
    eps = torch.tensor([1.0, 1.0, 0.354, 0.354, 1e-3, 1.0], dtype=torch.float64)
    W = -a[:, None] * u + eps[:, None] * w
    n_sq = ((W + u) ** 2).sum(1)
    T = (W.norm(dim=1) + u.norm(dim=1)) ** 2
    ratio = T / n_sq
    assert ((ratio - dora.CANCELLATION).abs() > 8).all() and (ratio > dora.CANCELLATION).tolist() == [
        False, False, True, True, True, False]
    recomputed = []
    plain = dora.weight_norm_plain
    monkeypatch.setattr(dora, "weight_norm_plain",
                        lambda W_, A_, B_, s_: recomputed.append(B_.clone()) or plain(W_, A_, B_, s_))
    norm = weight_norm(W, A, B, s)
    assert len(recomputed) == 1 and torch.equal(recomputed[0], B[[2, 3, 4]])
    assert torch.allclose(norm, n_sq.sqrt(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("train, dropout, base_products", [(False, 0.0, 1), (True, 0.0, 1), (False, 0.3, 1),
                                                           (True, 0.3, 2)])
def test_equation_path_reuses_the_base_product_unless_dropout_is_active(train, dropout, base_products, monkeypatch):
    """Without active dropout the update's W x is the base output minus its bias, never a second product with W;
    with dropout peft's second product W x~ on the dropped input is needed (module docstring)."""
    layer = dora_layer(dropout=dropout).train(train)
    layer.fused = False
    W = layer.base_layer.weight
    calls = []  # one entry per F.linear call (nn.Linear's forward included): True for a product with W
    linear = torch.nn.functional.linear
    is_W = lambda w: w.data_ptr() == W.data_ptr() and w.shape == W.shape  # noqa: E731 (W.to(float64) is W)
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, *a: calls.append(is_W(w)) or linear(x, w, *a))
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer(x)
    monkeypatch.undo()
    assert sum(calls) == base_products
    if not (train and dropout):
        assert torch.allclose(got, layer_by_hand(layer, "default", x), rtol=1e-12, atol=1e-12)


def test_training_dropout_on_a_bfloat16_base_with_fp32_adapters():
    """The equation path on a half-precision base: the dropped input in the adapters' fp32 meets W cast to
    fp32, and the output comes back in bf16. Expected: peft's equation in float64 on the same bf16 numbers;
    the base output and the result are each rounded to bf16 once (unit roundoff 2^-8 relative), 3 x 2^-8 of
    the output's norm leaves room for both, far below a term left out (~0.1 to 1 of it)."""
    layer = dora_layer(dtype=torch.float32, dropout=0.5)
    layer.base_layer.to(torch.bfloat16)
    layer.train()
    x = torch.randn(4, 16).bfloat16()
    torch.manual_seed(3)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.manual_seed(3)
    xd = layer.lora_dropout["default"](x.float()).double()
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    m = layer.lora_magnitude_vector["default"].weight.double()
    scale = m / weight_norm_plain(W, A, B, 2.0)
    x64 = x.double()
    want = x64 @ W.T + b + (scale - 1) * (xd @ W.T) + scale * 2.0 * (xd @ A.T @ B.T)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= 3 * 2.0 ** -8, err


def test_conv1d_storage_with_a_merged_adapter_normalises_by_the_unmerged_base():
    """GPT-2's Conv1D (weight stored (in, out), non-square): with LoRA adapter "a" merged, the pending DoRA
    adapter's norm, its forward and its merge use W0 = the stored weight without "a", transposed to (out, in)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16).double()
    with torch.no_grad():
        conv.bias.normal_()
    W0, b = conv.weight.detach().T.clone(), conv.bias.detach().clone()  # (out, in)
    layer = LoraLayer(conv)
    layer.add_adapter("a", LoraConfig(r=2, alpha=4, target_modules=["x"]))
    layer.add_adapter("dora", LoraConfig(r=4, alpha=8, target_modules=["x"], use_dora=True))
    with torch.no_grad():
        for p in (layer.lora_B["a"].weight, layer.lora_B["dora"].weight):
            p.normal_(0, 0.3)
        layer.lora_magnitude_vector["dora"].weight.mul_(1 + 0.3 * torch.rand(12, dtype=torch.float64))
    layer.active_adapters = ["a", "dora"]
    layer.eval()
    delta_a = 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    A, B, m = layer.lora_A["dora"].weight, layer.lora_B["dora"].weight, layer.lora_magnitude_vector["dora"].weight
    n = row_norms_by_hand(W0, A, B, 2.0)  # of W0, not of W0 + Delta W_a
    x = torch.randn(3, 16, dtype=torch.float64)
    # the output so far is (W0 + Delta W_a) x + b; DoRA adds (m/n - 1) times it minus b, plus (m/n) s B A x
    want = ((m / n) * (x @ (W0 + delta_a).T + 2.0 * x @ A.T @ B.T) + b).detach()
    layer.merge(["a"])
    assert torch.allclose(dora.layer_norm(layer, "dora"), n, rtol=1e-12, atol=0)
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    layer.merge(["dora"])
    assert torch.allclose(conv(x), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert torch.allclose(conv.weight.T, W0, rtol=0, atol=1e-13)


def test_an_unbatched_input_keeps_the_base_layers_output_shape():
    """x of shape (in,) gives (out,) on the equation path too, as nn.Linear and the fused node give it
    (peft's DoRA returns (1, out) there)."""
    import minilora as ml

    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    model = ml.inject(nn.Sequential(base), ml.LoraConfig(r=2, target_modules=["0"], use_dora=True, dropout=0.1))
    model.eval()
    layer = model[0]
    x = torch.randn(16)
    with torch.no_grad():
        fused = layer(x)
        layer.fused = False
        plain = layer(x)
    assert fused.shape == plain.shape == base(x).shape == (12,)
