"""NF4: 4-bit NormalFloat quantisation of a weight, block by block (Dettmers et al. 2023, "QLoRA", section 3).

Pretrained weights are roughly normal around zero. NF4 puts its 16 levels at quantiles of N(0, 1), so that each
level is used about equally often, then scales them to [-1, 1] (section 3, "4-bit NormalFloat"):

    weight  ──flatten──▶  blocks of `blocksize` values  ──÷ absmax of the block──▶  values in [-1, 1]
            ──nearest of the 16 NF4 levels──▶  a 4-bit code  ──two codes per byte──▶  `packed` (uint8)

    dequantize:  W[i] = NF4[code[i]] * absmax[block of i]

Storage is 4 bits per weight plus one fp32 absmax per block: 4 + 32/64 = 4.5 bits at blocksize 64. Double
quantisation (section 3, "Double Quantization") stores those absmax values in 8 bits too: their mean is
subtracted and they are quantised in blocks of 256 with bitsandbytes' dynamic 8-bit map, keeping one fp32 scale
per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.

Everything here is bit-exact with `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit(quant_type="nf4")`
(tests/reference/test_nf4_bnb.py): the same codebook to the last float32 bit, the same rounding, the same byte
layout (row-major over the flattened weight, first value in the high nibble, an odd count padded with the code
of 0.0), and the same 8-bit absmax codes.
"""

import numbers
from dataclasses import dataclass

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ABSMAX_BLOCKSIZE = 256  # blocks of absmax values quantised together by double quantisation

# The probability at which the largest level sits, in both halves. 16 levels from one symmetric quantile grid would
# miss an exact zero, so the grid is split: 8 positive levels and 7 negative ones, each half running from this
# probability down to 0.5. 0.9677083 equals, to 7 digits, the mean of 1 - 1/(2*16) and 1 - 1/(2*15) (929/960), the
# end points of a 16- and a 15-level grid; the authors have not said how they chose it. It is the QLoRA code's
# value, and the one that reproduces bitsandbytes' table bit for bit.
NF4_OFFSET = 0.9677083


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels, sorted, in float32: -1, 7 negative quantiles, 0, 8 positive quantiles ending at 1.

    Level values are the standard normal quantile function at evenly spaced probabilities (float32 grid, as
    in the QLoRA code), normalised by the largest so that the set spans [-1, 1]."""
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]  # 8 probabilities > 0.5: the positive levels
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]  # 7 for the negative levels
    pos = torch.special.ndtri(p_pos.double())  # normal quantile function, in float64
    neg = -torch.special.ndtri(p_neg.double())
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return levels / levels.max()  # normalised in float32, like the reference


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 2016, "8-Bit Approximations for Parallelism"): 256
    sorted values in [-1, 1]. Code k, for k = 0..6, covers [0.1, 1] * 10^(k-6) with 2^k evenly spaced
    fraction values (bin centres), for either sign; the last two codes are 0 and 1. Small magnitudes thus keep
    their relative precision, which suits absmax values that vary by orders of magnitude."""
    values = []
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2 ** k + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        values += (10.0 ** (k - 6) * centres).tolist() + (-(10.0 ** (k - 6)) * centres).tolist()  # float32
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class NF4Tensor:
    """A quantised weight. `packed` holds two 4-bit codes per byte; `absmax` one scale per block, float32, or
    uint8 codes of the dynamic map when double quantised (then `absmax_scale` holds one float32 per 256 blocks
    and `absmax_offset` the subtracted mean)."""

    packed: torch.Tensor  # uint8, (ceil(numel / 2),)
    absmax: torch.Tensor  # float32 (blocks,), or uint8 (blocks,) when double quantised
    shape: torch.Size
    dtype: torch.dtype  # what dequantize returns
    blocksize: int
    absmax_scale: torch.Tensor | None = None  # float32 (ceil(blocks / 256),)
    absmax_offset: torch.Tensor | None = None  # float32 scalar

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block, decoded from 8 bits when double quantised."""
        if not self.double_quant:
            return self.absmax
        return dequantize_8bit(self.absmax, self.absmax_scale, ABSMAX_BLOCKSIZE) + self.absmax_offset


def _check_weight(weight: torch.Tensor, blocksize: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize takes a torch.Tensor, got {type(weight).__name__}.")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4 quantises float32, float16 or bfloat16 weights, not {weight.dtype}; "
                        "convert first, e.g. weight.float().")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantise an empty tensor (shape {tuple(weight.shape)}).")
    if not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, bool):
        raise TypeError(f"blocksize must be an int, one of {BLOCKSIZES} (got {blocksize!r}).")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (got {blocksize!r}); 64 is QLoRA's choice.")


def _check_finite(absmax: torch.Tensor) -> None:
    # a NaN or Inf anywhere makes its block's absmax NaN or Inf, so checking the absmax checks every value
    if not absmax.is_meta and not torch.isfinite(absmax).all():  # meta: shapes and bytes only, no values
        raise ValueError("the weight contains NaN or Inf; NF4 scales each block by its largest |value|, so one "
                         "non-finite value would corrupt its whole block. Fix the weight before quantising.")


# The CPU works through a weight CHUNK values at a time, so that the temporaries of one chunk (a few MB of float32
# values, codes, indices) stay in cache between the passes over them. All BLOCKSIZES divide it, so chunks hold
# whole blocks. A GPU takes the whole tensor at once.
CHUNK = 2 ** 20


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of a flattened weight of n values."""
    step = CHUNK if device.type == "cpu" else n
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _blocks_and_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values scaled into [-1, 1] block by block, and each block's absmax (float32 throughout).

    Full blocks are multiplied by 1/absmax and a partial last block divided by its absmax, as bitsandbytes
    does (the two round differently); an all-zero block gets absmax 0 and scales by 1/1e-38."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)
    if full < n:
        last_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, last_max.view(1)])  # stored clamped, unlike full blocks (as bitsandbytes)
        scaled = torch.cat([scaled, flat[full:] / last_max])
    return scaled, absmax


