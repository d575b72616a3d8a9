"""Helpers shared by the tests (importable because pyproject puts tests/ on pytest's pythonpath)."""

import torch

from minilora.inject import lora_layers


def randomize_adapters(model, name="default", seed=0, std=0.1):
    """Random A and B for adapter `name` in every LoRA layer: B starts at zero, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
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
