"""minilora's DoRA (LoraConfig(use_dora=True)) against peft's use_dora=True on the same weights: outputs,
gradients of A, B and the magnitude m, merged weights, init, dropout in train mode, several adapters, GPT-2's
Conv1D storage, half-precision bases, and adapter files in both directions.

Tolerances as in test_lora_peft.py: float32 to TOL = 1e-5 of the tensor's scale (about 100 ulps). Beyond the
summation orders of LoRA, minilora sums DoRA's output as (m/n)(W x + s B A x) + b where peft adds
(m/n - 1) W x + (m/n) s B A x to W x + b, and computes n = ||W + s B A||_c from W A^T and A A^T instead of
forming W + s B A: each a few ulps of the result. Equality is proven in float64 (1e-10)."""

import copy
import warnings

import pytest
import torch

import peft

from minilora.inject import adapter_layers, inject, merge, set_adapter, trainable_report, unmerge
from minilora.io import load_adapter, save_adapter
from minilora.methods.lora import LoraConfig

from adapters import (MLP, adapter_grads, copy_into_peft, randomize_adapters, rel, rel_fro, run, tiny_decoder,
                      tiny_gpt2, tiny_llama, to_dtype)

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-5  # float32, relative to the tensor's scale (see the module docstring)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # the base, its targets, an input
    "mlp": (lambda: MLP(12, 24, 24, 6), ["lin0", "lin1", "lin2"], lambda: torch.randn(4, 12)),
    "decoder": (tiny_decoder, ALL_LINEAR, lambda: torch.randint(0, 64, (4, 10))),
    "llama": (tiny_llama, ALL_LINEAR, lambda: torch.randint(0, 64, (4, 10))),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: torch.randint(0, 64, (4, 10))),  # Conv1D bases
}
DORA_CASES = list(CASES)


def peft_config(cfg: LoraConfig, case: str):
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                           use_rslora=cfg.use_rslora, init_lora_weights={"default": True, "pissa": "pissa"}[cfg.init],
                           fan_in_fan_out=case == "gpt2", use_dora=cfg.use_dora)


def dora_pair(case, name="default", **kw):
    """minilora and peft DoRA on one base, with random A, B and m (m != ||W + s B A||, so m/n - 1 is not 0)."""
    cfg = LoraConfig(**{"r": 4, "alpha": 8, "use_dora": True, "target_modules": ["x"], **kw})
    make, targets, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    cfg = LoraConfig(**{**cfg.__dict__, "target_modules": targets})
    ours = inject(copy.deepcopy(base), cfg, name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg, case), adapter_name=name)
    randomize(ours, name)
    copy_into_peft(ours, theirs)  # DoRA's m too: lora_magnitude_vector.<name>.weight in both
    return base, ours, theirs, cfg, make_x()


def randomize(model, name="default", seed=0):
    randomize_adapters(model, name, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if name in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[name].weight
                m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))


def assert_grads_match(ours, theirs, x, tol):
    grads = adapter_grads(ours, theirs, x)
    assert any("lora_magnitude_vector" in k for k in grads)
    for k, (got, want) in grads.items():
        assert got is not None and want is not None and rel(got, want) <= tol, (k, rel(got, want))


@pytest.mark.parametrize("case", DORA_CASES)
@pytest.mark.parametrize("variant", ["plain", "rslora", "dropout_eval", "equation_path"])
def test_matches_peft_outputs_grads_and_merged_weights(case, variant):
    base, ours, theirs, cfg, x = dora_pair(case, use_rslora=variant == "rslora",
                                           dropout=0.3 if variant == "dropout_eval" else 0.0)
    if variant == "equation_path":
        for layer in adapter_layers(ours).values():
            layer.fused = False
    ours.eval(), theirs.eval()
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    assert rel(run(ours, x), run(base, x)) > 1e-3  # the adapters change the output
    assert_grads_match(ours, theirs, x, TOL)
    assert_grads_match(copy.deepcopy(ours).double(), copy.deepcopy(theirs).double(), to_dtype(x, torch.float64), 1e-10)

    merge(ours)
    theirs.merge_adapter()
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer" in k:
            assert rel(v, peft_sd["base_model.model." + k]) <= TOL, k
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    unmerge(ours)
    theirs.unmerge_adapter()
    base_sd, ours_sd = base.state_dict(), ours.state_dict()
    for k, v in ours_sd.items():
        if "base_layer" in k:
            assert rel(v, base_sd[k.replace("base_layer.", "")]) <= TOL, k


@pytest.mark.parametrize("case", DORA_CASES)
def test_init_magnitude_matches_peft(case):
    """Same seed, same draws for A; m = ||W + s B A||_c = ||W||_c with B = 0, as peft initialises it."""
    make, targets, _ = CASES[case]
    torch.manual_seed(0)
    base = make()
    cfg = LoraConfig(r=4, alpha=8, use_dora=True, target_modules=targets)
    torch.manual_seed(5)
    ours = inject(copy.deepcopy(base), cfg)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg, case))
    peft_sd = theirs.state_dict()
    keys = [k for k in ours.state_dict() if ".lora_" in k]
    assert any("lora_magnitude_vector" in k for k in keys)
    for k in keys:
        assert torch.equal(ours.state_dict()[k], peft_sd["base_model.model." + k]), k  # the same operations
    assert trainable_report(ours, verbose=False).trainable == theirs.get_nb_trainable_parameters()[0]  # A, B and m


