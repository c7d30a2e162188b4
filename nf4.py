"""NF4: the 4-bit NormalFloat data type of QLoRA, with blockwise absmax and double quantization.

Idea (Dettmers et al. 2023, "QLoRA", section 3). Pretrained weights are roughly normal with zero
mean. Cut each weight matrix into blocks of 64 values, divide each block by its largest magnitude
(its absmax c), and the values fill [-1, 1] with a shape close to N(0, 1) rescaled. A 4-bit code
that wastes nothing on such data puts its 16 levels where the normal distribution puts equal
probability mass: the NF4 code is made of quantiles of N(0, 1).

    quantize:    c_b = max_{i in b} |w_i|,     q_i = argmin_j |w_i / c_b - code_j|      (4 bits)
    dequantize:  w_i ~= code[q_i] * c_b

The code (section 3, "4-bit NormalFloat"): 8 quantiles of N(0, 1) for the positive half, 7 for
the negative half, an exact 0, all divided by the largest. The halves are unequal (8 + 7 + zero =
16) so that 0 is exactly representable: padding and zero weights must stay zero. Why quantiles:
for normal data each of the 16 levels is then hit about equally often, so each 4-bit code carries
nearly its full 4 bits of information; evenly spaced levels (int4) spend codes on rare large values
and round the crowded middle coarsely. (The paper's eq. 4 averages neighbouring quantiles; the
table that checkpoints hold, bitsandbytes' create_normal_map, takes the quantiles at evenly spaced
probabilities directly. We follow the table.) `nf4_code()` derives it with `torch.special.ndtri`,
the inverse normal CDF, and matches bitsandbytes' hard-coded values to the last bit.

Double quantization (section 3, "Double Quantization"). The fp32 constants c_b cost 32 / 64 = 0.5
bits per weight. QLoRA quantizes them again: subtract their mean, then quantize them to 8 bits in
blocks of 256 with one fp32 scale per block. The paper calls the 8-bit format "8-bit Floats"; what
bitsandbytes implements, and we with it, is the dynamic 8-bit map (Dettmers 2015, `dynamic_map`):
a sign, a decimal exponent told by the position of the first set bit, and a linear fraction. It is
a float in the sense that its levels are spaced geometrically, not an IEEE-style fp8 (e4m3 / e5m2)
with a fixed exponent field; "fp8" for this step names a format neither the paper's code nor ours uses.

    bits / weight = 4 + 32/64                    = 4.5      (single quantization)
                  = 4 + 8/64 + 32/(64 * 256)     = 4.127    (double quantization)

Storage follows bitsandbytes exactly: two codes per byte, high nibble first, packed as a
(ceil(n / 2), 1) uint8 tensor; `LinearNF4.state_dict()` uses the `Linear4bit` keys (`weight`,
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`), so 4-bit checkpoints saved by transformers load here and
ours load there. The 4-bit step reproduces bitsandbytes' CPU arithmetic bit for bit (see
`blockwise_absmax`); the 8-bit step of double quantization rounds to the nearest code, where
bitsandbytes' CPU kernel uses an approximate search (see `quantize_absmax`).

Left out: FP4 storage (used only as an error baseline here), CUDA kernels (we dequantize with
plain torch ops, which also run on CUDA), quant_storage other than uint8, paged optimizers.

Run `python nf4.py` for the code table, the bits-per-parameter arithmetic and the error of NF4
against fp16 / int8 / int4 / FP4 on the same weights (with how evenly each 4-bit code is used).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# bitsandbytes accepts these block sizes for 4-bit quantization (functional.quantize_4bit).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# The second-level block of double quantization: 256 absmax constants share one fp32 scale.
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The outermost quantile probability, 929/960 = 1 - (1/30 + 1/32) / 2 rounded to 7 digits (see
# nf4_code). bitsandbytes' table was built from this rounded literal; 929/960 itself moves the
# last bits of some levels, so we keep the literal.
NF4_OFFSET = 0.9677083
# bitsandbytes clamps an all-zero block's absmax before dividing by it.
TINY = 1e-38
# round_to_code's lookup grid: 2 * GRID bins over [-1, 1] (a power of two, so x * GRID is exact).
GRID = 2048
# The keys of one quantized weight in bitsandbytes' Linear4bit state-dict layout.
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclass
class NF4Config:
    """The demo: quantize a (rows, cols) matrix of N(0, std^2) weights and compare formats."""
    rows: int = 2048
    cols: int = 2048
    std: float = 0.02            # a typical init scale of transformer weights
    blocksize: int = 64          # QLoRA's choice for the 4-bit step
    seed: int = 0
    device: str = "auto"

    @classmethod
    def tiny(cls, **overrides: object) -> NF4Config:
        # an odd element count and a ragged last block, so the demo walks the edge cases too
        return cls(**{"rows": 48, "cols": 33, **overrides})


# ----------------------------------------------------------------------------------------------
# The NF4 code (4 bits, for weights)
# ----------------------------------------------------------------------------------------------

def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted, with an exact 0 (QLoRA section 3; bitsandbytes' table).

    Equal probability mass per level means levels at quantiles of N(0, 1). The extreme quantiles
    (p = 0 and 1) are infinite, so the outermost level sits at p = offset instead. One reading of
    929/960: with n equal-probability bins the last bin's centre is p = 1 - 1/(2n); NF4 has 15
    non-zero levels on two unequal halves (8 and 7), and bitsandbytes takes the mean of the
    n = 15 and n = 16 values, 1 - (1/30 + 1/32) / 2.
    """
    # positive half: 8 quantiles from p = offset down towards (not including) p = 0.5
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]                    # (8,)
    # negative half: 7 quantiles, mirrored
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]                    # (7,)
    # Q(p) = sqrt(2) erfinv(2p - 1), the inverse normal CDF; float32 probabilities and float64
    # quantiles, as bitsandbytes built its table (with scipy), so the values agree bit for bit
    pos = torch.special.ndtri(p_pos.double()).float()
    neg = -torch.special.ndtri(p_neg.double()).float()
    code = torch.cat([neg, torch.zeros(1), pos]).sort().values    # (16,), code[7] = 0 exactly
    # normalise into [-1, 1]: both halves start at p = offset, so the levels end at -1 and 1 exactly
    return code / code.max()


