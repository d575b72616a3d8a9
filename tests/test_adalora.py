"""AdaLoRA on its own: config checks, the SVD-form update against its equation, the orthogonality regulariser,
the cubic budget, importance scores and masking against the paper's recurrences written out, the final
phase, pruning, files (truncated to the kept ranks, rank_pattern restored), and the training-loop hooks.

Expected values are the equations written out in float64 (h = W x + b + alpha / (r_0 + 1e-5) · P diag(λ) Q x,
eq. 7-12 of Zhang et al. 2023), never the functions under test."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import minilora as ml
from minilora.methods.adalora import AdaLoraConfig, AdaLoraLayer

from adapters import MLP, max_rel_err, tiny_decoder

F64 = 1e-13  # float64, relative to the tensor's scale: the same products summed in another order
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(**kw):
    return AdaLoraConfig(**{"target_modules": ["lin0", "lin1"], "init_r": 4, "target_r": 2, "total_step": 20,
                            "tinit": 2, "tfinal": 4, **kw})


def randomize(model, seed=0):
    """λ non-zero (it starts at zero, which would hide every mistake in P and Q)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaLoraLayer):
                for name in m.lora_E:
                    m.lora_E[name].copy_(torch.randn(m.lora_E[name].shape, generator=g))


def mlp(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = ml.inject(MLP(12, 16, 10).to(dtype), config(**kw))
    randomize(model)
    return model


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, phrase", [
    ({"total_step": None}, "total_step is required"),
    ({"total_step": 0}, "total_step is required"),
    ({"tinit": 10, "tfinal": 10}, "schedule does not fit"),
    ({"tinit": -1}, "schedule does not fit"),
    ({"target_r": 5}, "target_r <= init_r"),
    ({"beta1": 1.0}, "beta1 must be in [0, 1)"),
    ({"beta2": -0.1}, "beta2 must be in [0, 1)"),
    ({"orth_reg_weight": -1}, "orth_reg_weight"),
    ({"init_r": 0}, "init_r must be an integer"),
    ({"deltaT": 0}, "deltaT must be"),
    ({"rank_pattern": {"lin0.lora_E": [True] * 6}}, "Set init_r=6"),
    ({"rank_pattern": {"lin0.lora_E": [1, 0, 1, 1]}}, "list of booleans"),
    ({"target_modules": []}, "target_modules must be a non-empty list"),
    ({"exclude_modules": ["lin0", 3]}, "exclude_modules must be a non-empty list"),
    ({"init_r": True, "target_r": 1}, "init_r must be an integer"),  # a bool is an int to Python, not a rank
    ({"target_r": 2.0}, "target_r must be an integer"),
    ({"deltaT": 1.5}, "deltaT must be an integer"),
    ({"total_step": True}, "total_step is required"),
    ({"total_step": 20.0}, "total_step is required"),
    ({"alpha": "8"}, "alpha must be > 0"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"dropout": -0.1}, "dropout must be in [0, 1)"),
])
def test_bad_configs_name_the_fix(kw, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config(**kw)


def test_peft_defaults_and_dict_round_trip():
    c = AdaLoraConfig(target_modules=["q"], total_step=100)
    assert (c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT, c.beta1, c.beta2, c.orth_reg_weight, c.alpha) == \
           (12, 8, 0, 0, 1, 0.85, 0.85, 0.5, 8.0)  # peft 0.21's AdaLoraConfig defaults
    c = config(rank_pattern={"lin0.lora_E": [True, False, True, False]}, alpha=16, dropout=0.1)
    d = c.to_peft_dict()
    assert d["peft_type"] == "ADALORA" and d["lora_alpha"] == 16 and d["lora_dropout"] == 0.1
    assert AdaLoraConfig.from_peft_dict(json.loads(json.dumps(d))) == c
    with pytest.raises(ValueError, match="use_dora"):
        AdaLoraConfig.from_peft_dict({**d, "use_dora": True})


def test_the_edges_of_every_range_are_accepted():
    """The smallest run (one step, no warm-up or final phase), no rank removed, no smoothing, no regulariser,
    alpha below one: each is a valid config, so none may be refused."""
    c = AdaLoraConfig(target_modules=["q"], total_step=1, init_r=4, target_r=4, beta1=0.0, beta2=0.0,
                      orth_reg_weight=0.0, alpha=0.5, dropout=0.0)
    assert (c.total_step, c.target_r, c.beta1, c.beta2, c.orth_reg_weight, c.alpha) == (1, 4, 0.0, 0.0, 0.0, 0.5)
    assert config(tinit=0, tfinal=19).tfinal == 19  # tinit + tfinal = total_step - 1: one step of falling budget


def test_target_and_exclude_lists_are_normalised_and_kept():
    c = config(target_modules=("lin1", "lin0"), exclude_modules={"lin1", "lin0.x"})
    assert c.target_modules == ["lin1", "lin0"] and c.exclude_modules == ["lin0.x", "lin1"]  # a set sorted
    model = ml.inject(MLP(12, 16, 10), config(target_modules=r"lin\d", exclude_modules=["lin1"]))
    assert isinstance(model.lin0, AdaLoraLayer) and type(model.lin1) is nn.Linear


def test_every_field_survives_the_peft_dict_and_alpha_is_written_as_peft_writes_it():
    c = config(exclude_modules=["lin1"], fan_in_fan_out=True, alpha=2.5, dropout=0.2, deltaT=3, beta1=0.5,
               beta2=0.6, orth_reg_weight=0.1, rank_pattern={"lin0.lora_E": [True, False, True, True]})
    d = json.loads(json.dumps(c.to_peft_dict()))
    assert (d["exclude_modules"], d["fan_in_fan_out"], d["lora_alpha"], d["lora_dropout"]) == (["lin1"], True, 2.5, 0.2)
    assert AdaLoraConfig.from_peft_dict(d) == c
    # peft's lora_alpha is an int: a whole-number alpha is written 8, not 8.0 (json keeps the difference)
    written = config().to_peft_dict()["lora_alpha"]
    assert type(written) is int and written == 8
    # peft ignores r for AdaLoRA (init_r is the rank): any r loads
    assert AdaLoraConfig.from_peft_dict({**d, "r": 4}) == c


def test_a_minimal_peft_dict_takes_peft_defaults():
    d = {"peft_type": "ADALORA", "target_modules": ["q_proj"], "total_step": 10}
    assert AdaLoraConfig.from_peft_dict(d) == AdaLoraConfig(target_modules=["q_proj"], total_step=10)
    c = AdaLoraConfig.from_peft_dict(d)
    assert (c.alpha, c.dropout, c.fan_in_fan_out, c.exclude_modules) == (8, 0.0, False, None)  # peft 0.21's


# ----------------------------------------------------------------------------- the layer

def equation(layer, x, name="default"):
    """h = W x + b + alpha / (r_0 + 1e-5) · P diag(λ) Q x, in float64."""
    W = layer.base_weight_out_in().double()
    P, lam, Q = layer.lora_B[name].double(), layer.lora_E[name].double().flatten(), layer.lora_A[name].double()
    b = layer.base_layer.bias.double() if layer.base_layer.bias is not None else 0
    scale = layer.scaling[name] / (layer.ranknum[name] + 1e-5)
    return x.double() @ W.T + b + scale * (x.double() @ Q.T) * lam @ P.T


def test_init_is_the_base_model_and_peft_distribution():
    torch.manual_seed(0)
    base = nn.Linear(300, 200)
    layer = AdaLoraLayer(copy.deepcopy(base))
    layer.add_adapter("default", config(init_r=40), "lin0")
    layer.active_adapters = ["default"]
    x = torch.randn(5, 300)
    assert torch.equal(layer(x), base(x))  # λ = 0
    assert layer.lora_E["default"].shape == (40, 1) and not layer.lora_E["default"].any()
    for p in (layer.lora_A["default"], layer.lora_B["default"]):  # N(0, 0.02²): 8000 draws, std within 5%
        assert abs(p.mean().item()) < 0.002 and abs(p.std().item() / 0.02 - 1) < 0.05


@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_and_merge_follow_the_equation(conv1d):
    base = Conv1D(10, 12) if conv1d else nn.Linear(12, 10)
    with torch.no_grad():
        base.bias.normal_()
    layer = AdaLoraLayer(base.double()).eval()
    layer.add_adapter("default", config(alpha=6), "lin0")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    want = equation(layer, x)
    assert max_rel_err(layer(x), want) <= F64
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert max_rel_err(layer(x), want) <= F64
    assert max_rel_err(layer.base_layer(x), want) <= F64
    layer.unmerge()
    assert max_rel_err(layer.base_layer.weight, original) <= F64


def test_half_precision_base_keeps_fp32_adapters_and_its_output_dtype():
    layer = AdaLoraLayer(nn.Linear(12, 10).to(torch.bfloat16))
    layer.add_adapter("default", config(), "lin0")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    assert layer.lora_A["default"].dtype == torch.float32
    x = torch.randn(4, 12).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert max_rel_err(y, equation(layer, x)) <= 2 ** -7  # one bf16 rounding of the output (8 bits)


def test_dropout_in_train_mode_masks_the_input_of_Q_only():
    """h = W x + b + alpha / (r_0 + 1e-5) · P diag(λ) Q x~, x~ = dropout(x) with the inverted scale 1 / (1 - p);
    the same mask from the same seed. In eval mode, no dropout."""
    layer = AdaLoraLayer(nn.Linear(12, 10).double())
    layer.add_adapter("default", config(dropout=0.4), "lin0")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer.train()(x)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.4, training=True)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    P, lam, Q = (layer.lora_B["default"].detach(), layer.lora_E["default"].detach().flatten(),
                 layer.lora_A["default"].detach())
    scale = 8.0 / (4 + 1e-5)
    want = x @ W.T + b + scale * ((xd @ Q.T) * lam) @ P.T
    assert max_rel_err(got, want) <= F64
    assert max_rel_err(layer.eval()(x), equation(layer, x)) <= F64


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward takes more arguments: the AdaLoRA layer must pass them on."""

    def forward(self, x, scale=1.0, *, shift=0.0):
        return super().forward(x) * scale + shift


def test_extra_forward_arguments_reach_the_base_layer():
    layer = AdaLoraLayer(ScaledLinear(12, 10).double())
    layer.add_adapter("default", config(), "lin0")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    update = equation(layer, x) - (x @ W.T + b)  # alpha / (r_0 + 1e-5) · P Λ Q x, outside the base's scale
    want = 3.0 * (x @ W.T + b) + 0.5 + update
    assert max_rel_err(layer(x, 3.0, shift=0.5), want) <= F64


def test_safe_merge_refuses_what_overflows_a_float16_base():
    """W + Delta W is formed in fp32 and stored in the base's fp16, whose largest number is 65504: an update
    of 1e5 would merge as inf, so safe_merge must check the weight as the base would hold it."""
    layer = AdaLoraLayer(nn.Linear(12, 10).half())
    layer.add_adapter("default", config(), "lin0")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].fill_(1.0), layer.lora_B["default"].fill_(1.0), layer.lora_E["default"].fill_(1e5)
    assert layer.merged_weights("default")[0].dtype == torch.float16
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="gives NaN/Inf weights; the base was left untouched"):
        layer.merge(safe_merge=True)
    assert not layer.merged_adapters and torch.equal(layer.base_layer.weight, before)


def test_adapters_are_created_on_the_base_layer_device():
    """A device other than the default without a GPU: meta. The divisor and the regulariser's identity too."""
    model = ml.inject(MLP(12, 16, 10).to("meta"), config())
    layer = model.lin0
    assert {t[n].device.type for t in (layer.lora_A, layer.lora_B, layer.lora_E) for n in t} == {"meta"}
    assert layer.divisor("default").device.type == "meta"
    assert ml.orthogonal_penalty(model).device.type == "meta"


