"""minilora's IA³ against peft's on the same weights: outputs, gradients of ia3_l, merged and unmerged weights,
several adapters, init, half-precision bases, and adapter files in both directions.

IA³'s forward is elementwise products around the base layer's own matmul, which both libraries run on the same
tensors with the same casts, so float32 outputs and merged weights are compared bit for bit. Gradients of ia3_l
are sums over tokens that autograd may order differently for the two graphs: float32 is held to 1e-5 of the
tensor's scale (TOL, about 100 ulps at these reduction lengths) and equality is proven in float64 (1e-10)."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import peft

import minilora as ml
from minilora.inject import adapter_layers
from minilora.methods.ia3 import IA3Config, IA3Layer

from adapters import MLP, adapter_grads, copy_into_peft, max_rel_err, rel_fro, run, tiny_decoder, tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)  # peft warns on every unmerge that it may be inaccurate
TOL = 1e-5  # float32, relative to the tensor's scale: rounding of different summation orders, with margin
LLAMA = (["k_proj", "v_proj", "down_proj"], ["down_proj"])  # peft's IA3 defaults for Llama
IA3 = ".ia3_l."  # in the name of every IA³ vector, ours and peft's


CASES = {  # base model, (target_modules, feedforward_modules), input
    "mlp": (lambda: MLP(12, 24, 24, 6), (["lin0", "lin1", "lin2"], ["lin1"]), lambda: torch.randn(4, 12)),
    "decoder": (tiny_decoder, LLAMA, lambda: torch.randint(0, 64, (4, 10))),
    "llama": (tiny_llama, LLAMA, lambda: torch.randint(0, 64, (4, 10))),
    "gpt2": (tiny_gpt2, (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), lambda: torch.randint(0, 64, (4, 10))),
}


def randomize(model, name="default", seed=0):
    """ia3_l uniform in [0.5, 1.5]: ones would hide mistakes, and no entry near zero makes unmerge ill-posed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if name in layer.ia3_l:
                layer.ia3_l[name].copy_(torch.rand(layer.ia3_l[name].shape, generator=g) + 0.5)


def peft_config(cfg: IA3Config):
    return peft.IA3Config(target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules or [],
                          exclude_modules=cfg.exclude_modules, init_ia3_weights=cfg.init_ia3_weights)


def pair(case, name="default", **kw):
    make, (targets, feedforward), make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    cfg = IA3Config(target_modules=targets, feedforward_modules=feedforward, **kw)
    ours = ml.inject(copy.deepcopy(base), cfg, name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg), adapter_name=name)
    return base, ours, theirs, cfg, make_x()


def base_weights(model, prefix=""):
    return {k.removeprefix(prefix): v for k, v in model.state_dict().items() if ".base_layer." in k}


@pytest.mark.parametrize("case", list(CASES))
def test_same_layers_shapes_and_feedforward_flags_as_peft(case):
    base, ours, theirs, cfg, x = pair(case)
    mine = {n: (m.is_feedforward, tuple(m.ia3_l["default"].shape)) for n, m in adapter_layers(ours).items()}
    peft_layers = {n.removeprefix("base_model.model."): (m.is_feedforward, tuple(m.ia3_l["default"].shape))
                   for n, m in theirs.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert mine == peft_layers and any(ff for ff, _ in mine.values()) and not all(ff for ff, _ in mine.values())
    assert all(isinstance(m, IA3Layer) for m in adapter_layers(ours).values())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_grads_merged_and_unmerged_weights_match_peft(case):
    base, ours, theirs, cfg, x = pair(case)
    randomize(ours)
    copy_into_peft(ours, theirs, IA3)
    ours.eval(), theirs.eval()
    assert torch.equal(run(ours, x), run(theirs, x))  # the same elementwise products and casts around each matmul

    for k, (got, want) in adapter_grads(ours, theirs, x, IA3).items():
        assert got is not None and max_rel_err(got, want) <= TOL, k
    ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    x64 = x.double() if x.is_floating_point() else x
    assert max_rel_err(run(ours64, x64), run(theirs64, x64)) <= 1e-12
    for k, (got, want) in adapter_grads(ours64, theirs64, x64, IA3).items():
        assert max_rel_err(got, want) <= 1e-10, k

    before = base_weights(ours)
    with torch.no_grad():
        ml.merge(ours)
        theirs.merge_adapter()
        peft_merged = base_weights(theirs, "base_model.model.")
        for k, v in base_weights(ours).items():
            assert torch.equal(v, peft_merged[k]), k  # l ⊙ W in the same dtype: equal bits
        assert torch.equal(run(ours, x), run(theirs, x))
        ml.unmerge(ours)
        theirs.unmerge_adapter()
        peft_unmerged = base_weights(theirs, "base_model.model.")
        for k, v in base_weights(ours).items():
            assert torch.equal(v, peft_unmerged[k]), k  # the same division by l + 1e-8
            if before[k].any():  # (GPT-2's biases start at zero)
                assert max_rel_err(v, before[k]) <= 2 * torch.finfo(torch.float32).eps, k  # an ulp of (W ⊙ l) / l
            else:
                assert not v.any(), k


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2"])
def test_several_adapters_multiply_as_in_peft(case):
    base, ours, theirs, cfg, x = pair(case, "first")
    ml.inject(ours, cfg, "second")
    theirs.add_adapter("second", peft_config(cfg))
    randomize(ours, "first", seed=1)
    randomize(ours, "second", seed=2)
    copy_into_peft(ours, theirs, IA3)
    ours.eval(), theirs.eval()
    ml.set_adapter(ours, ["second", "first"])
    theirs.base_model.set_adapter(["second", "first"])
    assert torch.equal(run(ours, x), run(theirs, x))  # the same product, in the same order
    for k, (got, want) in adapter_grads(ours, theirs, x, IA3).items():
        assert got is not None and want is not None and max_rel_err(got, want) <= TOL, k
    with torch.no_grad():
        ml.merge(ours)
        theirs.merge_adapter()
        peft_merged = base_weights(theirs, "base_model.model.")
        assert all(torch.equal(v, peft_merged[k]) for k, v in base_weights(ours).items())


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_init_matches_peft(case):
    """Ones by default; with init_ia3_weights=False the same N(0, 1) draws as peft, given the same seed."""
    for init in (True, False):
        make, (targets, feedforward), _ = CASES[case]
        base = make()
        cfg = IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=init)
        torch.manual_seed(123)
        ours = ml.inject(copy.deepcopy(base), cfg)
        torch.manual_seed(123)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
        peft_sd = theirs.state_dict()
        vectors = {k: v for k, v in ours.state_dict().items() if ".ia3_l." in k}
        assert vectors and all(torch.equal(v, peft_sd["base_model.model." + k]) for k, v in vectors.items())
        assert all(torch.equal(v, torch.ones_like(v)) for v in vectors.values()) == init


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_half_base_equals_peft_bit_for_bit(case, dtype):
    """Both keep fp32 vectors on a half-precision base and cast at the same places: equal outputs and merges."""
    base, ours, theirs, cfg, x = pair(case)
    randomize(ours)
    copy_into_peft(ours, theirs, IA3)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if ".ia3_l." not in name:
                p.data = p.data.to(dtype)
        model.eval()
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if ".ia3_l." in n)
    x = x.to(dtype) if x.is_floating_point() else x
    out = run(ours, x)
    assert out.dtype == dtype and torch.equal(out, run(theirs, x))
    with torch.no_grad():
        ml.merge(ours)
        theirs.merge_adapter()
        peft_merged = base_weights(theirs, "base_model.model.")
        for k, v in base_weights(ours).items():
            assert v.dtype == dtype and torch.equal(v, peft_merged[k]), k