# computed once at import; quantize_nf4 stores a copy in each state
NF4_CODE = nf4_code()


# ----------------------------------------------------------------------------------------------
# Quantize and dequantize: the docstring's two equations. The steps they call come next: the 8-bit
# map, blockwise absmax, double quantization and the state that holds the constants.
# ----------------------------------------------------------------------------------------------

def quantize_nf4(w: torch.Tensor, blocksize: int = 64,
                 double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Quantize a float tensor of any shape to NF4: (packed (ceil(n / 2), 1) uint8, state).

    The packed bytes equal bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    quant_type="nf4") on CPU, for float32 / float16 / bfloat16 and any shape.
    """
    check_float(w)
    check_blocksize(blocksize)
    code = NF4_CODE.to(w.device)
    absmax, scaled = blockwise_absmax(w, blocksize)                 # (n_blocks,), (n,)
    if scaled.numel() % 2:
        # an odd count is padded with a 0.0 *before* rounding, so the spare nibble holds the code
        # of zero (7), exactly as bitsandbytes does
        scaled = F.pad(scaled, (0, 1))
    # q_i = argmin_j |w_i / c_b - code_j|
    packed = pack_nibbles(round_to_code(scaled, code))              # (ceil(n / 2), 1)
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code.clone())
    if double_quant:
        state.absmax, state.nested_absmax, state.offset = quantize_absmax(absmax)
        state.nested_code = DYNAMIC_MAP.to(w.device, copy=True)
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_nf4`: w_i ~= code[q_i] * c_b, in the original shape and dtype (or `dtype`).

    Unpacking and looking up are one step: the byte table pairs[b] = (code[b >> 4], code[b & 15])
    turns both nibbles of a byte (high nibble first) into their two values with a single lookup. Products are fp32 and rounded once to the output dtype, which
    is what bitsandbytes' kernels do, so the values agree bit for bit.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    expected = (state.numel + 1) // 2
    if packed.numel() != expected:
        raise ValueError(f"packed has {packed.numel()} bytes, the state's shape {tuple(state.shape)} needs {expected}")
    code = state.code.to(packed.device, torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)   # (256, 2)
    # each pair of fp32 values is fetched as one 8-byte word: one lookup per byte, not per nibble
    words = pairs.view(torch.int64).view(-1).index_select(0, packed.reshape(-1).int())  # (n / 2,)
    values = words.view(torch.float32)[: state.numel]                          # (n,)
    w = scale_blocks(values, state.absmax_fp32(), state.blocksize)
    return w.view(state.shape).to(dtype or state.dtype)


def bits_per_parameter(packed: torch.Tensor, state: NF4State) -> float:
    """Measured storage of one quantized tensor: codes + constants (code tables are shared)."""
    return 8 * (packed.nbytes + state.nbytes()) / state.numel


# ----------------------------------------------------------------------------------------------
# The 8-bit dynamic map (for the absmax constants) and FP4 (an error baseline only)
# ----------------------------------------------------------------------------------------------

def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015, "8-bit approximations"), 256 sorted values.

    A dynamic-tree code spends its bits on an exponent (a power of ten, 1e-6 ... 1) and a linear
    fraction in [0.1, 1]; the larger the exponent, the more fraction levels (2^i for decade i).
    Levels: +-10^(i-6) * (centres of 2^i equal bins of [0.1, 1]) for i = 0..6, plus 0 and 1.
    It is precise near zero and coarse near +-1: good for the centred absmax constants.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2                     # (2^i,)
        scale = 10 ** (i - 6)
        values += (scale * centres).tolist() + (-scale * centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)      # (256,)


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit): +-{0, 1/16, 2, 3, 4, 6, 8, 12}/12.

    Used only as an error baseline: a float code spaces its levels geometrically, which suits
    heavy tails, not the normal bulk where most weights live.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12
    return torch.cat([-magnitudes[1:], magnitudes]).sort().values  # (15,): +0 and -0 are one level


# computed once at import; quantize_nf4 stores a copy in each double-quantized state
DYNAMIC_MAP = dynamic_map()


# ----------------------------------------------------------------------------------------------
# Blockwise absmax quantization: the shared core of the 4-bit and the 8-bit step
# ----------------------------------------------------------------------------------------------

def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def check_float(w: torch.Tensor, what: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(w.shape)}); there is nothing to quantize")


def blockwise_absmax(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten w, cut it into blocks, scale each block into [-1, 1] by its absmax.

    Returns absmax (n_blocks,) fp32 and scaled (n,) fp32. The arithmetic follows bitsandbytes'
    CPU code (backends/default/ops.py, quantize_4bit) so that the 4-bit codes agree bit for bit:
    full blocks are multiplied by 1 / c (one division per block), the ragged last block is divided
    by its c; a block of zeros divides by 1e-38 instead of 0, and the clamp catches x / c landing a
    hair above 1 after rounding.
    """
    flat = w.reshape(-1).float()                                   # (n,)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)                       # (n_full, blocksize)
    # c_b = max_i |w_i| over block b
    absmax = blocks.abs().amax(dim=1)                              # (n_full,)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        # bitsandbytes stores the clamped absmax for the ragged block only (an all-zero last block
        # keeps 1e-38); we copy that so the stored constants match too
        tail_max = tail.abs().amax().clamp(min=TINY)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp(-1, 1)])
    if not torch.isfinite(absmax).all():                           # amax propagates NaN
        raise ValueError("the tensor to quantize contains NaN or inf")
    return absmax, scaled