def test_gpt2_conv1d_layers_a_second_adapter_and_init_r_up_to_min_in_out_are_accepted():
    from adapters import tiny_gpt2

    model = ml.inject(tiny_gpt2(), AdaLoraConfig(target_modules=["c_attn", "c_proj"], init_r=4, target_r=2,
                                                 total_step=10))
    layer = model.transformer.h[0].attn.c_attn  # Conv1D, weight (32, 96)
    assert isinstance(layer, AdaLoraLayer) and layer.fan_in_fan_out
    assert layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (96, 4)
    ml.inject(model, AdaLoraConfig(target_modules=["c_attn"], init_r=2, target_r=1, total_step=10), "second")
    assert layer.adapters == ["default", "second"]
    square = ml.inject(MLP(12, 16, 10), config(init_r=10, target_r=2))  # lin1 is 16 -> 10: init_r = 10 fits
    assert square.lin1.lora_E["default"].shape == (10, 1)


def test_targets_it_cannot_wrap_are_refused():
    with pytest.raises(ValueError, match="init_r <= 10"):
        ml.inject(MLP(12, 16, 10), config(init_r=11, target_r=2))
    with pytest.raises(ValueError, match="is a Embedding; AdaLoRA wraps nn.Linear and GPT-2 Conv1D only"):
        AdaLoraLayer.check_target("emb", nn.Embedding(10, 12), config())
    model = ml.inject(MLP(12, 16, 10), ml.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="one layer holds one method"):
        ml.inject(model, config(target_modules=["lin0"]), "ada")
    model = ml.inject(MLP(12, 16, 10), config())
    model.eval()
    with pytest.raises(ValueError, match="cannot run a different adapter per example"):
        model(torch.randn(2, 12), adapter_names=["default", "__base__"])


