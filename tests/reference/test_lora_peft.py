"""minilora's LoRA against peft on the same weights: outputs, gradients of A and B, merged weights, init,
dropout, several adapters, mixed batches, exclude_modules, and adapter files in both directions.

float32 results depend on summation order, which changes with the thread count and the CPU kernels that run;
minilora's fused node (lora.FrozenLinearWithLora) also sums the backward's products in another order than
autograd does for peft's graph. So float32 is compared to 1e-5 of the tensor's scale (TOL, about 100 ulps:
differences seen reach 1.3e-6), and equality is proven in float64, where anything but summation order would
show far above 1e-10. Half-precision bases have tests of their own at the end."""

import copy
import warnings

import pytest
import torch

import peft

from minilora.inject import add_weighted_adapter, inject, adapter_layers, merge, set_adapter
from minilora.io import load_adapter, adapter_state_dict, save_adapter
from minilora.methods.lora import LoraConfig

from adapters import (MLP, adapter_grads, copy_into_peft, randomize_adapters, rel, rel_fro, run, seq2seq_batch,
                      tiny_decoder, tiny_gpt2, tiny_llama, tiny_seq2seq, to_dtype)

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-5  # float32, relative to the tensor's scale: rounding of different summation orders, with margin


CASES = {
    "mlp": (lambda: MLP(12, 24, 24, 6), ["lin0", "lin1", "lin2"], lambda: torch.randn(4, 12)),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              lambda: torch.randint(0, 64, (4, 10))),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: torch.randint(0, 64, (4, 10))),
    "decoder": (tiny_decoder, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                lambda: torch.randint(0, 64, (4, 10))),
    # q/k/v/o match both self- and cross-attention in the decoder, as with peft on T5-named models
    "seq2seq": (tiny_seq2seq, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], seq2seq_batch),
}


def example(x, i):
    """Row i of a batch (a tensor, or a dict of tensors for the encoder-decoder), keeping the batch dim."""
    return {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]


def peft_config(cfg: LoraConfig, fan_in_fan_out=False):
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[cfg.init]
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                           use_rslora=cfg.use_rslora, init_lora_weights=init, lora_bias=cfg.lora_bias,
                           fan_in_fan_out=fan_in_fan_out)


def pair(case, cfg, name="default"):
    make, targets, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    cfg = LoraConfig(**{**cfg.__dict__, "target_modules": targets})
    ours = inject(copy.deepcopy(base), cfg, name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg, fan_in_fan_out=case == "gpt2"),
                                 adapter_name=name)
    return base, ours, theirs, cfg, make_x()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["plain", "rslora", "dropout_eval", "lora_bias"])
def test_matches_peft_outputs_grads_and_merged_weights(case, variant):
    cfg = LoraConfig(r=4, alpha=8, use_rslora=variant == "rslora", dropout=0.3 if variant == "dropout_eval" else 0.0,
                     lora_bias=variant == "lora_bias", target_modules=["x"])
    base, ours, theirs, cfg, x = pair(case, cfg)
    randomize_adapters(ours)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()
    assert rel(run(ours, x), run(theirs, x)) <= TOL

    for k, (got, want) in adapter_grads(ours, theirs, x).items():
        assert got is not None and rel(got, want) <= TOL, k
    ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    for k, (got, want) in adapter_grads(ours64, theirs64, to_dtype(x, torch.float64)).items():
        assert rel(got, want) <= 1e-10, k

    if variant == "lora_bias" and case in ("decoder", "llama", "seq2seq"):
        return  # no base bias to merge a lora_bias into
    merge(ours)
    theirs.merge_adapter()
    ours_sd, peft_sd = ours.state_dict(), theirs.state_dict()
    for k, v in ours_sd.items():
        if "base_layer" in k:
            assert rel(v, peft_sd["base_model.model." + k]) <= TOL, k