def test_adapters_on_a_bf16_model_are_fp32_as_in_peft():
    make, (targets, feedforward), _ = CASES["llama"]
    base = make().to(torch.bfloat16)
    cfg = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    ours = ml.inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    dtypes = {n: p.dtype for n, p in ours.named_parameters() if ".ia3_l." in n}
    assert dtypes == {n.removeprefix("base_model.model."): p.dtype for n, p in theirs.named_parameters() if ".ia3_l." in n}
    assert set(dtypes.values()) == {torch.float32}


@pytest.mark.parametrize("case", list(CASES))
def test_file_round_trips_with_peft(case, tmp_path):
    base, ours, theirs, cfg, x = pair(case)
    randomize(ours)
    ours.eval()
    expected = run(ours, x)

    ml.save_adapter(ours, tmp_path / "ours")  # peft loads our file onto the same base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.equal(run(loaded, x), expected)

    copy_into_peft(ours, theirs, IA3)  # and we load peft's file
    theirs.save_pretrained(tmp_path / "peft")
    mine = ml.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert torch.equal(run(mine, x), expected)
    assert not any(p.requires_grad for p in mine.parameters())  # inference mode, like peft

    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in keys)


def sorted_lists(d):
    return {k: sorted(v) if isinstance(v, list) else v for k, v in d.items()}  # peft writes sets in hash order


@pytest.mark.parametrize("kw", [dict(), dict(exclude_modules=["lin2"], init_ia3_weights=False),
                                dict(target_modules=r"lin\d", feedforward_modules=r".*1")])
def test_config_dict_is_what_peft_writes_and_reads_back(kw, tmp_path):
    cfg = IA3Config(**{"target_modules": ["lin0", "lin1", "lin2"], "feedforward_modules": ["lin1"], **kw})
    theirs = peft.get_peft_model(MLP(12, 24, 24, 6), peft_config(cfg))
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    # io.save_adapter adds where the model came from (auto_mapping), the rest is the config's own
    assert sorted_lists(cfg.to_peft_dict()) == sorted_lists({**written, "auto_mapping": None})
    assert sorted_lists(IA3Config.from_peft_dict(written).to_peft_dict()) == sorted_lists(cfg.to_peft_dict())


def test_peft_reads_our_config_without_feedforward_modules_as_none(tmp_path):
    """None would make peft fill in its Llama default (down_proj); we write [] so it means what it says."""
    base = tiny_llama()
    ours = ml.inject(copy.deepcopy(base), IA3Config(target_modules=["k_proj", "down_proj"])).eval()
    randomize(ours)
    ml.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not any(m.is_feedforward for m in loaded.modules() if isinstance(m, peft.tuners.ia3.IA3Layer))
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(run(loaded.eval(), x), run(ours, x))
