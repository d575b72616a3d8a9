"""QLoRA (minilora/methods/qlora.py): the 4-bit linear layer and LoRA over it.

Expected values are written out here from the stored codes, never taken from the code under test: the NF4 table
is copied from the QLoRA paper (appendix E), codes are decoded from the packed bytes by hand, and re-quantisation
is recomputed in float64 by nearest-level search. Gradients are checked by finite differences in float64. The
comparison with bitsandbytes and peft on the same weights is tests/reference/test_qlora_peft.py.
"""

import copy
import json
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minilora as ml
from minilora.inject import adapter_layers
from minilora.methods.lora import LoraLayer

from adapters import MLP, assert_close_fp32, max_rel_err, randomize_adapters, rel_fro, tiny_decoder

# The 16 NF4 levels as printed in the QLoRA paper, appendix E (float32 values).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
HALF_GAP = (NF4[1:] - NF4[:-1]).max().item() / 2  # 0.152: no value is further than this from its level (x absmax)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- independent NF4 arithmetic

def codes_of(layer: ml.Linear4bit) -> torch.Tensor:
    """The 4-bit codes of a layer, unpacked by hand: two per byte, the first in the high nibble, (out, in)."""
    packed = layer.packed.long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # (2 * bytes,)
    return codes[: layer.out_features * layer.in_features].view(layer.out_features, layer.in_features)


def decoded(layer: ml.Linear4bit) -> torch.Tensor:
    """W = NF4[code] * absmax of its block, in float32, (out, in). A double-quantised absmax is read through
    NF4Tensor.block_absmax (its 8-bit decoding is checked against bitsandbytes in tests/reference/)."""
    absmax = layer.weight.block_absmax() if layer.double_quant else layer.absmax
    scale = absmax.repeat_interleave(layer.blocksize)[: layer.out_features * layer.in_features]
    return (NF4[codes_of(layer).reshape(-1)] * scale).view(layer.out_features, layer.in_features)


def nf4_round(w: torch.Tensor, blocksize: int = 64):
    """Quantise in float64 by nearest-level search: codes (out, in), absmax per block, and a mask of values that
    lie within 1e-6 (of their block's absmax) of a decision boundary, where fp32 rounding of the same sum may
    legitimately pick the other level. w.numel() must be a multiple of blocksize."""
    blocks = w.double().reshape(-1, blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    v = blocks / absmax
    levels = NF4.double()
    codes = (v.unsqueeze(-1) - levels).abs().argmin(dim=-1)  # nearest level (ties: the lower one)
    midpoints = (levels[1:] + levels[:-1]) / 2
    near_tie = (v.unsqueeze(-1) - midpoints).abs().amin(dim=-1) < 1e-6
    return codes.view(w.shape), absmax.view(-1), near_tie.view(w.shape)


def assert_codes_are_nf4_of(layer: ml.Linear4bit, w: torch.Tensor):
    """The (not double-quantised) layer holds NF4(w): the same absmax per block (fp32 rounding of the sum, 1e-6
    relative) and the same code for every value that is not within fp32 rounding of a tie."""
    codes, absmax, near_tie = nf4_round(w, layer.blocksize)
    assert max_rel_err(layer.absmax, absmax) <= 1e-6
    differ = codes_of(layer) != codes
    assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} codes differ away from a tie"
    assert near_tie.float().mean() < 1e-3  # ties are rare, so the check above covers nearly every value


# ----------------------------------------------------------------------------- models

def tiny_seq2seq():
    cfg = ml.get_config("seq2seq-tiny", vocab_size=64, d_model=64, n_encoder_layers=2, n_layers=2, n_heads=4,
                        d_ff=128, max_seq_len=32)
    return ml.Seq2SeqLM(cfg).eval()


def seq2seq_batch():
    return {"input_ids": torch.randint(3, 64, (3, 9)), "decoder_input_ids": torch.randint(3, 64, (3, 6))}


MODELS = {"decoder": (lambda: tiny_decoder(64, 128), lambda: {"input_ids": torch.randint(3, 64, (3, 10))}),
          "seq2seq": (tiny_seq2seq, seq2seq_batch)}


def logits(model, batch):
    return model(**batch).logits


def lora_layer_4bit(in_f=128, out_f=48, r=4, bias=True, compute_dtype=None, **kw):
    torch.manual_seed(0)
    base = ml.Linear4bit.from_linear(nn.Linear(in_f, out_f, bias=bias), compute_dtype=compute_dtype)
    layer = ml.LoraLinear4bit(base)
    layer.add_adapter("default", ml.LoraConfig(r=r, alpha=2.0 * r, target_modules=["x"], **kw))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.normal_(0, 0.2)
    return layer


