"""Helpers shared by the tests (importable because pyproject puts tests/ on pytest's pythonpath)."""

import contextlib

import pytest
import torch
import torch.nn as nn

from minilora import DecoderLM, Seq2SeqLM, get_config
from minilora.checks import ExerciseError
from minilora.inject import adapter_layers


class MLP(nn.Module):
    """Linear layers lin0, lin1, ... with a ReLU between them: MLP(64, 128, 24) is 64 -> 128 -> 24."""

    def __init__(self, *dims: int):
        super().__init__()
        self.depth = len(dims) - 1
        for i in range(self.depth):
            setattr(self, f"lin{i}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x):
        for i in range(self.depth):
            x = getattr(self, f"lin{i}")(x)
            x = torch.relu(x) if i < self.depth - 1 else x
        return x


def tiny_decoder(d_model: int = 32, d_ff: int = 48) -> DecoderLM:
    """A two-layer Llama-style DecoderLM with GQA (4 heads, 2 key/value heads), vocabulary 64, in eval mode."""
    cfg = get_config("decoder-tiny", vocab_size=64, d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=d_ff,
                     max_seq_len=32)
    return DecoderLM(cfg).eval()


def tiny_seq2seq() -> Seq2SeqLM:
    """A T5-style Seq2SeqLM with two encoder and two decoder layers, 4 heads, vocabulary 64, in eval mode."""
    cfg = get_config("seq2seq-tiny", vocab_size=64, d_model=32, n_encoder_layers=2, n_layers=2, n_heads=4, d_ff=48,
                     max_seq_len=32)
    return Seq2SeqLM(cfg).eval()


def seq2seq_batch():
    """Encoder and decoder inputs of different lengths, so self- and cross-attention shapes differ."""
    return {"input_ids": torch.randint(0, 64, (4, 10)), "decoder_input_ids": torch.randint(0, 64, (4, 7))}


def tiny_llama(hidden_size: int = 32, intermediate_size: int = 48):
    """Hugging Face's LlamaForCausalLM of the same shape as `tiny_decoder`, random weights, in eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(n_embd: int = 32):
    """Hugging Face's GPT2LMHeadModel (Conv1D layers), two layers, vocabulary 64, no dropout, in eval mode."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=n_embd, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def run(model, x, **kw):
    """The output of any test model: a plain module's tensor, or a language model's logits for token ids (a float
    x goes in as it is, an integer one as input_ids, a dict as keyword inputs, e.g. an encoder-decoder's)."""
    if isinstance(x, dict):
        return model(**x, **kw).logits
    out = model(x, **kw) if not isinstance(x, torch.Tensor) or x.is_floating_point() else model(input_ids=x, **kw)
    return out if isinstance(out, torch.Tensor) else out.logits


def to_dtype(x, dtype):
    """A float input (or a dict of them) in `dtype`; token ids stay as they are."""
    if isinstance(x, dict):
        return {k: to_dtype(v, dtype) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def copy_into_peft(ours, theirs, marker=".lora_"):
    """Our adapter tensors (state_dict keys containing `marker`) into the peft model: the same keys once peft's
    "base_model.model." prefix is added."""
    sd = {k: v for k, v in ours.state_dict().items() if marker in k}
    result = theirs.load_state_dict({"base_model.model." + k: v for k, v in sd.items()}, strict=False)
    assert sd and not result.unexpected_keys and not [k for k in result.missing_keys if marker in k]


def adapter_grads(ours, theirs, x, marker=".lora_"):
    """Gradients of every adapter tensor (names containing `marker`) in our model and peft's after the same loss,
    as (ours, peft's) pairs by our name."""
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        run(model, x).pow(2).mean().backward()
    peft_params = dict(theirs.named_parameters())
    return {k: (p.grad, peft_params["base_model.model." + k].grad) for k, p in ours.named_parameters() if marker in k}


def randomize_adapters(model, name="default", seed=0, std=0.1):
    """Random A and B for adapter `name` in every LoRA layer: B starts at zero, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if name in layer.lora_A:
                for p in [*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()]:
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_fro(a, b):
    """||a - b|| / ||b|| in float64: the relative error of a whole tensor, as numerical analysis measures it."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rel(a, b):
    """max |a - b| / max |b| in the tensors' own dtype (float32 here): the error peft comparisons allow TOL of."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def max_rel_err(got, want):
    """max |got - want| / max |want| in float64: the largest error relative to the tensor's scale."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_close_fp32(got, want, rtol=1e-5):
    """got == want up to float32 rounding: max |got - want| <= rtol * max |want|.

    The default, 1e-5 of the tensor's scale, is about 100 float32 ulps: room for any summation order (thread
    count, CPU kernel) at the reduction lengths these tests use (eps * sqrt(n) < 1e-6 for n < 10^3), and far
    below what a wrong formula changes."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = max_rel_err(got, want)
    assert err <= rtol, f"max error {err:.3g} x scale > {rtol:g} x scale"


# ----------------------------------------------------------------------------- the exercise checkers (test_checks*.py)

def fails_with(check, *args, hint: str, seed: int = 0) -> str:
    """The message of the ExerciseError that check(*args, seed=seed) raises, which must contain `hint`."""
    with pytest.raises(ExerciseError) as info:
        check(*args, seed=seed)
    message = str(info.value)
    assert hint in message, message
    return message


def placeholder(*args):
    """An exercise cell as nbgrader hands it out, before the student writes anything."""
    raise NotImplementedError()


@contextlib.contextmanager
def global_random_state_unchanged():
    """Assert that the checks run inside leave torch's global generator where they found it: a student's seeded
    cells further down must see the numbers they saw before."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    yield
    assert torch.equal(torch.rand(3), expected)


def in_out(cfg):
    """(d_in, d_out) of each linear layer of a Llama block of `cfg`, worked out from the config by hand (the
    checkers read them from a model)."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q_proj": (cfg.d_model, q_out), "k_proj": (cfg.d_model, kv_out), "v_proj": (cfg.d_model, kv_out),
            "o_proj": (q_out, cfg.d_model), "gate_proj": (cfg.d_model, cfg.d_ff),
            "up_proj": (cfg.d_model, cfg.d_ff), "down_proj": (cfg.d_ff, cfg.d_model)}