def nearest_level(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted code for x in [-1, 1], as uint8 (ties: lower level).

    The decision boundaries are the midpoints m_j between neighbouring levels, and the index is
    the number of midpoints below x:  q = #{j : m_j < x}. This is the rule as written;
    round_to_code below computes the same indices faster (a test compares them)."""
    midpoints = (code[:-1] + code[1:]) / 2                          # (levels - 1,)
    # torch.bucketize(x, m) = #{j : m_j < x} by binary search (right=False: a tie goes below)
    return torch.bucketize(x, midpoints, out_int32=True).to(torch.uint8)


def round_to_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """nearest_level(x, code), computed by a lookup table: for speed only, same indices.

    bucketize's binary search costs most of the quantization time. A lookup table does it in two
    reads: cut [-1, 1] into 4096 bins with a monotone
    g(x) = trunc(2048 x + 2048); every midpoint in a lower bin than x is below x, every midpoint
    in a higher bin is above it, and at most one midpoint shares x's bin, which one comparison
    settles. Multiplying by 2048 is exact, so x and the midpoints fall in their bins consistently.
    A code with levels closer than a bin (the 8-bit dynamic map) falls back to nearest_level.
    """
    tables = rounding_tables(tuple(code.tolist()), str(x.device))
    if tables is None:
        return nearest_level(x, code)
    below, threshold = tables
    b = grid_bin(x)                                                 # (n,)
    # q = #{midpoints in lower bins} + [x > the midpoint in its own bin]
    return below.index_select(0, b).add_(x > threshold.index_select(0, b))


@functools.lru_cache(maxsize=16)
def rounding_tables(levels: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """round_to_code's two tables over the 4097 bins, or None if two midpoints share a bin."""
    code = torch.tensor(levels, dtype=torch.float32, device=device)
    midpoints = (code[:-1] + code[1:]) / 2                         # (levels - 1,)
    bins = grid_bin(midpoints)
    if bins.unique().numel() < bins.numel():
        return None
    all_bins = torch.arange(2 * GRID + 1, dtype=torch.int32, device=device)
    below = torch.searchsorted(bins, all_bins).to(torch.uint8)     # (4097,) midpoints in lower bins
    threshold = torch.full((2 * GRID + 1,), float("inf"), device=device)
    threshold[bins.long()] = midpoints                               # (4097,) the midpoint in each bin
    return below, threshold


def grid_bin(x: torch.Tensor) -> torch.Tensor:
    """g(x) = trunc(2048 x + 2048): bin 0..4096 of x in [-1, 1], monotone in x, as int32."""
    return x.mul(GRID).add_(GRID).to(torch.int32)


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """w_i = code[q_i] * c_b, in place on `values` (n,), blockwise with a ragged last block."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15 -> (n / 2, 1) uint8, the first of each pair in the high nibble."""
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Double quantization of the absmax constants
# ----------------------------------------------------------------------------------------------

def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c (n_blocks,) fp32 -> (8-bit codes (n_blocks,) uint8, scales (n_blocks / 256,) fp32, mean).

    The constants are all positive, so a signed code would waste half its levels: subtract the
    mean first (QLoRA section 3), then quantize blockwise exactly like the 4-bit step, with the
    dynamic map and blocks of 256.

    Rounding: we take the nearest level of the map, found from the midpoints of the sorted map.
    bitsandbytes' CPU kernel (cquantize_blockwise_cpu_fp32) narrows the search approximately and
    picks a neighbouring level for about 0.2% of the constants, so the 8-bit codes are not
    bit-for-bit equal; the mean and the 256-block scales are, and nearest rounding puts every
    reconstructed constant at least as close to the true one as bitsandbytes' (tests check both).
    """
    offset = absmax.mean()
    code8 = DYNAMIC_MAP.to(absmax.device)
    scales, scaled = blockwise_absmax(absmax - offset, NESTED_BLOCKSIZE)
    # bitsandbytes' kernel stores a block of equal constants (all at the mean) with scale 0 where
    # its 4-bit path stores 1e-38; either way map[q] * s + mean gives back the mean exactly
    scales = scales.masked_fill(scales == TINY, 0.0)
    return round_to_code(scaled, code8), scales, offset


def dequantize_absmax(q8: torch.Tensor, scales: torch.Tensor, code8: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
    """c_b ~= map[q8_b] * s_{b // 256} + mean, in fp32, as bitsandbytes' gemm_4bit computes it."""
    absmax = scale_blocks(code8[q8.long()], scales, NESTED_BLOCKSIZE)
    return absmax + offset


# ----------------------------------------------------------------------------------------------
# The quantization state: everything dequantize_nf4 needs besides the packed codes
# ----------------------------------------------------------------------------------------------

@dataclass
class NF4State:
    """Everything needed to undo `quantize_nf4`, named like bitsandbytes' QuantState.

    absmax is the fp32 constants c_b (n_blocks,), or their uint8 codes under double quantization,
    in which case nested_absmax (the 256-block scales), nested_code (the dynamic map) and offset
    (the mean that was subtracted) are set.
    """
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block constants c_b in fp32 (reconstructed when double-quantized)."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def to(self, device: torch.device | str) -> NF4State:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
                        move(self.offset), move(self.nested_absmax), move(self.nested_code))

    def nbytes(self) -> int:
        """Bytes of the constants (not the 4-bit codes, not the shared code tables)."""
        extra = 0 if not self.double_quant else self.nested_absmax.nbytes + self.offset.nbytes
        return self.absmax.nbytes + extra

    # -- bitsandbytes' serialized layout (functional.QuantState.as_dict(packed=True)) ----------
    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed as in Linear4bit's state dict, without the leading 'weight.'."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code.clone()  # distinct storage for safetensors
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.offset.item())
        # the non-tensor fields travel as the UTF-8 bytes of a JSON object, in a uint8 tensor
        blob = json.dumps(meta).encode("utf-8")
        out[QUANT_STATE_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor]) -> "NF4State":
        """Inverse of `to_state_dict`; raises KeyError naming any missing tensor."""
        if QUANT_STATE_KEY not in tensors:
            other = [k for k in tensors if k.startswith("quant_state.")]
            raise KeyError(f"expected '{QUANT_STATE_KEY}' (NF4), found {other or 'none'}; "
                           "only NF4 4-bit weights are supported")
        meta = json.loads(bytes(tensors[QUANT_STATE_KEY].cpu().tolist()).decode("utf-8"))
        nested = "nested_offset" in meta
        need = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if nested else [])
        missing = [k for k in need if k not in tensors]
        if missing:
            raise KeyError(f"4-bit state is missing {missing}")
        check_blocksize(meta["blocksize"])
        if nested and meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {meta.get('nested_blocksize')}")
        absmax = tensors["absmax"]
        return cls(absmax=absmax, shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                   blocksize=meta["blocksize"], code=tensors["quant_map"].float(),
                   offset=torch.tensor(float(meta["nested_offset"]), device=absmax.device) if nested else None,
                   nested_absmax=tensors["nested_absmax"] if nested else None,
                   nested_code=tensors["nested_quant_map"] if nested else None)