def test_pissa_init_with_dora_matches_peft():
    """PiSSA rewrites W to the residual first, then m = ||W_res + s B A||_c (= ||W||_c up to rounding)."""
    make, targets, make_x = CASES["llama"]
    torch.manual_seed(0)
    base, x = make(), make_x()
    cfg = LoraConfig(r=4, alpha=8, init="pissa", use_dora=True, target_modules=targets)
    ours = inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg, "llama"))
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer.weight" in k or ".lora_" in k:
            assert rel(v, peft_sd["base_model.model." + k]) <= TOL, k
    assert rel(run(ours.eval(), x), run(base, x)) <= 1e-5  # W' = m (W_res + s B A)/||...|| = W at injection


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2"])
def test_dropout_in_train_mode_matches_peft_with_the_same_masks(case):
    """With dropout active peft recomputes W x~ on the dropped input x~ = dropout(x). Seeded alike, both draw
    one mask per layer in the same order, so train-mode outputs and gradients agree; in float64 to 1e-10."""
    for dtype, tol in ((torch.float32, TOL), (torch.float64, 1e-10)):
        base, ours, theirs, cfg, x = dora_pair(case, dropout=0.4)
        ours, theirs, x = ours.to(dtype), theirs.to(dtype), to_dtype(x, dtype)
        outs = []
        for model in (ours.train(), theirs.train()):
            torch.manual_seed(11)
            out = run(model, x)
            out.pow(2).mean().backward()
            outs.append(out)
        assert rel(outs[0], outs[1]) <= tol
        with torch.no_grad():
            assert rel(run(ours.eval(), x), outs[0]) > 1e-3  # the masks were really applied
        peft_params = dict(theirs.named_parameters())
        for k, p in ours.named_parameters():
            if ".lora_" in k:
                assert rel(p.grad, peft_params["base_model.model." + k].grad) <= tol, k


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_several_adapters_match_peft(case):
    """Two DoRA adapters and a plain LoRA one active together: peft feeds each DoRA adapter the output so far
    (earlier adapters' updates included) as its base result; merged one after another, each normalises by
    the unmerged base weight. Mixed batches refuse DoRA adapters in both."""
    base, ours, theirs, cfg, x = dora_pair(case, name="first")
    cfg_b = LoraConfig(**{**cfg.__dict__, "r": 2, "alpha": 3.0, "use_rslora": True})
    cfg_c = LoraConfig(**{**cfg.__dict__, "use_dora": False})
    inject(ours, cfg_b, "second")
    inject(ours, cfg_c, "plain")
    theirs.add_adapter("second", peft_config(cfg_b, case))
    theirs.add_adapter("plain", peft_config(cfg_c, case))
    randomize(ours, "second", seed=2)
    randomize(ours, "plain", seed=3)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()
    names = ["first", "plain", "second"]
    set_adapter(ours, names)
    theirs.base_model.set_adapter(names)
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    assert_grads_match(ours, theirs, x, TOL)
    assert_grads_match(copy.deepcopy(ours).double(), copy.deepcopy(theirs).double(), to_dtype(x, torch.float64), 1e-10)

    merge(ours)
    theirs.merge_adapter()
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer.weight" in k:
            assert rel(v, peft_sd["base_model.model." + k]) <= TOL, k
    unmerge(ours)
    assert rel(run(ours, x), run(theirs.unmerge_adapter() or theirs, x)) <= TOL

    batch_names = ["first", "__base__", "first", "first"]
    with pytest.raises(ValueError, match="DoRA"):
        run(ours, x, adapter_names=batch_names)
    with pytest.raises(ValueError, match="DoRA"):
        run(theirs, x, adapter_names=batch_names)


@pytest.mark.parametrize("case", DORA_CASES)
def test_file_round_trips_with_peft(case, tmp_path):
    base, ours, theirs, cfg, x = dora_pair(case, dropout=0.1)
    ours.eval()
    expected = run(ours, x)

    save_adapter(ours, tmp_path / "ours")  # peft loads our file onto the same base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert loaded.peft_config["default"].use_dora
    assert rel(run(loaded, x), expected) <= TOL

    theirs.save_pretrained(tmp_path / "peft")  # and we load peft's file
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert rel(run(mine, x), expected) <= TOL
    assert not any(p.requires_grad for p in mine.parameters())

    from safetensors.torch import load_file

    ka = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ka) == set(kb) and any(k.endswith(".lora_magnitude_vector") for k in ka)  # peft's key: no ".weight"
    assert all(torch.equal(ka[k], kb[k]) for k in ka)


# ----------------------------------------------------------------------------- half-precision bases

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mlp", "decoder"])
def test_half_base_is_as_accurate_as_peft(case, dtype):
    """fp32 adapters and m on a half-precision base: both upcast x, form the update in fp32 and round the sum
    once. Measured against float64 on the same rounded weights, with the norm as each computes it."""
    base, ours, theirs, cfg, x = dora_pair(case)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                p.data = p.data.to(dtype)
        model.eval()
    x = to_dtype(x, dtype)
    exact = copy.deepcopy(ours).double()
    out, ref, truth = run(ours, x), run(theirs, x), run(exact, to_dtype(x, torch.float64))
    assert out.dtype == dtype
    assert rel_fro(out, truth) <= 2 * rel_fro(ref, truth) + torch.finfo(torch.float32).eps
    merge(ours)
    theirs.merge_adapter()
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer.weight" in k:
            want = peft_sd["base_model.model." + k]
            assert v.dtype == want.dtype == dtype
            assert rel_fro(v, want) <= torch.finfo(dtype).eps, k

