"""Helpers shared by the tests (importable because pyproject puts tests/ on pytest's pythonpath)."""

import torch
import torch.nn as nn

from minilora import DecoderLM, get_config
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


def tiny_llama(hidden_size: int = 32, intermediate_size: int = 48):
    """Hugging Face's LlamaForCausalLM of the same shape as `tiny_decoder`, random weights, in eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


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