def _nearest_codes(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """The code of the nearest level for every value: the number of the 15 midpoints between levels that lie
    below it (a value on a midpoint goes to the lower level, as in bitsandbytes). Values beyond [-1, 1] get code
    0 or 15. Fifteen vectorised comparisons of a cached chunk take about half the time of torch.bucketize's
    binary search per value, which gives the same codes."""
    codes = torch.gt(scaled, midpoints[0]).to(torch.uint8)
    for m in midpoints[1:]:
        codes += scaled > m  # in place, uint8
    return codes


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantise `weight` (any shape) to NF4 in blocks of `blocksize` consecutive values of its flattened form."""
    _check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1)  # (n,)
    n, device = flat.numel(), flat.device
    levels = nf4_codebook()
    midpoints = ((levels[:-1] + levels[1:]) / 2).tolist()  # float32 midpoints, as Python floats (exact)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    for start, stop in _chunks(n, device):
        chunk = flat[start:stop].float()  # no copy if already float32
        scaled, chunk_absmax = _blocks_and_absmax(chunk, blocksize)
        absmax[start // blocksize:start // blocksize + chunk_absmax.numel()] = chunk_absmax
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # an odd count is padded with 0.0 (code 7)
        codes = _nearest_codes(scaled, midpoints)
        # first value of each pair in the high nibble, written straight into `packed`
        torch.add(codes[1::2], codes[0::2], alpha=16, out=packed[start // 2:start // 2 + codes.numel() // 2])
    _check_finite(absmax)
    q = NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        q.absmax_offset = absmax.mean()
        q.absmax, q.absmax_scale = quantize_8bit(absmax - q.absmax_offset, ABSMAX_BLOCKSIZE)
    return q


# Nibble pairs: byte b decodes to (NF4[b >> 4], NF4[b & 15]). Each pair of float32 levels is stored as one
# 8-byte integer, so decoding is a single 1-d index_select of whole pairs (int32 indices), which runs about
# three times faster than gathering rows of a (256, 2) table; the integer view copies the bits unchanged.
def _byte_table(device: torch.device) -> torch.Tensor:
    levels = nf4_codebook().to(device)
    b = torch.arange(256, device=device)
    pairs = torch.stack([levels[b >> 4], levels[b & 15]], dim=1)  # (256, 2) float32
    return pairs.view(torch.int64).view(256)  # (256,): pair b as 8 bytes


_TABLES: dict[torch.device, torch.Tensor] = {}


def dequantize(q: NF4Tensor) -> torch.Tensor:
    """The weight back, in its original dtype and shape: NF4[code] * absmax, formed in float32 then rounded."""
    device = q.packed.device
    if device not in _TABLES:
        _TABLES[device] = _byte_table(device)
    table = _TABLES[device]
    n, bs = q.numel, q.blocksize
    absmax = q.block_absmax()
    out = torch.empty(n, dtype=q.dtype, device=device)
    for start, stop in _chunks(n, device):
        codes = q.packed[start // 2:(stop + 1) // 2]  # one byte per pair of values
        values = table.index_select(0, codes.int()).view(torch.float32)[:stop - start]  # (stop - start,) levels
        first, full = start // bs, (stop - start) // bs  # this chunk's first block, and its number of full blocks
        # multiply in float32 and round once on the way out, as the reference kernels do
        torch.mul(values[:full * bs].view(full, bs), absmax[first:first + full].unsqueeze(1),
                  out=out[start:start + full * bs].view(full, bs))
        if full * bs < stop - start:  # the partial last block
            out[start + full * bs:stop] = values[full * bs:] * absmax[-1]
    return out.view(q.shape)


# ----------------------------------------------------------------------------- 8-bit absmax (double quantisation)

def quantize_8bit(x: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation of a float32 vector with the dynamic map, as bitsandbytes' CPU kernel does
    it: each value is scaled by 1/absmax of its block, snapped to a 65536-step grid on [-1, 1], and that grid
    point is assigned its nearest code (ties to the lower one). Returns (codes uint8, absmax per block)."""
    code = dynamic_map().to(x.device)
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # zero padding never changes a block's absmax
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # an all-zero block gets code 0 throughout
    scaled = (blocks * inverse.unsqueeze(1)).clamp(-1, 1)
    grid = torch.addcmul(torch.full_like(scaled, 0.5), scaled + 1, torch.tensor(0.5 * 65535.0))  # one rounding
    step = grid.to(torch.int32)  # truncation toward zero, like the C cast
    grid_values = -1.0 + (2.0 * torch.arange(65536, device=x.device, dtype=torch.float32)) / 65535
    table = torch.bucketize(grid_values, (code[:-1] + code[1:]) * 0.5, right=False).to(torch.uint8)
    codes = torch.where((absmax > 0).unsqueeze(1), table[step], 0).view(-1)[: x.numel()]
    return codes, absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    values = dynamic_map().to(codes.device)[codes.long()]
    padded = torch.nn.functional.pad(values, (0, -values.numel() % blocksize)).view(-1, blocksize)
    return (padded * absmax.unsqueeze(1)).view(-1)[: codes.numel()]
