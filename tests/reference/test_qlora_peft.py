"""minilora's QLoRA against bitsandbytes' 4-bit layers and peft's LoRA over them, on the same weights: packed
codes (with and without double quantisation), outputs and gradients of A and B, merged 4-bit weights, and
adapter files in both directions.

The bitsandbytes side is built from the same fp32 weights: every nn.Linear (and GPT-2 Conv1D) but the head becomes
a `bnb.nn.Linear4bit` (NF4, blocks of 64, fp32 compute), and the model is marked `is_loaded_in_4bit` so that peft
wraps those layers with its own `peft.tuners.lora.bnb.Linear4bit`, as it does for a model loaded in 4-bit.

Two properties of bitsandbytes 0.50 on a CPU shape these tests:
  - its CPU dequantisation kernel reads the wrong absmax on AVX-512 machines when in_features is a multiple of 16
    but not of the block size, so every layer here has in_features a multiple of 64;
  - on CPUs with AVX-512 BF16, an eval-mode forward without gradients repacks the weight into another layout
    and computes through a different kernel; `support_avx512bf16_for_cpu = False` keeps every CPU on the same
    dequantise-then-F.linear path (and keeps the packed bytes comparable).

float32 outputs and gradients agree to 1e-5 of their scale (TOL): both dequantise to the same fp32 values and
differ only in how matrix products are ordered (minilora's fused node sums the backward in its own order).
"""

import copy
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn as nn
import transformers

import minilora as ml
from minilora.inject import adapter_layers

from adapters import MLP, randomize_adapters, tiny_decoder, tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-5  # float32, relative to the tensor's scale: rounding of different summation orders, with margin
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


CASES = {
    "mlp": (lambda: MLP(64, 128, 64, 24), ["lin0", "lin1", "lin2"], lambda: torch.randn(4, 64)),
    "decoder": (lambda: tiny_decoder(64, 128), LINEARS, lambda: torch.randint(0, 64, (3, 10))),
    "llama": (lambda: tiny_llama(64, 128), LINEARS, lambda: torch.randint(0, 64, (3, 10))),
    # GPT-2's Conv1D (weight stored (in, out)): both sides quantise its (out, in) transpose
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: torch.randint(0, 64, (3, 10))),
}


def run(model, x):
    out = model(x) if x.is_floating_point() else model(input_ids=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def bnb_linear4bit(lin: nn.Module, double_quant: bool) -> bnb.nn.Linear4bit:
    weight = lin.weight.data.T if type(lin).__name__ == "Conv1D" else lin.weight.data  # (out, in)
    out_features, in_features = weight.shape
    q = bnb.nn.Linear4bit(in_features, out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=double_quant)
    q.weight = q.weight._quantize("cpu")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False  # one code path on every CPU (module docstring)
    return q


def bnb_model(base: nn.Module, double_quant: bool = False) -> nn.Module:
    """A copy of `base` with every nn.Linear (and Conv1D) but lm_head in bitsandbytes 4-bit, marked as loaded in
    4-bit."""
    model = copy.deepcopy(base)
    for name, m in list(model.named_modules()):
        if (type(m) is nn.Linear or type(m).__name__ == "Conv1D") and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear4bit(m, double_quant))
    model.is_loaded_in_4bit = True  # peft then dispatches its bnb LoRA layer, as for a from_pretrained 4-bit model
    return model


def pair(case, double_quant=False, bias="none"):
    """The same base quantised by minilora and by bitsandbytes, with LoRA on top of each; our random adapters
    copied into peft's."""
    make, targets, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    ours = ml.quantize_model(copy.deepcopy(base), double_quant=double_quant)
    ml.inject(ours, ml.LoraConfig(r=4, alpha=8, target_modules=targets, bias=bias))
    theirs = peft.get_peft_model(bnb_model(base, double_quant),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias=bias))
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(layers) == set(adapter_layers(ours))
    assert all(type(m) is peft.tuners.lora.bnb.Linear4bit for m in layers.values())
    randomize_adapters(ours)
    copy_into_peft(ours, theirs)
    return base, ours, theirs, layers, make_x()