# ----------------------------------------------------------------------------- the regulariser

def test_orthogonal_penalty_is_the_mean_frobenius_distance_from_orthogonal():
    model = mlp()
    terms = []
    for name in ("lin0", "lin1"):
        layer = model.get_submodule(name)
        Q, P = layer.lora_A["default"].double(), layer.lora_B["default"].double()
        for G in (Q @ Q.T, P.T @ P):  # ||QQᵀ - I||_F and ||PᵀP - I||_F, entry by entry
            terms.append(sum((G[i, j] - float(i == j)) ** 2 for i in range(4) for j in range(4)) ** 0.5)
    assert abs(ml.orthogonal_penalty(model).item() - sum(terms) / 4) <= 1e-13 * sum(terms)
    with torch.no_grad():  # orthonormal P and Q give zero
        for name in ("lin0", "lin1"):
            layer = model.get_submodule(name)
            layer.lora_A["default"].copy_(torch.linalg.qr(torch.randn(layer.in_features, 4, dtype=torch.float64))[0].T)
            layer.lora_B["default"].copy_(torch.linalg.qr(torch.randn(layer.out_features, 4, dtype=torch.float64))[0])
    assert ml.orthogonal_penalty(model).item() <= 1e-14
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        ml.orthogonal_penalty(MLP(4, 4))


