"""NF4 quantisation (minilora/methods/nf4.py) against its specification, without bitsandbytes: every expected
value here comes from an independent computation (normal quantiles from the standard library, a brute-force
nearest level in float64, byte layouts written out by hand). Bit-exactness with bitsandbytes is
tests/reference/test_nf4_bnb.py."""

import math
from statistics import NormalDist

import pytest
import torch

from minilora.methods import nf4
from minilora.methods.nf4 import BLOCKSIZES, NF4Tensor, dequantize, dynamic_map, nf4_codebook, quantize

LEVELS = nf4_codebook()
SMALL_CHUNK = 4096  # the smallest chunk all block sizes divide: tests cross chunk boundaries on small weights


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(nf4, "CHUNK", SMALL_CHUNK)


def unpack(q: NF4Tensor) -> torch.Tensor:
    """The 4-bit codes of q, one per value, read from the bytes by hand: high nibble first."""
    b = q.packed.long()
    return torch.stack([b >> 4, b & 15], dim=1).view(-1)[: q.numel]


def block_absmax_f64(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of every block of the flattened x (the last one may be partial), in float64."""
    flat = x.reshape(-1).double()
    return torch.stack([flat[i:i + blocksize].abs().max() for i in range(0, flat.numel(), blocksize)])


# ----------------------------------------------------------------------------- codebook

def test_codebook_has_16_sorted_float32_levels():
    assert LEVELS.dtype == torch.float32 and LEVELS.shape == (16,)
    assert (LEVELS[1:] > LEVELS[:-1]).all()


def test_codebook_has_8_positive_7_negative_levels_an_exact_zero_and_ends_at_minus_one_and_one():
    assert (LEVELS > 0).sum() == 8 and (LEVELS < 0).sum() == 7
    assert (LEVELS == 0).sum() == 1 and LEVELS[7] == 0.0
    assert LEVELS[0] == -1.0 and LEVELS[-1] == 1.0


def test_codebook_levels_are_normalised_normal_quantiles():
    # QLoRA appendix E: quantiles of N(0, 1) at evenly spaced probabilities from `offset` down to 1/2, 9 points
    # for the positive half and 8 for the negative half (each dropping the 1/2 itself, which gives 0 once);
    # offset is the mean of 1 - 1/(2*15) and 1 - 1/(2*16), rounded to 7 digits as in the QLoRA code
    offset = round((1 - 1 / 30 + 1 - 1 / 32) / 2, 7)
    assert offset == 0.9677083

    def probabilities(k):  # linspace(offset, 0.5, k) without its last point
        return [offset + i * (0.5 - offset) / (k - 1) for i in range(k - 1)]

    q = NormalDist().inv_cdf
    values = sorted([-q(p) for p in probabilities(8)] + [0.0] + [q(p) for p in probabilities(9)])
    expected = [v / max(values) for v in values]
    # float32 levels against float64 quantiles: 1e-6 is about 10 float32 ulps at 1
    assert max(abs(a - b) for a, b in zip(LEVELS.tolist(), expected)) < 1e-6


def test_dynamic_map_has_256_sorted_values_from_minus_one_to_one_with_zero():
    m = dynamic_map()
    assert m.shape == (256,) and (m[1:] > m[:-1]).all()
    assert m[-1] == 1.0 and (m == 0).sum() == 1 and -1 < m[0] < -0.99
    # the top decade: 64 bin centres of [0.1, 1], so neighbours there are 0.9 / 64 apart
    top = m[(m > 0.1) & (m < 1)].double()
    assert top.numel() == 64 and torch.allclose(top.diff(), torch.full((63,), 0.9 / 64, dtype=torch.float64))


# ----------------------------------------------------------------------------- layout

def test_packing_puts_the_first_value_in_the_high_nibble_and_pads_an_odd_count_with_code_7():
    codes = [15, 0, 7, 3, 12]  # five values: the last byte holds code 12 and the padding code 7 (level 0.0)
    w = LEVELS[codes]  # exactly representable: absmax is 1 (code 15), so each value scales to its own level
    q = quantize(w, blocksize=64)
    assert q.packed.dtype == torch.uint8
    assert q.packed.tolist() == [0xF0, 0x73, 0xC7]
    assert q.absmax.tolist() == [1.0]
    assert torch.equal(dequantize(q), w)


def test_an_even_count_needs_no_padding():
    w = LEVELS[[1, 14, 15, 2]] * 3.0
    q = quantize(w, blocksize=32)
    assert q.packed.tolist() == [0x1E, 0xF2] and q.absmax.tolist() == [3.0]


def test_blocks_run_over_the_flattened_weight_not_over_rows():
    w = torch.zeros(3, 40)  # 120 values: blocks of 32 cross row boundaries
    w.view(-1)[[0, 33, 70, 100]] = torch.tensor([1.0, -2.0, 4.0, 8.0])
    q = quantize(w, blocksize=32)
    assert q.absmax.tolist() == [1.0, 2.0, 4.0, 8.0]


# ----------------------------------------------------------------------------- nearest level and absmax

CASES = [
    ((1,), 64),
    ((7,), 32),
    ((3, 5), 64),
    ((4, 70), 32),  # rows longer than a block
    ((4, 70), 256),  # rows shorter than a block, partial last block
    ((2, 3, 50), 128),
    ((33, 127), 64),
    ((300, 260), 4096),
    ((3 * SMALL_CHUNK + 101,), 64),  # more values than one CPU chunk (made small here), a partial last block
    ((3 * SMALL_CHUNK + 101,), 4096),
]


@pytest.mark.parametrize("shape,blocksize", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"bs{v}")
def test_every_value_gets_the_nearest_level_of_its_block(shape, blocksize, small_chunks):
    w = torch.randn(shape) * torch.rand(shape[-1]) * 3  # columns of different scales
    q = quantize(w, blocksize)
    absmax = block_absmax_f64(w, blocksize)
    assert torch.equal(q.absmax.double(), absmax)  # max |value| per block, partial last block included

    scaled = (w.reshape(-1).double().view(-1, 1) / absmax.repeat_interleave(blocksize)[: w.numel()].view(-1, 1))
    distance = (scaled - LEVELS.double()).abs()  # (n, 16), brute force in float64
    codes = unpack(q)
    chosen = distance.gather(1, codes.view(-1, 1)).squeeze(1)
    # nearest up to the float32 rounding of the scaled value (|scaled| <= 1, so a few 1e-8): a value that close
    # to a midpoint may round to either side of it
    assert (chosen <= distance.min(dim=1).values + 1e-6).all()
    assert (codes == distance.argmin(dim=1)).float().mean() > 0.999


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_is_level_times_block_absmax_rounded_once(blocksize):
    n = 3 * blocksize + blocksize // 2 + 1  # a partial last block
    w = torch.randn(n, dtype=torch.float16)
    q = quantize(w, blocksize)
    scale = q.absmax.repeat_interleave(blocksize)[:n]
    expected = (LEVELS[unpack(q)] * scale).to(torch.float16)  # float32 product, one rounding to fp16
    assert torch.equal(dequantize(q), expected)


def test_a_value_on_a_midpoint_goes_to_the_lower_level_and_one_ulp_above_to_the_upper():
    mids = (LEVELS[:-1] + LEVELS[1:]) / 2  # float32
    up = torch.nextafter(mids, torch.tensor(2.0))
    down = torch.nextafter(mids, torch.tensor(-2.0))
    w = torch.cat([torch.tensor([1.0]), mids, up, down])  # absmax 1: every value scales to itself
    codes = unpack(quantize(w, blocksize=64))[1:]
    lower = list(range(15))
    assert codes[:15].tolist() == lower
    assert codes[15:30].tolist() == [i + 1 for i in lower]
    assert codes[30:].tolist() == lower


def test_counting_midpoints_below_gives_the_codes_of_a_binary_search():
    # the fast path (15 comparisons) against the plain one (torch.bucketize), on values in and beyond [-1, 1]
    mids = (LEVELS[:-1] + LEVELS[1:]) / 2
    x = torch.cat([torch.randn(10_000), mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.nextafter(mids, torch.tensor(-2.0)), torch.tensor([-1.0, 1.0, 0.0, -0.0, 1.5, -1.5])])
    assert torch.equal(nf4._nearest_codes(x, mids.tolist()).long(), torch.bucketize(x, mids))


def test_an_all_zero_block_has_absmax_zero_and_dequantizes_to_zeros():
    w = torch.randn(64 * 4)
    w[64:128] = 0
    q = quantize(w, blocksize=64)
    assert q.absmax[1] == 0
    assert (unpack(q)[64:128] == 7).all()  # the code of level 0.0
    out = dequantize(q)
    assert (out[64:128] == 0).all() and torch.equal(out[:64], dequantize(quantize(w[:64], 64)))


def test_an_all_zero_partial_last_block_stores_the_clamp_value_and_dequantizes_to_zeros():
    w = torch.randn(64 + 10)
    w[64:] = 0
    q = quantize(w, blocksize=64)
    # like bitsandbytes, a partial last block keeps its absmax clamped at 1e-38 (a full zero block stores 0)
    assert q.absmax[1] == torch.tensor(1e-38) and (dequantize(q)[64:] == 0).all()


# ----------------------------------------------------------------------------- double quantisation

@pytest.mark.parametrize("n_blocks", [1, 255, 256, 1000])
def test_double_quant_recovers_every_absmax_within_half_a_step_of_the_8bit_map(n_blocks):
    g = torch.Generator().manual_seed(n_blocks)
    w = torch.randn(64 * n_blocks, generator=g) * torch.rand(64 * n_blocks, generator=g).exp()
    exact = quantize(w, 64).absmax.double()
    q = quantize(w, 64, double_quant=True)
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == (n_blocks,)
    assert q.absmax_scale.shape == (math.ceil(n_blocks / 256),) and q.absmax_offset.shape == ()
    # absmax - mean is scaled into [-1, 1] per group of 256 blocks and snapped to a 65536-point grid, then to
    # the nearest 8-bit code; the widest gap between codes is 0.9/64 (the top decade), so the error is at
    # most half of it plus one grid step, times the group's largest |absmax - mean|
    deviation = (exact - q.absmax_offset.double()).abs()
    group_scale = torch.nn.functional.pad(deviation, (0, -n_blocks % 256)).view(-1, 256).amax(1).repeat_interleave(256)
    bound = (0.9 / 128 + 2 / 65535) * group_scale[:n_blocks] + 1e-6 * exact  # + float32 rounding
    assert ((q.block_absmax().double() - exact).abs() <= bound).all()
    # and dequantize uses those decoded scales with the same codes
    assert torch.equal(unpack(q), unpack(quantize(w, 64)))
    assert torch.equal(dequantize(q), LEVELS[unpack(q)] * q.block_absmax().repeat_interleave(64))


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("shape,blocksize", [((7,), 32), ((33, 127), 64), ((300, 260), 256), ((2, 3, 50), 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nbytes_is_the_sum_of_the_stored_tensors(shape, blocksize, double_quant):
    n = math.prod(shape)
    blocks = math.ceil(n / blocksize)
    q = quantize(torch.randn(shape), blocksize, double_quant)
    codes = math.ceil(n / 2)  # two 4-bit codes per byte
    if double_quant:
        expected = codes + blocks + 4 * math.ceil(blocks / 256) + 4  # uint8 absmax, fp32 scales, fp32 offset
    else:
        expected = codes + 4 * blocks  # fp32 absmax
    assert q.nbytes == expected
    assert q.bits_per_param == 8 * expected / n


@pytest.mark.parametrize("double_quant,bits", [(False, 4.5), (True, 4.127)])
def test_a_4096x4096_weight_costs_the_papers_bits_per_parameter(double_quant, bits):
    # 4 + 32/64 = 4.5, and with double quantisation 4 + 8/64 + 32/(64*256) = 4.127 (QLoRA section 3); a meta
    # weight has the shapes and bytes without the values, so this costs no time
    q = quantize(torch.empty(4096, 4096, device="meta"), blocksize=64, double_quant=double_quant)
    assert round(q.bits_per_param, 3) == bits


def test_a_meta_weight_stores_the_same_bytes_as_a_real_one():
    for dq in (False, True):
        real, meta = quantize(torch.randn(33, 127), 64, dq), quantize(torch.empty(33, 127, device="meta"), 64, dq)
        assert meta.nbytes == real.nbytes and meta.packed.shape == real.packed.shape


# ----------------------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (4, 70), (2, 3, 50)])
def test_dequantize_returns_the_weights_shape_and_dtype(shape, dtype):
    w = torch.randn(shape, dtype=dtype)
    q = quantize(w, 32)
    assert q.shape == w.shape and q.dtype == dtype and q.numel == w.numel()
    out = dequantize(q)
    assert out.shape == w.shape and out.dtype == dtype
    # 4-bit levels: a value is off by at most half the widest gap between levels (0.28 at the top) x absmax
    assert ((out.float() - w.float()).abs() <= 0.15 * w.float().abs().max()).all()


def test_quantize_leaves_the_weight_untouched_and_ignores_its_gradient():
    w = torch.randn(4, 70, requires_grad=True)
    before = w.detach().clone()
    q = quantize(w, 64)
    assert torch.equal(w.detach(), before) and not q.packed.requires_grad


def test_a_non_contiguous_weight_quantizes_like_its_contiguous_copy():
    w = torch.randn(70, 4).T  # (4, 70), transposed view
    a, b = quantize(w, 32), quantize(w.contiguous(), 32)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("at", [0, SMALL_CHUNK + 5, SMALL_CHUNK + 99], ids=["first-block", "second-chunk", "partial-last-block"])
def test_nan_or_inf_anywhere_is_refused(value, at, small_chunks):
    w = torch.randn(SMALL_CHUNK + 100)  # two chunks
    w[at] = value
    with pytest.raises(ValueError, match="NaN or Inf.*Fix the weight before quantising"):
        quantize(w, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inf_is_refused(dtype):
    w = torch.randn(100, dtype=dtype)
    w[50] = float("inf")
    with pytest.raises(ValueError, match="Fix the weight before quantising"):
        quantize(w)


def test_an_empty_weight_is_refused():
    with pytest.raises(ValueError, match="cannot quantise an empty tensor"):
        quantize(torch.empty(0, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_non_float_or_float64_weights_are_refused_with_the_conversion_to_make(dtype):
    with pytest.raises(TypeError, match=r"convert first, e\.g\. weight\.float\(\)"):
        quantize(torch.ones(8, dtype=dtype))


@pytest.mark.parametrize("weight", [[1.0, 2.0], 3.0, None])
def test_a_non_tensor_is_refused(weight):
    with pytest.raises(TypeError, match="quantize takes a torch.Tensor"):
        quantize(weight)


@pytest.mark.parametrize("blocksize", [0, -64, 48, 16, 8192])
def test_an_unsupported_block_size_is_refused_with_the_valid_ones(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, .*4096\).*64 is QLoRA's choice"):
        quantize(torch.randn(100), blocksize)


@pytest.mark.parametrize("blocksize", [64.0, "64", True])
def test_a_block_size_that_is_not_an_int_is_refused(blocksize):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize(torch.randn(100), blocksize)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_chunk_size_changes_no_result(blocksize, double_quant, monkeypatch):
    w = torch.randn(5 * SMALL_CHUNK + 77, dtype=torch.bfloat16)  # five chunks and a partial block, odd count
    whole = quantize(w, blocksize, double_quant)  # one chunk (the default is larger than w)
    monkeypatch.setattr(nf4, "CHUNK", SMALL_CHUNK)
    chunked = quantize(w, blocksize, double_quant)
    for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(dequantize(chunked), dequantize(whole))