@pytest.mark.parametrize("case", list(CASES))
def test_several_adapters_and_mixed_batch_match_peft(case):
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, target_modules=["x"]), "first")
    cfg_b = LoraConfig(**{**cfg.__dict__, "r": 2, "alpha": 3.0, "use_rslora": True})
    inject(ours, cfg_b, "second")
    theirs.add_adapter("second", peft_config(cfg_b, fan_in_fan_out=case == "gpt2"))
    randomize_adapters(ours, "first", seed=1)
    randomize_adapters(ours, "second", seed=2)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()

    set_adapter(ours, ["first", "second"])
    theirs.base_model.set_adapter(["first", "second"])
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    grads = adapter_grads(ours, theirs, x)  # both adapters train, and get peft's gradients
    assert {k.rsplit(".", 2)[-2] for k in grads} == {"first", "second"}
    for k, (got, want) in grads.items():
        assert got is not None and want is not None and rel(got, want) <= TOL, k
    for k, (got, want) in adapter_grads(copy.deepcopy(ours).double(), copy.deepcopy(theirs).double(),
                                     to_dtype(x, torch.float64)).items():
        assert rel(got, want) <= 1e-10, k

    names = ["first", "__base__", "second", "first"]
    mixed = run(ours, x, adapter_names=names)
    assert rel(mixed, run(theirs, x, adapter_names=names)) <= TOL
    for i, n in enumerate(names):  # equal to each example run alone with its adapter
        if n == "__base__":
            alone = run(base, example(x, i))
        else:
            set_adapter(ours, n)
            alone = run(ours, example(x, i))
        assert rel(mixed[i:i + 1], alone) <= TOL


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2"])
def test_dropout_in_train_mode_matches_peft_with_the_same_masks(case):
    """Seeded alike, both draw the same dropout masks (one draw per LoRA layer, in the same order), so train-mode
    outputs and gradients must agree too; the base models here have no dropout of their own."""
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, dropout=0.4, target_modules=["x"]))
    randomize_adapters(ours)
    copy_into_peft(ours, theirs)
    ours.train(), theirs.train()
    outs, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(11)
        out = run(model, x)
        out.pow(2).mean().backward()
        outs.append(out)
    assert rel(outs[0], outs[1]) <= TOL
    with torch.no_grad():
        ours.eval()
        assert rel(run(ours, x), outs[0]) > 1e-3  # the masks were really applied
    peft_params = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        if ".lora_" in k:
            assert rel(p.grad, peft_params["base_model.model." + k].grad) <= TOL, k


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_exclude_modules_wraps_the_same_layers_as_peft(case):
    make, targets, make_x = CASES[case]
    torch.manual_seed(0)
    base, x = make(), make_x()
    # an excluded name may not empty a listed target (minilora raises where peft wraps nothing): a regex here
    targets, exclude = (r"lin\d", ["lin1"]) if case == "mlp" else (targets, r".*layers\.1\..*")
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, exclude_modules=exclude)
    ours = inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      exclude_modules=exclude))
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(adapter_layers(ours)) == peft_wrapped and peft_wrapped
    randomize_adapters(ours)
    copy_into_peft(ours, theirs)
    assert rel(run(ours.eval(), x), run(theirs.eval(), x)) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_pissa_init_matches_peft(case):
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, init="pissa", target_modules=["x"]))
    ours.eval(), theirs.eval()
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer.weight" in k or ".lora_" in k:
            key = "base_model.model." + k
            assert rel(v, peft_sd[key]) <= TOL, k
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    assert rel(run(ours, x), run(base, x)) <= 1e-5  # W_res + s B A = W up to fp32 rounding of the residual


def test_gaussian_init_statistics_match_peft():
    base, ours, theirs, cfg, x = pair("llama", LoraConfig(r=8, alpha=16, init="gaussian", target_modules=["x"]))
    a_ours = torch.cat([v.flatten() for k, v in ours.state_dict().items() if "lora_A" in k])
    a_peft = torch.cat([v.flatten() for k, v in theirs.state_dict().items() if "lora_A" in k])
    assert abs(a_ours.std().item() - 1 / 8) < 0.01 and abs(a_peft.std().item() - 1 / 8) < 0.01
    assert abs(a_ours.mean().item()) < 0.01
    assert all(v.abs().max() == 0 for k, v in ours.state_dict().items() if "lora_B" in k)


def test_default_init_matches_peft_given_same_seed():
    cfg = LoraConfig(r=4, alpha=8, target_modules=["lin0", "lin1", "lin2"])
    torch.manual_seed(0)
    base = MLP(12, 24, 24, 6)
    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(123)
    inject(ours_model, cfg)
    torch.manual_seed(123)
    theirs = peft.get_peft_model(peft_model, peft_config(cfg))
    peft_sd = theirs.state_dict()
    for k, v in adapter_state_dict(ours_model).items():
        key = "base_model.model." + k.replace(".weight", ".default.weight")
        assert torch.equal(v, peft_sd[key]), k  # the same random draws, no arithmetic: equal bits


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2"])
def test_combination_matches_peft_cat_and_svd(case):
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, target_modules=["x"]), "first")
    inject(ours, cfg, "second")
    theirs.add_adapter("second", peft_config(cfg, fan_in_fan_out=case == "gpt2"))
    randomize_adapters(ours, "first", 1)
    randomize_adapters(ours, "second", 2)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()
    add_weighted_adapter(ours, ["first", "second"], [0.7, -0.4], "mix", combination_type="cat")
    theirs.add_weighted_adapter(["first", "second"], [0.7, -0.4], "mix", combination_type="cat")
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    add_weighted_adapter(ours, ["first", "second"], [0.7, -0.4], "mix_svd", combination_type="svd", svd_rank=8)
    set_adapter(ours, "mix_svd")
    assert rel(run(ours, x), run(theirs, x)) <= 1e-5  # rank 8 holds the rank<=8 sum exactly, up to fp32 SVD


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2", "decoder", "seq2seq"])
def test_file_round_trips_with_peft(case, tmp_path):
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["x"]))
    randomize_adapters(ours)
    ours.eval()
    expected = run(ours, x)

    save_adapter(ours, tmp_path / "ours")  # peft loads our file onto the same base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert rel(run(loaded, x), expected) <= TOL

    # and we load peft's file
    copy_into_peft(ours, theirs)
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert rel(run(mine, x), expected) <= TOL
    assert not any(p.requires_grad for p in mine.parameters())  # inference mode, like peft