# ----------------------------------------------------------------------------------------------
# LinearNF4: a frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------------

class NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W held in 4 bits; backward dequantizes W again instead of keeping it.

    A plain F.linear on a dequantized W would make autograd keep the full-precision W of every
    layer alive until the backward pass, which is the memory QLoRA is meant to save. Here only
    the packed bytes are saved, and W is rebuilt for grad_x = grad_y W (W itself is frozen).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None, state: NF4State) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, dequantize_nf4(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dL/dx = dL/dy W
            grad_x = grad_y @ dequantize_nf4(packed, ctx.state, grad_y.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class LinearNF4(nn.Module):
    """A linear layer whose weight is stored in NF4 and dequantized on the fly.

    `weight` is the packed uint8 buffer and `quant_state` its NF4State; the state dict uses
    bitsandbytes' Linear4bit keys. compute_dtype=None computes in the input's dtype (as
    bitsandbytes does for fp32 / bf16 inputs).
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"LinearNF4 needs a 2-D (out, in) weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        # not persistent: _save_to_state_dict writes it with its quant-state keys
        self.register_buffer("weight", packed, persistent=False)
        self.quant_state = state
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "LinearNF4":
        packed, state = quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(packed, state, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "LinearNF4":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in full precision (its original dtype unless `dtype` is given)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return NF4Matmul.apply(x.to(dtype), self.weight, bias, self.quant_state).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={s.blocksize}, double_quant={s.double_quant}")

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the packed bytes (a buffer) and the bias; the state tensors
        # follow the bytes' device. Float casts (model.half()) must not touch the fp32 constants.
        super()._apply(fn, recurse)
        self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        for key, value in self.quant_state.to_state_dict().items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ours = {k[len(prefix):]: v for k, v in state_dict.items()
                if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        rest = {k: v for k, v in state_dict.items() if k[len(prefix):] not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._load_weight(ours, prefix, missing_keys, unexpected_keys, error_msgs)

    def _load_weight(self, ours, prefix, missing_keys, unexpected_keys, error_msgs):
        if "weight" not in ours:
            missing_keys.append(prefix + "weight")
        quant = {k.removeprefix("weight."): v for k, v in ours.items() if k != "weight"}
        try:
            state = NF4State.from_state_dict(quant)
        except KeyError as e:
            names = [prefix + "weight." + k for k in ("absmax", "quant_map", QUANT_STATE_KEY) if k not in quant]
            missing_keys.extend(names or [f"{prefix}weight.* ({e.args[0]})"])
            return
        known = {"absmax", "quant_map", QUANT_STATE_KEY} | ({"nested_absmax", "nested_quant_map"} if state.double_quant else set())
        unexpected_keys.extend(prefix + "weight." + k for k in quant if k not in known)
        if tuple(state.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: the checkpoint holds a 4-bit weight of "
                              f"shape {tuple(state.shape)}, the layer is ({self.out_features}, {self.in_features})")
            return
        if "weight" in ours:
            device = self.weight.device
            self.weight = ours["weight"].to(device).view(torch.uint8).reshape(-1, 1)
            self.quant_state = state.to(device)


def skipped(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    """A module is skipped when a pattern is its name, a suffix ('lm_head') or a parent ('vision')."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize_model(model: nn.Module, skip: tuple[str, ...] | list[str] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   weights: Mapping | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a LinearNF4, except those in `skip`.

    With `weights` (a mapping from state-dict names to tensors, e.g. `SafetensorsWeights`), the
    layers take their values from it instead of from the model, one layer at a time, and every
    other parameter is filled from it too: build the model with `init_empty_weights()` and the
    full-precision model never exists in memory. Missing or unexpected names raise a KeyError.
    """
    check_blocksize(blocksize)
    used = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or skipped(name, skip):
            continue
        weight, bias = module.weight, module.bias
        if weights is not None:
            weight = take(weights, f"{name}.weight", used)
            bias = None if bias is None else take(weights, f"{name}.bias", used)
        model.set_submodule(name, LinearNF4.from_weight(weight, bias, blocksize, double_quant, compute_dtype))
    if weights is not None:
        load_weights(model, weights, used)
    return model


# ----------------------------------------------------------------------------------------------
# Comparing 4-bit codes: the same blockwise absmax with any code, and how evenly it uses its levels
# ----------------------------------------------------------------------------------------------

def fake_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize with any sorted code in [-1, 1] and blockwise absmax: (w_hat fp32, q)."""
    absmax, scaled = blockwise_absmax(w, blocksize)
    q = round_to_code(scaled, code.to(w.device))                   # (n,) level indices
    values = code.to(w.device)[q.long()]
    return scale_blocks(values, absmax, blocksize).view(w.shape), q


def code_entropy(q: torch.Tensor, levels: int) -> float:
    """H = -sum_j p_j log2 p_j of how often each level is used; log2(levels) if all equally."""
    p = torch.bincount(q.long(), minlength=levels).float() / q.numel()
    p = p[p > 0]
    return -(p * p.log2()).sum().item()


def format_errors(w: torch.Tensor, blocksize: int = 64) -> list[tuple[str, float, torch.Tensor, float | None]]:
    """(name, bits per weight, reconstruction, entropy of the 4-bit codes) for each format."""
    int8 = torch.arange(-127, 128, dtype=torch.float32) / 127      # absmax int8: 255 linear levels
    # absmax int4 as usually written: 15 evenly spaced levels k/7, k = -7..7, with an exact 0 (the
    # 16th code is unused, so it holds log2(15) = 3.91 bits at most)
    int4 = torch.arange(-7, 8, dtype=torch.float32) / 7
    # all 16 codes, evenly spaced and symmetric: (2k + 1)/15, k = -8..7, i.e. +-1/15 ... +-1, no 0
    int4_16 = (2 * torch.arange(-8, 8, dtype=torch.float32) + 1) / 15
    const = 32 / blocksize                                          # one fp32 absmax per block
    rows = [("fp16", 16.0, w.half().float(), None),
            (f"int8 absmax, block {blocksize}", 8 + const, fake_quantize(w, int8, blocksize)[0], None)]
    for name, code in ((f"int4 absmax (15 levels), block {blocksize}", int4),
                       (f"int4 symmetric (16 levels), block {blocksize}", int4_16),
                       (f"FP4 (e2m1), block {blocksize}", fp4_code())):
        approx, q = fake_quantize(w, code, blocksize)
        rows.append((name, 4 + const, approx, code_entropy(q, len(code))))
    entropy = code_entropy(fake_quantize(w, NF4_CODE, blocksize)[1], 16)
    for name, double in ((f"NF4, block {blocksize}", False), ("NF4 + double quant", True)):
        packed, state = quantize_nf4(w, blocksize, double_quant=double)
        rows.append((name, bits_per_parameter(packed, state), dequantize_nf4(packed, state, torch.float32), entropy))
    return rows


# ==============================================================================================
# Plumbing: loading weights layer by layer, transformers' file format, the demo's CLI.
# A reader learning NF4 can stop here.
# ==============================================================================================

def take(weights: Mapping, key: str, used: set) -> torch.Tensor:
    if key not in weights:
        raise KeyError(f"the weights have no tensor '{key}' for the model")
    used.add(key)
    return weights[key]


def load_weights(model: nn.Module, weights: Mapping, used: set | None = None) -> nn.Module:
    """Assign every parameter and persistent buffer from `weights` (skipping LinearNF4 layers
    already built), strictly: a missing, unexpected or misshapen tensor raises an error. Tied
    parameters (lm_head sharing the embedding) stay tied and need only one of their names."""
    used = set() if used is None else used
    loaded = {}                                                      # id(old tensor) -> its new value
    for module_name, module in model.named_modules():
        if isinstance(module, LinearNF4):
            continue
        prefix = module_name + "." if module_name else ""
        persistent = [k for k in module._buffers if k not in module._non_persistent_buffers_set]
        for attr in list(module._parameters) + persistent:
            old = getattr(module, attr)
            if old is None:
                continue
            if id(old) in loaded:                                    # tied to one loaded already
                used.update({prefix + attr} & set(weights.keys()))
            else:
                loaded[id(old)] = load_one(weights, prefix + attr, old, used)
            target = module._parameters if attr in module._parameters else module._buffers
            target[attr] = loaded[id(old)]
    unexpected = sorted(set(weights.keys()) - used)
    if unexpected:
        raise KeyError(f"the weights hold tensors the model does not use: {unexpected[:10]}"
                       f"{' ...' if len(unexpected) > 10 else ''}")
    return model


def load_one(weights: Mapping, key: str, old: torch.Tensor, used: set) -> torch.Tensor:
    """weights[key] in old's dtype, checked against old's shape; a Parameter if old was one."""
    value = take(weights, key, used).to(old.dtype)
    if value.shape != old.shape:
        raise ValueError(f"'{key}': the weights hold shape {tuple(value.shape)}, the model {tuple(old.shape)}")
    return nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value


@contextmanager
def init_empty_weights() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory); buffers stay real.

    The same trick as accelerate.init_empty_weights: parameters are moved to 'meta' as they are
    registered, while buffers computed at construction (rotary inv_freq) keep their values. Use it
    with quantize_model(..., weights=...) to load a checkpoint straight into NF4.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:                 # a meta one is kept as is: ties hold
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class SafetensorsWeights(Mapping):
    """A lazy mapping over a safetensors checkpoint: each tensor is read only when asked for.

    `path` is a .safetensors file or a folder with model.safetensors or a sharded
    model.safetensors.index.json, as transformers saves them. The format is simple: 8 bytes of
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes. We read
    each tensor with a plain file read rather than a memory map, so that the process holds only
    the tensors it keeps (a memory-mapped file counts in the RSS as its pages are touched): the
    safetensors package maps the file. Every floating tensor read is checked to be finite.
    """
    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, path: str):
        self._index = {}                                             # name -> (file, dtype, shape, start, end)
        for file in self._files(path):
            length, header = self._header(file)
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self._index[name] = (file, info["dtype"], info["shape"], 8 + length + start, 8 + length + end)

    @staticmethod
    def _header(file: str) -> tuple[int, dict]:
        """(header length, header) of one file; anything unreadable is a CheckpointError naming it."""
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(length)) if 0 < length < 100_000_000 else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file} is not a readable safetensors file (no JSON header in its first "
                                  f"{8 + max(length, 0)} bytes); truncated or corrupt?")
        return length, header

    @staticmethod
    def _files(path: str) -> list[str]:
        if os.path.isfile(path):
            return [path]
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return [single]
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")

    def __getitem__(self, key: str) -> torch.Tensor:
        file, dtype, shape, start, end = self._index[key]
        if dtype not in self.DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, which is not supported here")
        buffer = bytearray(end - start)
        with open(file, "rb") as fh:
            fh.seek(start)
            read = fh.readinto(buffer)
        if read != end - start:
            raise CheckpointError(f"{file}: tensor {key!r} is truncated ({read} of {end - start} bytes); "
                                  "the file is incomplete or corrupt")
        if not buffer:
            return torch.empty(shape, dtype=self.DTYPES[dtype])
        tensor = torch.frombuffer(buffer, dtype=self.DTYPES[dtype]).reshape(shape)
        return check_finite({key: tensor}, file)[key]               # NaN / inf: an error naming file and tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