# ----------------------------------------------------------------------------- the budget

def test_budget_is_flat_then_cubic_then_flat():
    b0, bT, tinit, tfinal, T = 96, 48, 10, 20, 100
    got = [ml.budget_at(t, b0, bT, tinit, tfinal, T) for t in range(0, T + 5)]
    for t, b in enumerate(got):
        if t <= tinit:
            assert b == b0
        elif t >= T - tfinal:
            assert b == bT
        else:  # eq. 12: b_T + (b_0 - b_T)(1 - (t - t_i)/(T - t_i - t_f))^3, rounded down
            left = (T - tfinal - t) / (T - tfinal - tinit)
            assert b == int(bT + (b0 - bT) * left ** 3), t
    assert all(a >= b for a, b in zip(got, got[1:]))  # never rises
    assert got[tinit + 1] == 93 and got[T - tfinal - 1] == 48  # 48 + 48 (69/70)^3 = 93.97; 48 + 48 (1/70)^3 = 48.0001


# ----------------------------------------------------------------------------- scores and masks

def backward(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()


def test_scores_follow_the_sensitivity_and_uncertainty_recurrences():
    model = mlp(beta1=0.7, beta2=0.6)
    alloc = ml.RankAllocator(model)
    g = torch.Generator().manual_seed(3)
    want_avg, want_unc = {}, {}
    for step in range(3):
        backward(model, torch.randn(8, 12, dtype=torch.float64, generator=g))
        alloc.update_scores(model)
        for lname in ("lin0", "lin1"):
            for attr in ("lora_A", "lora_B", "lora_E"):
                p = getattr(model.get_submodule(lname), attr)["default"]
                key = f"{lname}.{attr}"
                sens = (p.detach() * p.grad).abs()  # eq. 8
                avg = 0.7 * want_avg.get(key, 0) + 0.3 * sens  # eq. 9
                unc = 0.6 * want_unc.get(key, 0) + 0.4 * (sens - avg).abs()  # eq. 10
                want_avg[key], want_unc[key] = avg, unc
                assert max_rel_err(alloc.exp_avg[key], avg) <= F64 and max_rel_err(alloc.uncertainty[key], unc) <= F64
    for lname, got in alloc.triplet_scores().items():  # eq. 7, triplet by triplet
        s = {a: want_avg[f"{lname}.{a}"] * want_unc[f"{lname}.{a}"] for a in ("lora_A", "lora_B", "lora_E")}
        want = [s["lora_E"][i, 0] + s["lora_A"][i].mean() + s["lora_B"][:, i].mean() for i in range(4)]
        assert max_rel_err(got, torch.stack(want)) <= F64


def test_an_adapter_of_another_name_has_its_own_allocator_and_penalty():
    torch.manual_seed(0)
    model = ml.inject(MLP(12, 16, 10).double(), config(orth_reg_weight=0.3), "ada")
    randomize(model)
    alloc = ml.RankAllocator(model, "ada")
    assert alloc.kept_ranks(model) == {"lin0": 4, "lin1": 4}  # before any masking: all init_r triplets
    terms = []
    for name in ("lin0", "lin1"):
        layer = model.get_submodule(name)
        Q, P = layer.lora_A["ada"].detach(), layer.lora_B["ada"].detach()
        terms += [((G - torch.eye(4, dtype=torch.float64)) ** 2).sum().sqrt() for G in (Q @ Q.T, P.T @ P)]
    want = 0.3 * sum(terms) / 4
    assert abs(alloc.penalty(model).item() - want.item()) <= 1e-13 * want.item()


def test_masking_zeroes_the_lowest_scoring_triplets_over_all_layers():
    model = mlp()
    alloc = ml.RankAllocator(model)
    backward(model, torch.randn(8, 12, dtype=torch.float64))
    alloc.update_scores(model)
    scores = alloc.triplet_scores()
    flat = sorted((s.item(), lname, i) for lname, t in scores.items() for i, s in enumerate(t))
    dropped = {(lname, i) for _, lname, i in flat[:3]}  # budget 8 - 3 = 5 of 8 triplets
    pattern = alloc.mask_to_budget(model, 5)
    for lname in ("lin0", "lin1"):
        lam = model.get_submodule(lname).lora_E["default"].flatten()
        for i in range(4):
            assert (lam[i] == 0) == ((lname, i) in dropped)
            assert pattern[f"{lname}.lora_E"][i] == ((lname, i) not in dropped)
    assert alloc.config.rank_pattern == pattern and sum(alloc.kept_ranks(model).values()) == 5


def train_with_allocator(model, steps, lr=0.05, seed=0):
    alloc = ml.RankAllocator(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    budgets, patterns = [], []
    for step in range(1, steps + 1):
        x = torch.randn(8, 12, dtype=torch.float64, generator=g)
        model.zero_grad()
        (model(x).pow(2).mean() + alloc.penalty(model)).backward()
        opt.step()
        budgets.append(alloc.update_and_allocate(model, step))
        patterns.append(copy.deepcopy(alloc.config.rank_pattern))
    return alloc, budgets, patterns


def test_schedule_masks_every_deltaT_then_holds_the_final_allocation():
    model = mlp(deltaT=3)
    cfg = model.adapter_configs["default"]
    alloc, budgets, patterns = train_with_allocator(model, cfg.total_step)
    final_start = cfg.total_step - cfg.tfinal  # 16
    assert budgets == [ml.budget_at(t, 8, 4, 2, 4, 20) for t in range(1, final_start)] + [4] * (cfg.tfinal + 1)
    assert patterns[:cfg.tinit] == [None] * cfg.tinit  # nothing masked during warm-up
    masked_at = [t for t in range(2, final_start) if patterns[t - 1] != patterns[t - 2]]
    assert all(t % 3 == 0 for t in masked_at) and masked_at  # only on deltaT steps
    assert all(p == patterns[final_start - 1] for p in patterns[final_start - 1:])  # held to the end
    assert sum(sum(v) for v in cfg.rank_pattern.values()) == 4  # target_r × 2 layers
    for lname, keep in cfg.rank_pattern.items():  # λ of dropped triplets is zero at the end despite Adam
        lam = model.get_submodule(lname.removesuffix(".lora_E")).lora_E["default"].flatten()
        assert all((lam[i] == 0) != k for i, k in enumerate(keep))
    assert not alloc.exp_avg  # scores were reset at the final allocation


def test_warm_up_masks_nothing_through_step_tinit():
    """Eq. 12: b(t) = b0 for t <= tinit, and no masking there (peft's mask_ind is False); with deltaT = 1 the
    first masking is at step tinit + 1."""
    model = mlp(deltaT=1)
    cfg = model.adapter_configs["default"]
    _, _, patterns = train_with_allocator(model, cfg.tinit + 1)
    assert patterns[:cfg.tinit] == [None] * cfg.tinit and patterns[cfg.tinit] is not None


def test_allocator_errors_name_the_fix():
    with pytest.raises(ValueError, match="not an AdaLoRA adapter"):
        ml.RankAllocator(MLP(12, 16, 10))
    model = mlp()
    alloc = ml.RankAllocator(model)
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        alloc.update_and_allocate(MLP(12, 16, 10), 1)
    with pytest.raises(RuntimeError, match="after loss.backward"):
        alloc.update_and_allocate(model, 1)  # no gradients yet
    with pytest.raises(RuntimeError, match="never ran"):
        alloc.update_and_allocate(model, 18)  # past the final allocation without it
    other = ml.inject(MLP(12, 16, 10).double(), config(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="not the ones the allocator was made for"):
        alloc.update_and_allocate(other, 1)


# ----------------------------------------------------------------------------- pruning and files

def trained_mlp():
    model = mlp()
    train_with_allocator(model, 20)
    return model.eval()


def test_prune_shrinks_parameters_and_file_but_not_outputs(tmp_path):
    untrained = mlp()
    ml.save_adapter(untrained, tmp_path / "full")  # all init_r triplets
    size_full = os.path.getsize(tmp_path / "full" / "adapter_model.safetensors")
    model = trained_mlp()
    x = torch.randn(5, 12, dtype=torch.float64)
    before = model(x)
    pattern = model.adapter_configs["default"].rank_pattern
    ml.save_adapter(model, tmp_path / "masked")
    size_masked = os.path.getsize(tmp_path / "masked" / "adapter_model.safetensors")
    n_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = ml.prune(model)
    assert f"adapters={{'default': {ranks['lin0']}}}" in repr(model.lin0)  # the printed model shows kept ranks
    n_after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert max_rel_err(model(x), before) <= F64
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    dims = {"lin0": (12, 16), "lin1": (16, 10)}
    assert n_before == 4 * sum(i + o + 1 for i, o in dims.values())
    assert n_after == sum(ranks[n] * (i + o + 1) for n, (i, o) in dims.items())
    ml.save_adapter(model, tmp_path / "pruned")  # the same file as before pruning: saving truncates already
    assert os.path.getsize(tmp_path / "pruned" / "adapter_model.safetensors") == size_masked
    # float64 tensors: the file falls by 8 bytes per dropped parameter (plus the JSON header's small change)
    assert -8 <= (size_full - size_masked) - 8 * (n_before - n_after) < 200  # header: 8-byte padding


def test_files_hold_the_kept_ranks_and_load_with_the_pattern(tmp_path):
    model = trained_mlp()
    x = torch.randn(5, 12, dtype=torch.float64)
    ml.save_adapter(model, tmp_path / "a")
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["rank_pattern"] == model.adapter_configs["default"].rank_pattern
    torch.manual_seed(0)
    fresh = MLP(12, 16, 10).double()
    loaded = ml.load_adapter(fresh, tmp_path / "a").eval()
    assert max_rel_err(loaded(x), model(x)) <= F64
    for k, keep in cfg["rank_pattern"].items():
        assert loaded.get_submodule(k.removesuffix(".lora_E")).lora_E["default"].shape == (sum(keep), 1)


def test_a_rank_pattern_beyond_init_r_is_refused_and_the_model_kept(tmp_path):
    model = trained_mlp()
    ml.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    d = json.load(open(path))
    d["rank_pattern"] = {k: v + [True, True] for k, v in d["rank_pattern"].items()}
    json.dump(d, open(path, "w"))
    target = MLP(12, 16, 10).double()
    state = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="init_r=4"):
        ml.load_adapter(target, tmp_path / "a")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items()) and not hasattr(target, "adapter_configs")


# ----------------------------------------------------------------------------- the training loop's hooks

def test_train_runs_the_allocator_and_the_penalty_on_a_decoder():
    from minilora.train import IGNORE_INDEX

    torch.manual_seed(0)
    model = ml.inject(tiny_decoder(), AdaLoraConfig(target_modules=ALL, init_r=3, target_r=1, total_step=12,
                                                    tinit=2, tfinal=3))
    alloc = ml.RankAllocator(model)
    calls, penalties = [], []

    def on_step(m, step):
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)  # before zero_grad
        calls.append(step)
        alloc.update_and_allocate(m, step)

    def extra_loss(m):
        penalties.append(alloc.penalty(m))
        return penalties[-1]

    rows = [{"input_ids": list(range(i, i + 8)), "labels": [IGNORE_INDEX] * 4 + list(range(i + 4, i + 8))}
            for i in range(1, 40)]
    ml.train(model, rows, ml.TrainConfig(steps=12, batch_size=4, warmup_steps=1, progress=False),
             extra_loss=extra_loss, on_step=on_step)
    assert calls == list(range(1, 13)) and len(penalties) == 12 and penalties[0].requires_grad
    assert sum(alloc.kept_ranks(model).values()) == 1 * 14  # target_r × 14 layers