def text_rows(n=16, length=16):
    """Token rows with a simple rule (each token follows from the previous one), so a few steps lower the loss."""
    return [{"input_ids": [3 + (7 * i + 5 * k) % 60 for k in range(length)]} for i in range(n)]


# ----------------------------------------------------------------------------- Linear4bit

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_is_F_linear_with_the_weight_decoded_from_its_codes(bias, double_quant):
    lin = nn.Linear(128, 48, bias=bias)
    layer = ml.Linear4bit.from_linear(lin, double_quant=double_quant)
    W = decoded(layer)
    # the codes are the original weight's: each value within half the widest NF4 gap (times its block's absmax)
    # of its level, plus the error of the stored absmax itself (8-bit with double quantisation, else none)
    absmax = lin.weight.detach().reshape(-1, 64).abs().amax(dim=1)
    stored = layer.weight.block_absmax() if double_quant else layer.absmax
    bound = (HALF_GAP * absmax + (stored - absmax).abs()).repeat_interleave(64).view(48, 128)
    assert ((W - lin.weight).abs() <= bound * (1 + 1e-5)).all()  # 1e-5: fp32 rounding of level x absmax
    for x in (torch.randn(5, 128), torch.randn(2, 7, 128)):  # 2-d and 3-d inputs
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 48)
        assert torch.equal(y, F.linear(x, W, lin.bias))  # the same single operation on the same numbers


def test_compute_dtype_casts_input_weight_and_bias_and_returns_the_input_dtype():
    lin = nn.Linear(64, 32)
    layer = ml.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    assert layer.weight_dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    W = decoded(layer)
    x = torch.randn(2, 3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # the input's dtype, computed in bf16
    assert torch.equal(y, F.linear(x.bfloat16(), W.bfloat16(), lin.bias.bfloat16()).float())
    # and a bf16 input to an fp32 layer is computed in fp32 and handed back in bf16
    layer32 = ml.Linear4bit.from_linear(lin)
    xb = x.bfloat16()
    assert torch.equal(layer32(xb), F.linear(xb.float(), W, lin.bias).bfloat16())


def test_conv1d_is_quantised_as_its_out_in_transpose():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=32, nx=64)  # weight stored (in, out)
    nn.init.normal_(conv.weight)
    layer = ml.Linear4bit.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert_codes_are_nf4_of(layer, conv.weight.detach().T)
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), F.linear(x, decoded(layer), conv.bias))


def test_linear4bit_holds_codes_as_buffers_and_only_a_frozen_bias_as_parameter():
    layer = ml.Linear4bit.from_linear(nn.Linear(64, 32), double_quant=True)
    assert set(layer.state_dict()) == {"packed", "absmax", "absmax_scale", "absmax_offset", "bias"}
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 64 * 32 // 2
    with pytest.raises(ValueError, match=r"\(out, in\) weight"):
        ml.Linear4bit(torch.randn(4, 4, 4))


# ----------------------------------------------------------------------------- gradients (float64, finite differences)

