"""minilora's NF4 against bitsandbytes on the same weights, bit for bit: the codebook and the dynamic 8-bit map,
the packed 4-bit codes, the absmax of every block (float32, or its 8-bit codes, second-level absmax and offset
under double quantisation), and the dequantised weight with its dtype and shape.

Nothing here has a tolerance: both sides round the same float32 products the same way, so every comparison is
torch.equal. The grid covers 1-d and 3-d weights, odd counts, partial last blocks, rows shorter and longer than
a block, weights larger than minilora's CPU chunk (nf4.CHUNK), every block size, fp32/fp16/bf16 and both
double-quantisation settings: the full grid on small shapes, and on large ones every block size with the dtype
and double quantisation rotating.

bitsandbytes dequantises on the CPU with a native kernel that misreads absmax for some shapes
(`bnb_native_misindexes`); there, and everywhere else too, the reference is bitsandbytes' portable PyTorch kernel."""

import math

import pytest
import torch

import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from minilora.methods import nf4
from minilora.methods.nf4 import (
    BLOCKSIZES,
    CHUNK,
    dequantize,
    dequantize_8bit,
    dynamic_map,
    nf4_codebook,
    quantize,
    quantize_8bit,
)

# bitsandbytes' portable dequantisation (backends/default/ops.py), without its torch.compile wrapper: the same
# operations, run eagerly, so the tests compile nothing.
portable_dequantize = _dequantize_4bit_compute.__wrapped__

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_SHAPES = [
    (1,),  # one value: a single partial block, an odd count
    (7,),
    (3, 5),  # rows far shorter than any block
    (4, 70),  # rows longer than a block of 32 or 64, not a multiple of it
    (2, 3, 50),  # 3-d
    (3, 96),  # rows a multiple of 16 but not of 64: bitsandbytes' native kernel misreads absmax here
    (33, 127),  # odd count, partial last block at every block size
    (64, 64),
]
LARGE_SHAPES = [
    (300, 260),
    (1000, 1000),
    (5, 4097),  # rows longer than the largest block, odd length
    (2, 2048),
    (CHUNK + 3,),  # crosses minilora's CPU chunk with a partial last block
    (513, 1021),  # odd count
]
SMALL_CASES = [(s, bs, dt, dq) for s in SMALL_SHAPES for bs in BLOCKSIZES for dt in DTYPES for dq in (False, True)]
LARGE_CASES = [(s, bs, DTYPES[i % 3], i % 2 == 1) for s in LARGE_SHAPES for i, bs in enumerate(BLOCKSIZES)]


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    # F.dequantize_4bit falls back to the torch.compile'd portable kernel for odd rows and block sizes >= 2048;
    # eager mode runs the same operations without compiling once per shape (seconds each)
    with torch.compiler.set_stance("force_eager"):
        yield


def case_id(case):
    shape, bs, dtype, dq = case
    return f"{'x'.join(map(str, shape))}-bs{bs}-{str(dtype).removeprefix('torch.')}" + ("-dq" if dq else "")


def bnb_native_misindexes(shape, blocksize: int) -> bool:
    """Whether `F.dequantize_4bit` of a weight of this shape runs bitsandbytes' native CPU kernel on a shape
    for which that kernel reads the wrong absmax.

    The kernel (csrc/cpu_ops.cpp, dequantizeBlockwise4bitCpu, built with AVX-512) walks the weight as (rows, n)
    with n the last dimension, and scales value j of row r by absmax[r * (n // blocksize) + j // blocksize].
    Blocks run over the flattened weight, so the right index is (r * n + j) // blocksize: the two agree only on
    the first row or when every row starts a new block (n % blocksize == 0). Its vector loop, the one with this
    index, handles n % 16 == 0; for other even n the dispatched result equals the portable kernel's (the tests
    below compare them there). bitsandbytes' Python side calls the kernel for even n, except for block sizes of
    2048 and more when torch reports an AVX-512 CPU (those fall back to the portable kernel); with
    ATEN_CPU_CAPABILITY=default torch reports less, and the kernel also takes those."""
    n, rows = shape[-1], math.prod(shape[:-1])
    native = n % 2 == 0 and not (torch.backends.cpu.get_cpu_capability() == "AVX512" and blocksize >= 2048)
    vector_loop = torch.cpu._is_avx512_supported()  # the kernel checks the hardware itself; else a correct scalar loop
    return native and vector_loop and n % 16 == 0 and n % blocksize != 0 and rows > 1


def bnb_absmax_fp32(state):
    """The float32 absmax bitsandbytes dequantises with (decoding its 8-bit codes under double quantisation)."""
    if state.state2 is None:
        return state.absmax
    return F.dequantize_blockwise(state.absmax, state.state2) + state.offset


def random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    flat = w.view(-1)
    if flat.numel() >= 200:
        flat[64:128] = 0  # an all-zero block at block size 32 and 64
        flat[3] = 40.0  # an outlier: its block's other values squeeze towards level 0
    return w.to(dtype)