# ----------------------------------------------------------------------------------------------
# transformers interop: the quantization_config that marks a checkpoint as bitsandbytes 4-bit
# ----------------------------------------------------------------------------------------------

def bnb_quantization_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                            skip: tuple[str, ...] | list[str] = ("lm_head",)) -> dict:
    """The `quantization_config` entry of config.json for an NF4 checkpoint (BitsAndBytesConfig)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(skip),
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def save_quantized(model: nn.Module, out_dir: str, config: dict | None = None,
                   skip: tuple[str, ...] | list[str] = ("lm_head",)) -> str:
    """Write a quantize_model()-ed model as transformers does: model.safetensors + config.json.

    `config` is the model's config as a dict (by default model.config.to_dict(), for a
    transformers model); the quantization_config is added from the first LinearNF4, and `skip`
    must name the layers quantize_model skipped. Files are written atomically.
    """
    from safetensors.torch import save_file

    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not layers:
        raise ValueError("the model has no LinearNF4 layer: call quantize_model(model) first")
    if config is None:
        if not hasattr(model, "config"):
            raise ValueError("pass config=: the model has no .config to describe it in config.json")
        config = model.config.to_dict()
    state = layers[0].quant_state
    config = {**config, "quantization_config": bnb_quantization_config(
        state.double_quant, layers[0].compute_dtype or torch.float32, skip)}
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, default=str)
    atomic_write(os.path.join(out_dir, "config.json"), lambda tmp: Path(tmp).write_text(text))
    return out_dir


# ----------------------------------------------------------------------------------------------
# Safe files: clip.py's canonical text, copied byte for byte (nf4.py may not import clip.py; the
# README's import graph), and tests/test_plumbing.py fails if a copy drifts
# ----------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A file or folder that is not a loadable checkpoint; the message names it and says what is wrong."""


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Refuse NaN or infinite weights: what a corrupt file or a diverged run leaves behind."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                              f"{bad[:4]}{' ...' if len(bad) > 4 else ''}; the file is corrupt or comes "
                              "from a run that diverged")
    return tensors