def copy_into_peft(ours, theirs):
    sd = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    result = theirs.load_state_dict({"base_model.model." + k: v for k, v in sd.items()}, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_same_codes(ours: ml.Linear4bit, theirs: bnb.nn.Linear4bit, name: str):
    state = theirs.weight.quant_state
    assert torch.equal(ours.packed, theirs.weight.view(-1)), name
    assert torch.equal(ours.absmax, state.absmax), name  # fp32 scales, or their 8-bit codes
    if ours.double_quant:
        assert state.nested and torch.equal(ours.absmax_scale, state.state2.absmax), name
        assert torch.equal(ours.absmax_offset, state.offset), name


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_codes_of_every_layer_equal_bitsandbytes(case, double_quant):
    make, _, _ = CASES[case]
    torch.manual_seed(0)
    base = make()
    ours = ml.quantize_model(copy.deepcopy(base), double_quant=double_quant)
    theirs = bnb_model(base, double_quant)
    quantised = {n: m for n, m in ours.named_modules() if isinstance(m, ml.Linear4bit)}
    assert set(quantised) == {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, layer in quantised.items():
        assert_same_codes(layer, theirs.get_submodule(name), name)


def lora_grads(ours, theirs, x):
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        run(model, x).pow(2).mean().backward()
    peft_params = dict(theirs.named_parameters())
    return {k: (p.grad, peft_params["base_model.model." + k].grad)
            for k, p in ours.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_lora_gradients_equal_peft_over_bitsandbytes(case, fused):
    base, ours, theirs, _, x = pair(case)
    for layer in adapter_layers(ours).values():
        layer.fused = fused
    ours.eval(), theirs.eval()
    with torch.no_grad():
        out = run(ours, x)
        assert rel(out, run(theirs, x)) <= TOL
        with ml.disable_adapters(ours):
            assert rel(out, run(ours, x)) > 1e-3  # the adapters change the output: they are compared too
    grads = lora_grads(ours, theirs, x)
    assert {k.rsplit(".", 3)[-3] for k in grads} == {"lora_A", "lora_B"}  # every adapter tensor, both kinds
    for k, (got, want) in grads.items():
        assert got is not None and want is not None and rel(got, want) <= TOL, k


def test_double_quantised_outputs_and_gradients_equal_peft():
    base, ours, theirs, _, x = pair("decoder", double_quant=True)
    ours.eval(), theirs.eval()
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    for k, (got, want) in lora_grads(ours, theirs, x).items():
        assert rel(got, want) <= TOL, k


def test_base_biases_train_like_peft_with_bias_lora_only():
    base, ours, theirs, _, x = pair("mlp", bias="lora_only")
    grads = lora_grads(ours, theirs, x)
    assert {k for k in grads if k.endswith("base_layer.bias")} == {f"lin{i}.base_layer.bias" for i in range(3)}
    for k, (got, want) in grads.items():
        assert got is not None and want is not None and rel(got, want) <= TOL, k


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2"])
def test_merged_4bit_weights_equal_peft(case, double_quant):
    base, ours, theirs, layers, x = pair(case, double_quant)
    before = {n: layer.base_layer.packed.clone() for n, layer in adapter_layers(ours).items()}
    ml.merge(ours)
    for layer in layers.values():
        layer.merge()
    for name, layer in adapter_layers(ours).items():
        # dequantise (bit-exact), add the same fp32 Delta W, quantise again (bit-exact): the same bytes
        assert_same_codes(layer.base_layer, layers[name].get_base_layer(), name)
        assert not torch.equal(layer.base_layer.packed, before[name])  # the merge moved codes
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert rel(run(ours, x), run(theirs, x)) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_files_load_both_ways_between_minilora_and_peft_4bit(case, tmp_path):
    base, ours, theirs, _, x = pair(case)
    ours.eval()
    with torch.no_grad():
        want = run(ours, x)

    ml.save_adapter(ours, tmp_path / "ours")  # peft loads our file onto its 4-bit model
    loaded = peft.PeftModel.from_pretrained(bnb_model(base), tmp_path / "ours").eval()
    assert {type(m) for m in loaded.modules() if isinstance(m, peft.tuners.lora.LoraLayer)} == {
        peft.tuners.lora.bnb.Linear4bit}
    with torch.no_grad():
        assert rel(run(loaded, x), want) <= TOL

    theirs.save_pretrained(tmp_path / "peft")  # and we load peft's file onto ours
    mine = ml.load_adapter(ml.quantize_model(copy.deepcopy(base)), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel(run(mine, x), want) <= TOL