def check_against_bnb(shape, blocksize, dtype, double_quant):
    w = random_weight(shape, dtype)
    ours = quantize(w, blocksize, double_quant)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)

    assert torch.equal(ours.packed, packed.view(-1))
    if double_quant:
        assert ours.absmax.dtype == torch.uint8
        assert torch.equal(ours.absmax, state.absmax)  # the 8-bit codes
        assert torch.equal(ours.absmax_scale, state.state2.absmax)  # one float32 per 256 blocks
        assert torch.equal(ours.absmax_offset, state.offset)
        assert torch.equal(ours.block_absmax(), bnb_absmax_fp32(state))
    else:
        assert ours.absmax.dtype == torch.float32
        assert torch.equal(ours.absmax, state.absmax)

    got = dequantize(ours)
    assert got.dtype == dtype and got.shape == w.shape
    code = F.get_4bit_type("nf4", device="cpu")
    portable = portable_dequantize(packed.view(-1), bnb_absmax_fp32(state), code, blocksize, shape, dtype)
    assert torch.equal(got, portable)
    if not bnb_native_misindexes(shape, blocksize):
        assert torch.equal(got, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
def test_small_weights_equal_bnb_bit_for_bit(case):
    check_against_bnb(*case)


@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_large_weights_equal_bnb_bit_for_bit(case):
    check_against_bnb(*case)


@pytest.mark.parametrize("case", [((300, 260), 64, torch.float16, False), ((513, 1021), 32, torch.float32, True),
                                  ((2, 3, 50 * 4096 + 1), 4096, torch.bfloat16, False)], ids=case_id)
def test_weights_over_many_small_chunks_equal_bnb_bit_for_bit(case, monkeypatch):
    monkeypatch.setattr(nf4, "CHUNK", 4096)  # the smallest chunk all block sizes divide: many chunk boundaries
    check_against_bnb(*case)


def test_codebook_is_bnb_nf4_table_in_float32():
    ours, theirs = nf4_codebook(), F.get_4bit_type("nf4", device="cpu")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)  # all 16 float32 values, bit for bit
    assert ours.double().tolist() == theirs.double().tolist()


def test_dynamic_map_is_bnb_default_8bit_map():
    ours, theirs = dynamic_map(), F.create_dynamic_map()
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)
    _, state = F.quantize_blockwise(torch.randn(300))  # the map quantize_blockwise uses by default
    assert torch.equal(ours, state.code)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 5000])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_8bit_blockwise_equals_bnb(n, blocksize):
    x = torch.randn(n) * torch.logspace(-3, 1, n)  # magnitudes over four decades, as absmax values have
    if n >= 1000:
        x[256:512] = 0  # an all-zero block
    codes, absmax = quantize_8bit(x, blocksize)
    theirs, state = F.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(codes, theirs) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_8bit(codes, absmax, blocksize), F.dequantize_blockwise(theirs, state))


def test_bnb_native_kernel_reads_absmax_as_predicted():
    """Documents the exception above on a shape that `bnb_native_misindexes` flags on AVX-512 hardware: there the
    dispatched values are levels x absmax[row * (n // blocksize) + col // blocksize], not ours; on other CPUs the
    kernel's scalar loop gives ours. Once bitsandbytes fixes its index, this test fails and the exception can go."""
    shape, bs = (3, 96), 64
    w = random_weight(shape, torch.float32)
    packed, state = F.quantize_4bit(w, blocksize=bs, quant_type="nf4")
    dispatched = F.dequantize_4bit(packed, state)
    if not bnb_native_misindexes(shape, bs):
        assert torch.equal(dispatched, dequantize(quantize(w, bs)))
        return
    assert not torch.equal(dispatched, dequantize(quantize(w, bs)))
    code = F.get_4bit_type("nf4", device="cpu")
    levels = code[torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).long()].view(shape)
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    wrong_scale = state.absmax[rows * (shape[1] // bs) + cols // bs]
    assert torch.equal(dispatched, levels * wrong_scale)


def values_next_to_midpoints(absmax: float, ulps: int = 4) -> torch.Tensor:
    """float32 values within `ulps` of midpoint x absmax for every pair of neighbouring levels: where
    x * (1/absmax) and x / absmax can round to different sides of a midpoint."""
    levels = nf4_codebook()
    centre = (levels[:-1] + levels[1:]) / 2 * absmax
    out, up, down = [centre], centre, centre
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        out += [up, down]
    return torch.cat(out)


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("absmax", [3.0, 1.3, 5.5])
def test_values_one_rounding_from_a_midpoint_get_bnbs_codes(absmax, blocksize):
    """bitsandbytes multiplies full blocks by 1/absmax and divides a partial last block by absmax; the two
    round differently, which moves values next to a midpoint to the other level. Random weights almost never
    land there, so these do, in full blocks and in the partial last one."""
    x = values_next_to_midpoints(absmax)  # 135 values, all |x| < absmax
    a = torch.tensor(absmax)
    midpoints = (nf4_codebook()[:-1] + nf4_codebook()[1:]) / 2
    sensitive = x[torch.bucketize(x / a, midpoints) != torch.bucketize(x * (1 / a), midpoints)]
    assert 0 < sensitive.numel() < blocksize - 1
    n_full = math.ceil(x.numel() / (blocksize - 1))  # full blocks: absmax first, then every value of x
    body = x.repeat(blocksize)[: n_full * (blocksize - 1)].view(n_full, blocksize - 1)
    full = torch.cat([a.expand(n_full, 1), body], dim=1).view(-1)
    w = torch.cat([full, a.view(1), sensitive])  # then a partial last block of the sensitive values
    assert w.numel() % blocksize != 0
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    q = quantize(w, blocksize)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