def fsync_path(path: str | Path) -> None:
    """Ask the OS to put a file, or a folder's list of names, on disk now. A rename survives a power cut
    only once its folder is synced; Windows cannot open a folder for this, and needs it less."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """write(tmp_path), fsync, then rename over `path`: a crash leaves the old file or the new, never half.
    The temporary name is unique (mkstemp) and removed if write fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# The demo: the code table, bits per parameter, and the error of each format on the same weights
# ----------------------------------------------------------------------------------------------

def print_code_table() -> None:
    ours = nf4_code()
    try:
        from bitsandbytes.functional import get_4bit_type
        theirs = get_4bit_type("nf4", device="cpu").tolist()
    except ImportError:
        theirs = [float("nan")] * 16
    print("| index | bits | derived (ndtri) | bitsandbytes table | equal |")
    print("|---:|:---:|---:|---:|:---:|")
    for i, (a, b) in enumerate(zip(ours.tolist(), theirs)):
        print(f"| {i} | {i:04b} | {a:+.10f} | {b:+.10f} | {'yes' if a == b else 'NO'} |")


def print_bits_arithmetic(blocksize: int) -> None:
    single = 4 + 32 / blocksize
    double = 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    print(f"single quantization: 4 + 32/{blocksize} = {single:.3f} bits per weight")
    print(f"double quantization: 4 + 8/{blocksize} + 32/({blocksize}*{NESTED_BLOCKSIZE}) = {double:.4f} bits per weight"
          f"  (saves {single - double:.3f} bits = {(single - double) / 8 * 1e9 / 2**20:.0f} MiB per 1e9 weights)")