def test_saved_config_has_peft_fields(tmp_path):
    import json

    base, ours, theirs, cfg, x = pair("mlp", LoraConfig(r=4, alpha=8, target_modules=["x"]))
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(a) == set(b)
    for k in ["r", "lora_alpha", "lora_dropout", "peft_type", "init_lora_weights", "use_rslora", "bias"]:
        assert a[k] == b[k], k
    from safetensors.torch import load_file

    ka = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    kb = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ka == kb


# ----------------------------------------------------------------------------- half-precision bases

def half_pair(case, dtype):
    """peft and minilora on the same half-precision base, both with fp32 adapters."""
    base, ours, theirs, cfg, x = pair(case, LoraConfig(r=4, alpha=8, target_modules=["x"]))
    randomize_adapters(ours)
    copy_into_peft(ours, theirs)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                p.data = p.data.to(dtype)
        model.eval()
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if ".lora_" in n)
    return ours, theirs, to_dtype(x, dtype)


@pytest.mark.parametrize("case", ["mlp", "decoder"])
def test_half_base_equation_path_equals_peft_bit_for_bit(case):
    ours, theirs, x = half_pair(case, torch.bfloat16)
    for layer in adapter_layers(ours).values():
        layer.fused = False  # the equation path: fp32 update added to the half output, rounded once, as in peft
    assert torch.equal(run(ours, x), run(theirs, x))  # the same operations in the same order as peft's forward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mlp", "decoder"])
def test_half_base_fused_node_is_as_accurate_as_peft(case, dtype):
    """The fused node runs the update in half precision (like autocast); peft upcasts to fp32. Neither equals
    the other, so both are measured against the float64 answer on the same rounded weights."""
    ours, theirs, x = half_pair(case, dtype)
    exact = copy.deepcopy(ours).double()  # the same (rounded) weights in float64: the exact answer
    out, ref, truth = run(ours, x), run(theirs, x), run(exact, to_dtype(x, torch.float64))
    assert out.dtype == dtype
    assert rel_fro(out, truth) <= 2 * rel_fro(ref, truth)
    exact_grads = adapter_grads(exact, copy.deepcopy(theirs).double(), to_dtype(x, torch.float64))
    errors = {k: (rel_fro(got, exact_grads[k][0]), rel_fro(want, exact_grads[k][0]))
              for k, (got, want) in adapter_grads(ours, theirs, x).items()}
    assert all(ours.get_parameter(k).grad.dtype == torch.float32 for k in errors)
    # per tensor the two errors scatter (either can be 3x the other); the worst tensor is the fair measure
    worst_ours, worst_peft = max(e[0] for e in errors.values()), max(e[1] for e in errors.values())
    assert worst_ours <= 2 * worst_peft, (worst_ours, worst_peft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mlp", "decoder"])
def test_half_base_mixed_batch_is_as_accurate_as_peft(case, dtype):
    ours, theirs, x = half_pair(case, dtype)
    names = ["default", "__base__", "default", "__base__"]
    out, ref = run(ours, x, adapter_names=names), run(theirs, x, adapter_names=names)
    truth = run(copy.deepcopy(theirs).double(), to_dtype(x, torch.float64), adapter_names=names)
    assert out.dtype == dtype
    # both round the base output and the update to `dtype` before adding them (a half-precision ulp or so)
    assert rel_fro(out, truth) <= 2 * rel_fro(ref, truth) + torch.finfo(torch.float32).eps
    assert rel_fro(out, truth) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_merge_matches_peft(dtype):
    ours, theirs, x = half_pair("mlp", dtype)
    merge(ours)
    theirs.merge_adapter()
    peft_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if "base_layer.weight" in k:
            want = peft_sd["base_model.model." + k]
            assert v.dtype == want.dtype == dtype
            # both add an fp32 Delta W to W and round once; a rare entry next to a tie may round the other way
            assert (v != want).float().mean() <= 0.01, k
            assert rel_fro(v, want) <= torch.finfo(dtype).eps, k