def test_linear4bit_input_and_bias_gradients_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    layer = ml.Linear4bit.from_linear(nn.Linear(64, 24), compute_dtype=torch.float64)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    # bias="all" / "lora_only" train a 4-bit layer's bias: dL/db = sum of dL/dy over every token
    layer.bias.requires_grad_(True)
    g = torch.randn(2, 3, 24, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_over_4bit_passes_gradcheck_for_x_A_and_B_in_float64(fused):
    layer = lora_layer_4bit(in_f=64, out_f=24, r=3, compute_dtype=torch.float64)
    layer.fused = fused
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float64  # adapters take the compute dtype

    def f(x, A, B):
        params = {"lora_A.default.weight": A, "lora_B.default.weight": B}
        return torch.func.functional_call(layer, params, (x,))

    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    y = f(x, A, B)
    assert (type(y.grad_fn).__name__ == "FrozenLinearWithLoraBackward") == fused  # the path under test ran
    assert torch.autograd.gradcheck(f, (x, A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()))


def test_fused_node_equals_the_plain_path_on_a_4bit_base():
    fused = lora_layer_4bit()
    plain = copy.deepcopy(fused)
    plain.fused = False
    x = torch.randn(3, 5, 128)
    results = []
    for layer in (fused, plain):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        results.append((y, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    assert [type(r[0].grad_fn).__name__ == "FrozenLinearWithLoraBackward" for r in results] == [True, False]
    for got, want in zip(*results):  # the same products summed in other orders: float32 rounding only
        assert_close_fp32(got, want)


def test_base_bias_of_a_4bit_layer_trains_with_bias_lora_only():
    torch.manual_seed(0)
    model = ml.inject(ml.quantize_model(MLP(64, 128, 64, 16), skip=[]), ml.LoraConfig(r=4, target_modules=["lin0", "lin2"],
                                                                        bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable >= {"lin0.base_layer.bias", "lin2.base_layer.bias"}
    x = torch.randn(6, 64)
    model(x).sum().backward()
    # the last layer's bias gradient is d(sum y)/db = the number of rows, exactly
    assert torch.equal(model.lin2.base_layer.bias.grad, torch.full((16,), 6.0))
    assert model.lin0.base_layer.bias.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- memory

class SavedTensors:
    """Records every tensor autograd saves for backward: (shape, bytes, storage address)."""

    def __init__(self, model):
        self.model_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved = []

    def pack(self, t):
        self.saved.append((tuple(t.shape), t.numel() * t.element_size(), t.untyped_storage().data_ptr()))
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def activation_bytes(self):
        """Bytes of saved tensors that are not the model's own (each storage once)."""
        seen = {}
        for _, nbytes, ptr in self.saved:
            if ptr not in self.model_storages:
                seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return sum(seen.values())


@pytest.mark.parametrize("fused", [True, False])
def test_backward_keeps_no_dequantised_weight(fused):
    out_f, in_f, tokens = 256, 256, 8
    layer = lora_layer_4bit(in_f=in_f, out_f=out_f).train()
    layer.fused = fused
    x = torch.randn(tokens, in_f, requires_grad=True)  # the input gradient needs W again in the backward
    with SavedTensors(layer) as rec:
        y = layer(x)
    assert rec.saved  # the hook sees what this forward saves
    assert not [s for s, _, _ in rec.saved if s in ((out_f, in_f), (in_f, out_f))]
    # x (8 x 256), A (4 x 256), B (256 x 4) and h (8 x 4) in fp32: 20 KB against 256 KB for one fp32 weight
    assert sum(b for _, b, _ in rec.saved) <= out_f * in_f * 4 / 10
    y.sum().backward()  # and the backward still runs, dequantising again
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None

    # the same check on a full-precision base does see the weight kept for backward: the check can fail
    plain = LoraLayer(nn.Linear(in_f, out_f))
    plain.add_adapter("default", ml.LoraConfig(r=4, target_modules=["x"]))
    plain.active_adapters, plain.fused = ["default"], fused
    with SavedTensors(plain) as rec:
        plain(x)
    assert [s for s, _, _ in rec.saved if s in ((out_f, in_f), (in_f, out_f))]


class NewStorageBytes(TorchDispatchMode):
    """Live bytes of every tensor storage created by an operation inside the block, and their peak: what a
    training step allocates on top of the tensors that existed before it (views and in-place results reuse an
    input's storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def _freed(self, ptr, nbytes):
        self.live -= nbytes
        self.tracked.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and ptr not in inputs and ptr not in self.tracked:
                    self.tracked.add(ptr)
                    self.live += nbytes
                    weakref.finalize(storage, self._freed, ptr, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def training_step_memory(model, batch) -> dict[str, int]:
    """Bytes of one AdamW step on the trainable parameters, counted and measured.

    counted: weights and buffers + gradients + AdamW's two moments (from the tensors) + activations saved for
    backward (from the hook) + the largest dequantised weight (a 4-bit layer holds one during each product).
    measured: weights and buffers + the peak of everything the step itself allocates (NewStorageBytes).
    held: what the step's allocations still hold at its end (gradients and AdamW's state)."""
    persistent = tensor_bytes([*model.parameters(), *model.buffers()])
    trainable = tensor_bytes([p for p in model.parameters() if p.requires_grad])
    dequantised = max([m.out_features * m.in_features * m.compute_dtype.itemsize for m in model.modules()
                       if isinstance(m, ml.Linear4bit)], default=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    with SavedTensors(model) as rec:
        model(**batch)  # a forward whose graph is dropped: only what it saves is counted
    activations = rec.activation_bytes()
    with NewStorageBytes() as tracker:  # the first step, from the forward to the end of opt.step()
        model(**batch).loss.backward()
        opt.step()
    return {"counted": persistent + 3 * trainable + activations + dequantised, "activations": activations,
            "measured": persistent + tracker.peak, "held": tracker.live, "trainable": trainable}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_memory_of_qlora_is_below_lora_on_the_same_base(dtype):
    torch.manual_seed(0)
    base = ml.DecoderLM(ml.get_config("decoder-tiny", vocab_size=256, max_seq_len=64)).to(dtype)
    batch = {"input_ids": torch.randint(3, 256, (2, 16))}
    batch["labels"] = batch["input_ids"]
    cfg = ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS)
    lora = training_step_memory(ml.inject(copy.deepcopy(base), cfg), batch)
    qlora = training_step_memory(ml.inject(ml.quantize_model(copy.deepcopy(base)), cfg), batch)
    # the tracker sees real allocations: at the end of the step it still holds the gradients and AdamW's moments
    assert qlora["held"] >= 3 * qlora["trainable"] and lora["held"] >= 3 * lora["trainable"]
    # the 4-bit base keeps exactly the activations a full-precision base keeps, and no weight
    assert qlora["activations"] == lora["activations"]
    # The linear weights take 4.5 bits instead of 32 (16 on the bf16 base); embeddings, adapters, their
    # gradients and optimizer state, and activations are the same in both. Here that gives about half (fp32) and
    # 0.7 (bf16) of LoRA's bytes, counted or measured: sizes of tensors, not timings, so no noise.
    assert qlora["counted"] < 0.8 * lora["counted"], (qlora, lora)
    assert qlora["measured"] < 0.8 * lora["measured"], (qlora, lora)


# ----------------------------------------------------------------------------- quantize_model / dequantize_model

@pytest.mark.parametrize("kind", list(MODELS))
def test_quantize_model_replaces_every_linear_except_the_head(kind):
    make, _ = MODELS[kind]
    model = make()
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    ml.quantize_model(model)
    assert {n for n, m in model.named_modules() if isinstance(m, ml.Linear4bit)} == linears - {"lm_head"}
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == {"lm_head"}


def test_skip_takes_full_names_and_name_suffixes():
    model = ml.quantize_model(tiny_decoder(64, 128), skip=["lm_head", "down_proj", "model.layers.0.self_attn.q_proj"])
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                    "model.layers.0.self_attn.q_proj"}
    model = ml.quantize_model(tiny_decoder(64, 128), skip="lm_head")  # one name as a string
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == {"lm_head"}
    model = ml.quantize_model(tiny_decoder(64, 128), skip=["proj"])  # a suffix must be a whole name part
    assert not any(type(m) is nn.Linear for m in model.modules()) and isinstance(model.lm_head, ml.Linear4bit)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_quantised_model_computes_the_model_with_dequantised_weights_bit_for_bit(kind, double_quant):
    make, make_batch = MODELS[kind]
    torch.manual_seed(0)
    model, batch = make(), make_batch()
    quantised = ml.quantize_model(copy.deepcopy(model), double_quant=double_quant)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantised.named_modules():
            if isinstance(m, ml.Linear4bit):
                assert m.double_quant == double_quant and m.blocksize == 64
                reference.get_submodule(name).weight.copy_(decoded(m))
    assert torch.equal(logits(quantised, batch), logits(reference, batch))  # each Linear: the same F.linear


def test_quantize_model_on_a_half_precision_model_keeps_its_dtype_for_compute():
    model = ml.quantize_model(tiny_decoder(64, 128).to(torch.bfloat16))
    layers = [m for m in model.modules() if isinstance(m, ml.Linear4bit)]
    assert {(m.weight_dtype, m.compute_dtype) for m in layers} == {(torch.bfloat16, torch.bfloat16)}
    assert model(torch.randint(3, 64, (2, 5))).logits.dtype == torch.bfloat16


def test_moving_a_quantised_model_to_a_device_keeps_its_compute_dtype():
    model = ml.quantize_model(tiny_decoder(64, 128).to(torch.bfloat16))
    model.to("cpu")  # a device move passes every floating tensor through fn without changing its dtype
    assert {m.compute_dtype for m in model.modules() if isinstance(m, ml.Linear4bit)} == {torch.bfloat16}


@pytest.mark.parametrize("double_quant", [False, True])
def test_converting_a_quantised_model_to_another_dtype_changes_compute_not_codes(double_quant):
    torch.manual_seed(0)
    model = ml.quantize_model(MLP(64, 128, 64, 16), skip=[], double_quant=double_quant)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    W = {n: decoded(m) for n, m in model.named_modules() if isinstance(m, ml.Linear4bit)}
    x = torch.randn(3, 64)
    for dtype in (torch.bfloat16, torch.float64, torch.float32):  # .to(dtype) and back, as on any model
        model.to(dtype)
        # the codes and their float32 scales are untouched (a cast would round absmax); the layers compute in dtype
        assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())
        assert {m.compute_dtype for m in model.modules() if isinstance(m, ml.Linear4bit)} == {dtype}
        y = model.lin0(x.to(dtype))
        assert y.dtype == dtype
        assert torch.equal(y, F.linear(x.to(dtype), W["lin0"].to(dtype), model.lin0.bias))


def test_gpt2_conv1d_layers_are_quantised_as_out_in_weights():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    convs = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    quantised = ml.quantize_model(copy.deepcopy(model))
    assert {n for n, m in quantised.named_modules() if isinstance(m, ml.Linear4bit)} == convs
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in convs:
            reference.get_submodule(name).weight.copy_(decoded(quantised.get_submodule(name)).T)  # (in, out) again
    ids = torch.randint(0, 64, (2, 8))
    # Conv1D computes addmm(b, x, W) and Linear4bit F.linear(x, W^T, b): the same sums, maybe in another order
    assert_close_fp32(quantised(ids).logits, reference(ids).logits)
    ml.inject(quantised, ml.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    assert {type(m) for m in adapter_layers(quantised).values()} == {ml.LoraLinear4bit}
    assert not any(m.fan_in_fan_out for m in adapter_layers(quantised).values())  # the 4-bit weight is (out, in)


def test_lora_on_a_quantised_model_trains_only_the_adapters_and_lowers_the_loss():
    torch.manual_seed(0)
    model = ml.quantize_model(tiny_decoder(64, 128))
    ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS))
    assert {type(m) for m in adapter_layers(model).values()} == {ml.LoraLinear4bit}
    assert len(adapter_layers(model)) == 2 * len(LINEARS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    rows = text_rows()
    before = ml.evaluate(model, rows)["loss"]
    ml.train(model, rows, ml.TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=0, progress=False))
    after = ml.evaluate(model, rows)["loss"]
    assert after < before - 0.1, (before, after)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())  # the 4-bit base did not move


def test_quantize_model_errors_name_the_fix():
    model = ml.inject(tiny_decoder(64, 128), ml.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantize the base before injecting"):
        ml.quantize_model(model)
    with pytest.raises(ValueError, match="no nn.Linear of MLP was quantised"):
        ml.quantize_model(MLP(64, 128, 64, 16), skip=["lin0", "lin1", "lin2"])
    with pytest.raises(ValueError, match="no nn.Linear of Embedding was quantised"):
        ml.quantize_model(nn.Embedding(10, 4))


def test_gradient_checkpointing_gives_the_same_gradients_on_a_4bit_model():
    torch.manual_seed(0)
    model = ml.inject(ml.quantize_model(tiny_decoder(64, 128)), ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(3, 64, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()  # recomputation dequantises each weight once more
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert_close_fp32(grads[1][name], g)  # the same operations recomputed: rounding order at most


def test_mixed_batch_on_a_4bit_model_runs_each_example_with_its_adapter():
    torch.manual_seed(0)
    model = ml.quantize_model(tiny_decoder(64, 128))
    for name, seed in (("a", 1), ("b", 2)):
        ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS), name)
        randomize_adapters(model, name, seed=seed)
    ids = torch.randint(3, 64, (3, 10))
    names = ["a", "__base__", "b"]
    mixed = model(ids, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == "__base__":
            with ml.disable_adapters(model):
                alone = model(ids[i:i + 1]).logits
        else:
            ml.set_adapter(model, name)
            alone = model(ids[i:i + 1]).logits
        assert_close_fp32(mixed[i:i + 1], alone)


# ----------------------------------------------------------------------------- merging into 4-bit

def adapted_4bit_mlp(**cfg):
    torch.manual_seed(0)
    model = ml.quantize_model(MLP(64, 128, 64, 16), skip=[])
    ml.inject(model, ml.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["lin0", "lin1", "lin2"], **cfg}))
    randomize_adapters(model, std=0.2)
    return model.eval()


def exact_merge(layer, sign=1.0):
    """dequantize(W) + s B A (or - with sign=-1) in float64, from the stored codes and adapter tensors."""
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return decoded(layer.base_layer).double() + sign * layer.scaling["default"] * B @ A


def test_merge_requantises_base_plus_update_and_records_the_error():
    model = adapted_4bit_mlp()
    exact = {n: exact_merge(layer) for n, layer in adapter_layers(model).items()}
    ml.merge(model)
    for name, layer in adapter_layers(model).items():
        assert layer.merged_adapters == ["default"]
        assert_codes_are_nf4_of(layer.base_layer, exact[name])
        want = ((decoded(layer.base_layer).double() - exact[name]).norm() / exact[name].norm()).item()
        assert abs(layer.requantization_error["default"] - want) <= 1e-5 * want  # fp32 sum against float64
        assert 0.01 < want < HALF_GAP  # a real rounding to 16 levels, of the size NF4 gives
        x = torch.randn(5, layer.in_features)
        # merged: the layer is its 4-bit base alone, computing the new codes
        assert torch.equal(layer(x), F.linear(x, decoded(layer.base_layer), layer.base_layer.bias))


def test_merging_a_4bit_model_twice_is_a_no_op():
    model = adapted_4bit_mlp()
    ml.merge(model)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    errors = {n: dict(layer.requantization_error) for n, layer in adapter_layers(model).items()}
    with pytest.warns(UserWarning, match="already merged"):
        ml.merge(model)
    for layer in adapter_layers(model).values():
        layer.merge()  # the layer itself skips a merged adapter too
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())
    assert {n: layer.requantization_error for n, layer in adapter_layers(model).items()} == errors


def test_unmerge_requantises_the_difference_which_is_not_the_original_codes():
    """unmerge computes quantize(dequantize(W_merged) - s B A): a second rounding, so the original codes do not
    come back exactly (bitsandbytes' and peft's 4-bit unmerge do the same). Keep a copy of the base, or merge into
    a full-precision copy, when the exact base is needed."""
    model = adapted_4bit_mlp()
    original = {n: decoded(layer.base_layer).double() for n, layer in adapter_layers(model).items()}
    original_codes = {n: codes_of(layer.base_layer) for n, layer in adapter_layers(model).items()}
    ml.merge(model)
    exact = {n: exact_merge(layer, sign=-1.0) for n, layer in adapter_layers(model).items()}
    merge_error = {n: layer.requantization_error["default"] for n, layer in adapter_layers(model).items()}
    ml.unmerge(model)
    for name, layer in adapter_layers(model).items():
        assert not layer.merged and layer.requantization_error == {}
        assert_codes_are_nf4_of(layer.base_layer, exact[name])
        assert (codes_of(layer.base_layer) != original_codes[name]).any()  # not exact
        # two roundings of the same size: back within a few times the merge error of the original
        assert rel_fro(decoded(layer.base_layer), original[name]) < 4 * merge_error[name]


def test_merging_lora_bias_into_4bit_raises_and_leaves_the_codes():
    model = adapted_4bit_mlp(lora_bias=True)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(ValueError, match="lora_bias.*full-precision copy"):
        ml.merge(model)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())


def test_safe_merge_of_a_4bit_model_merges_finite_updates_and_refuses_nan():
    model = adapted_4bit_mlp()
    broken = copy.deepcopy(model)
    ml.merge(model, safe_merge=True)
    assert all(layer.merged for layer in adapter_layers(model).values())
    with torch.no_grad():
        broken.lin2.lora_B["default"].weight[0, 0] = float("nan")
    codes = {n: b.clone() for n, b in broken.named_buffers()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        ml.merge(broken, safe_merge=True)
    assert all(torch.equal(b, codes[n]) for n, b in broken.named_buffers())  # no layer was written
    assert not any(layer.merged for layer in adapter_layers(broken).values())
    with pytest.raises(ValueError, match="NaN/Inf"):
        broken.lin2.merge(safe_merge=True)


# ----------------------------------------------------------------------------- merging into a full-precision copy

def test_dequantize_then_merge_and_unload_gives_the_4bit_model_with_its_adapter():
    torch.manual_seed(0)
    model = ml.inject(ml.quantize_model(tiny_decoder(64, 128)), ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS))
    randomize_adapters(model)
    batch = {"input_ids": torch.randint(3, 64, (3, 10))}
    want = logits(model, batch)
    unmerged = ml.dequantize_model(copy.deepcopy(model))
    assert {type(m) for m in adapter_layers(unmerged).values()} == {LoraLayer}
    assert not any(isinstance(m, ml.Linear4bit) for m in unmerged.modules())
    assert_close_fp32(logits(unmerged, batch), want)  # the same weights, now stored in fp32
    full = ml.merge_and_unload(unmerged)
    assert not any(isinstance(m, (ml.Linear4bit, LoraLayer)) for m in full.modules())
    assert all(type(full.get_submodule(n)) is nn.Linear for n in adapter_layers(model))
    assert_close_fp32(logits(full, batch), want)  # W + s B A summed before the product: rounding only
    # the merge itself is exact: W' = dequantize(W) + s B A, with nothing rounded to 4 bits
    for name, layer in adapter_layers(model).items():
        assert_close_fp32(full.get_submodule(name).weight, exact_merge(layer))


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_dequantize_model_gives_frozen_linears_with_the_decoded_weights_and_biases(dtype):
    torch.manual_seed(0)
    model = ml.quantize_model(MLP(64, 128, 64, 16), skip=[])
    ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=["lin1"]))  # lin0 and lin2 stay plain Linear4bit
    W = {n: decoded(m) for n, m in model.named_modules() if isinstance(m, ml.Linear4bit)}
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, ml.Linear4bit)}
    full = ml.dequantize_model(copy.deepcopy(model), dtype=dtype)
    want_dtype = dtype or torch.float32  # default: each layer's compute dtype
    for name in W:  # "lin0", "lin1.base_layer", "lin2"
        lin = full.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == lin.bias.dtype == want_dtype
        assert torch.equal(lin.weight, W[name].to(want_dtype)) and torch.equal(lin.bias, biases[name].to(want_dtype))
        assert not lin.weight.requires_grad and not lin.bias.requires_grad  # still a frozen base
    assert type(full.lin1) is LoraLayer and full.lin1.lora_A["default"].weight.requires_grad


def test_linear4bit_defaults_are_qlora_blocksize_64_without_double_quantisation():
    layer = ml.Linear4bit(torch.randn(8, 128))
    assert layer.blocksize == 64 and not layer.double_quant and layer.absmax.numel() == 8 * 128 // 64


def test_full_precision_merge_of_a_float64_4bit_model_is_exact():
    torch.manual_seed(0)
    model = ml.quantize_model(tiny_decoder(64, 128).double())  # float64 compute over fp32-quantised codes
    assert {m.compute_dtype for m in model.modules() if isinstance(m, ml.Linear4bit)} == {torch.float64}
    ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS))
    randomize_adapters(model)
    batch = {"input_ids": torch.randint(3, 64, (3, 10))}
    want = logits(model, batch)
    full = ml.merge_and_unload(ml.dequantize_model(copy.deepcopy(model)))
    assert {m.weight.dtype for m in full.modules() if isinstance(m, nn.Linear)} == {torch.float64}
    assert max_rel_err(logits(full, batch), want) < 1e-12  # float64: only summation order differs


def test_float64_4bit_layers_merge_and_unmerge_like_fp32_ones():
    model = ml.quantize_model(MLP(64, 128, 64, 16), compute_dtype=torch.float64, skip=[])
    ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=["lin0", "lin1", "lin2"]))
    randomize_adapters(model, std=0.2)
    exact = {n: exact_merge(layer) for n, layer in adapter_layers(model).items()}
    ml.merge(model)
    for name, layer in adapter_layers(model).items():
        assert layer.base_layer.weight_dtype == torch.float32 and layer.base_layer.compute_dtype == torch.float64
        assert_codes_are_nf4_of(layer.base_layer, exact[name])
    ml.unmerge(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())


# ----------------------------------------------------------------------------- PiSSA on a 4-bit base

def test_pissa_on_a_4bit_base_requantises_the_residual():
    torch.manual_seed(0)
    model = ml.quantize_model(nn.Sequential(nn.Linear(128, 64)), skip=[])
    W0 = decoded(model[0]).double()  # what the 4-bit base computes before PiSSA
    x = torch.randn(16, 128)
    y0 = F.linear(x.double(), W0, model[0].bias.double())
    ml.inject(model, ml.LoraConfig(r=8, alpha=8, init="pissa", target_modules=["0"]))
    layer = model[0]
    A, B, s = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double(), layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    assert_close_fp32(s * B @ A, U[:, :8] @ torch.diag(S[:8]) @ Vh[:8])  # the principal part (fp32 SVD)
    residual = W0 - s * B @ A
    assert_codes_are_nf4_of(layer.base_layer, residual)
    # At init the layer computes x (Q(W_res) + s B A)^T + b = y0 + x E^T, with E = Q(W_res) - W_res the
    # re-quantisation error of the residual: the output moves away from the 4-bit base's by x E^T, no more
    E = decoded(layer.base_layer).double() - residual
    y = model(x)
    assert_close_fp32(y, y0 + x.double() @ E.T)
    # each |E_ij| is at most half the widest NF4 gap times its block's absmax of W_res, and
    # ||y - y0|| <= ||x|| ||E||_2; here that puts the output within 8% of y0 (||E|| is 9% of ||W_res||)
    absmax = residual.reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64).view_as(E)
    assert (E.abs() <= HALF_GAP * absmax * (1 + 1e-5)).all()
    assert (y.double() - y0).norm() <= x.double().norm() * torch.linalg.matrix_norm(E, ord=2)
    assert rel_fro(y, y0) < 0.1
    assert (s * B @ A).norm() > 0.5 * W0.norm()  # while the adapter holds over half of W


# ----------------------------------------------------------------------------- counting and files

def test_trainable_report_counts_4bit_weights_as_out_times_in_values(capsys):
    cfg = ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS)
    full = ml.inject(tiny_decoder(64, 128), cfg)
    quantised = ml.inject(ml.quantize_model(tiny_decoder(64, 128)), cfg)
    # the same model, the same adapters: the same counts whether the base is stored in fp32 or in 4 bits
    assert ml.trainable_report(quantised) == ml.trainable_report(full)
    n_lora = sum(4 * (layer.in_features + layer.out_features) for layer in adapter_layers(full).values())
    n_base = sum(p.numel() for p in tiny_decoder(64, 128).parameters())
    assert ml.trainable_report(quantised, verbose=False)[:2] == (n_lora, n_base + n_lora)
    assert f"trainable params: {n_lora:,} || all params: {n_base + n_lora:,}" in capsys.readouterr().out


def test_adapter_files_of_a_4bit_model_have_the_full_precision_format(tmp_path):
    cfg = ml.LoraConfig(r=4, alpha=8, target_modules=["lin0", "lin1", "lin2"], bias="lora_only")
    model = MLP(64, 128, 64, 16)
    full = ml.inject(copy.deepcopy(model), cfg)
    quantised = ml.inject(ml.quantize_model(copy.deepcopy(model), skip=[]), cfg)
    ml.save_adapter(full, tmp_path / "full")
    ml.save_adapter(quantised, tmp_path / "4bit")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "4bit" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert "base_model.model.lin0.base_layer.bias" in b  # bias="lora_only": the 4-bit layer's bias is saved too
    config_a = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "4bit" / "adapter_config.json").read_text())
    assert config_a == config_b


def test_adapter_trained_on_4bit_loads_onto_a_4bit_model_and_onto_a_full_precision_base(tmp_path):
    torch.manual_seed(0)
    base = tiny_decoder(64, 128)
    model = ml.inject(ml.quantize_model(copy.deepcopy(base)), ml.LoraConfig(r=4, alpha=8, target_modules=LINEARS))
    ml.train(model, text_rows(), ml.TrainConfig(steps=5, batch_size=8, lr=1e-2, warmup_steps=0, progress=False))
    model.eval()
    ml.save_adapter(model, tmp_path)
    batch = {"input_ids": torch.randint(3, 64, (3, 10))}
    want = logits(model, batch)

    again = ml.load_adapter(ml.quantize_model(copy.deepcopy(base)), tmp_path).eval()
    assert torch.equal(logits(again, batch), want)  # the same codes and adapters through the same operations

    # onto a full-precision base holding the dequantised weights: the same model, in fp32
    dequantised = ml.dequantize_model(ml.quantize_model(copy.deepcopy(base)))
    loaded = ml.load_adapter(dequantised, tmp_path).eval()
    assert_close_fp32(logits(loaded, batch), want)

    # onto the original base: the same adapter tensors, now over the unquantised weights
    original = ml.load_adapter(copy.deepcopy(base), tmp_path).eval()
    saved = ml.adapter_state_dict(model)
    assert all(torch.equal(v, saved[k]) for k, v in ml.adapter_state_dict(original).items())
    assert {type(m) for m in adapter_layers(original).values()} == {LoraLayer}
    assert not any(p.requires_grad for p in original.parameters())