def run_demo(cfg: NF4Config) -> dict:
    device = resolve_device(cfg.device)
    check_blocksize(cfg.blocksize)
    print("## The NF4 code: quantiles of N(0, 1), derived beside bitsandbytes' hard-coded table\n")
    print_code_table()
    print("\n## Bits per weight\n")
    print_bits_arithmetic(cfg.blocksize)
    g = torch.Generator().manual_seed(cfg.seed)
    w = (torch.randn(cfg.rows, cfg.cols, generator=g) * cfg.std).to(device)
    print(f"\n## Error on a ({cfg.rows}, {cfg.cols}) matrix of N(0, {cfg.std}^2) weights on {device}\n")
    print("| format | bits / weight | mean abs error | RMSE | max abs error | RMSE / NF4's | level usage entropy (bits) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = format_errors(w, cfg.blocksize)
    nf4_rmse = next((approx - w).pow(2).mean().sqrt().item() for name, _, approx, _ in rows if name.startswith("NF4,"))
    results = {}
    for name, bits, approx, entropy in rows:
        err = (approx - w).abs()
        rmse = err.pow(2).mean().sqrt().item()
        results[name] = {"bits": bits, "mae": err.mean().item(), "rmse": rmse, "max": err.max().item(),
                         "entropy": entropy}
        print(f"| {name} | {bits:.3f} | {err.mean().item():.3e} | {rmse:.3e} | {err.max().item():.3e} | "
              f"{rmse / nf4_rmse:.3f} | {'-' if entropy is None else f'{entropy:.3f}'} |")
    print("\nA 4-bit code carries at most 4 bits when all 16 levels are used equally often; NF4's levels sit at "
          "equal-probability quantiles of the normal, so normal weights use them most evenly and the typical "
          "error (RMSE) is smallest. The price is the worst case: NF4's outer levels are far apart (0.72 to 1.0), "
          "so a weight near a block's absmax can be rounded further than on an evenly spaced grid.")
    return results


def pick_device(name: str) -> str:
    """--device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; a CUDA device that is not
    there is a ValueError that says so. Returns the name, e.g. "cuda:0"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if ":" in name else 0
        if index >= count:
            raise ValueError(f"--device {name} was asked for, but torch sees "
                             f"{'no CUDA GPU' if count == 0 else f'{count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})'}")
        return name
    raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> torch.device:
    return torch.device(pick_device(device))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="nf4.py", description="NF4: derive the code, count the bits, compare the error.",
        epilog="No --train, --resume or --out: nf4.py trains nothing and writes no file; the demo prints its tables.")
    # the shared flags, in clip.py's words (tests/test_plumbing.py checks every file's --help says the same)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (seconds): tests and quick checks")
    parser.add_argument("--rows", type=int, default=None, help="rows of the demo weight matrix")
    parser.add_argument("--cols", type=int, default=None, help="columns of the demo weight matrix")
    parser.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="4-bit block size")
    args = parser.parse_args(argv)
    cfg = NF4Config.tiny() if args.tiny else NF4Config()
    overrides = {k: v for k, v in dict(rows=args.rows, cols=args.cols).items() if v is not None}
    cfg = NF4Config(**{**cfg.__dict__, **overrides, "blocksize": args.blocksize, "seed": args.seed,
                       "device": args.device})
    try:
        if min(cfg.rows, cfg.cols) <= 0:
            raise ValueError(f"--rows and --cols must be positive, got {cfg.rows} x {cfg.cols}")
        return run_demo(cfg)
    except (ValueError, TypeError, KeyError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
