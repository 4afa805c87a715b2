"""GGUF block formats: llama.cpp's quantized weight layouts, encoded and decoded bit for bit.

A GGUF quantized matrix W [out, in] is stored row by row; each row is cut into blocks of `block` weights
(32, or 256 for the K-quants), and each block is `type_size` bytes. Inside a block, groups of `sub`
weights share one scale s and one offset b, both float32 numbers that llama.cpp rebuilds from the block's
fields exactly as `weight()` here does:
- 32-blocks (Q4_0, Q5_0, Q8_0; Q4_1, Q5_1 with a min): s = d, b = m, float16 d and m per block;
- K-quants: s = d * sc_j, b = -(dmin * mn_j), float16 d and dmin per 256-block, small integer sub-block
  scales sc_j and mins mn_j (4 to 8 bits) per group of 16 or 32 weights.
A weight is w = s * c for the symmetric types (signed code c in [lo, hi]) and w = s * q + b for the types
with a min (q in [0, hi]). The codes and sub-block fields sit at the bit positions each type defines; the
`Part` tables below place them, read from the layouts of llama.cpp's ggml-common.h (block_q4_0 ... block_q6_K)
and checked against the `gguf` package's dequantizers (tests/test_gguf.py).
"""

from dataclasses import dataclass

import gguf
import torch


@dataclass(frozen=True)
class Part:
    """Bits [low, low + nbits) of value j of a field are stored at bit `shift` of byte `byte` of the block."""

    byte: tuple[int, ...]
    shift: tuple[int, ...]
    nbits: tuple[int, ...]
    low: tuple[int, ...]


def part(n: int, byte, shift, nbits, low=0) -> Part:
    """A Part for values j in [0, n); each argument is a number or a function of j."""
    def at(v, j):
        return v(j) if callable(v) else v
    return Part(*(tuple(at(v, j) for j in range(n)) for v in (byte, shift, nbits, low)))


def nibbles32(offset: int) -> Part:  # 32 4-bit codes: code j in byte j % 16, low nibble first
    return part(32, lambda j: offset + j % 16, lambda j: 4 * (j // 16), 4)


def bits32(offset: int) -> Part:  # 32 1-bit values (bit 4 of a 5-bit code) in one little-endian uint32
    return part(32, lambda j: offset + j // 8, lambda j: j % 8, 1, 4)


def k_bits2(offset: int, low: int = 0) -> Part:  # 256 2-bit values: 32 bytes hold 4 runs of 32, twice
    return part(256, lambda j: offset + 32 * (j // 128) + j % 32, lambda j: 2 * (j % 128 // 32), 2, low)


def k_bits1(offset: int, low: int) -> Part:  # 256 1-bit values: bit j // 32 of byte j % 32
    return part(256, lambda j: offset + j % 32, lambda j: j // 32, 1, low)


def k_nibbles(offset: int) -> Part:  # 256 4-bit codes: 32 bytes hold 2 runs of 32, four times
    return part(256, lambda j: offset + 32 * (j // 64) + j % 32, lambda j: 4 * (j % 64 // 32), 4)


def k_scales6(offset: int, mins: bool) -> list[Part]:
    """The 6-bit scales (or mins) of Q4_K and Q5_K's 8 sub-blocks in 12 bytes: j < 4 in bits 0-5 of byte j
    (mins: byte 4 + j); j >= 4 low nibble of byte 8 + j - 4 (mins: high nibble) and the top 2 bits in bits
    6-7 of byte j - 4 (mins: byte j)."""
    base = 4 if mins else 0
    return [part(8, lambda j: offset + base + j % 4 + (8 - base if j >= 4 else 0),
                 lambda j: (4 if mins else 0) if j >= 4 else 0, lambda j: 4 if j >= 4 else 6),
            part(8, lambda j: offset + base + j % 4, 6, lambda j: 2 if j >= 4 else 0, 4)]


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # weights per block
    sub: int  # weights per group sharing a scale
    lo: int  # code range: c in [lo, hi] (lo = 0 for the types with a min)
    hi: int
    codes: tuple[Part, ...]  # where code c - lo (c for signed_codes) is stored
    d_at: int  # byte offset of the float16 d
    dmin_at: int | None = None  # float16 dmin (K-quants) or m (Q4_1, Q5_1)
    scales: tuple[Part, ...] = ()  # sub-block scales sc_j (stored + scale_offset)
    mins: tuple[Part, ...] = ()  # sub-block mins mn_j
    scale_bits: int = 0  # sub-block scales: sc in [scale_lo, 2^scale_bits - 1 + scale_lo]
    scale_offset: int = 0  # stored = sc - scale_offset (Q3_K: -32)
    signed_codes: bool = False  # Q8_0: codes stored as int8
    signed_scales: bool = False  # Q6_K: scales stored as int8

    @property
    def type_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def ggml_type(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.name]

    @property
    def affine(self) -> bool:
        return self.dmin_at is not None

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    @property
    def scale_range(self) -> tuple[int, int]:
        """The sub-block scales' range (K-quants)."""
        if self.signed_scales:
            return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1
        return self.scale_offset, 2**self.scale_bits - 1 + self.scale_offset


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q8_0", 32, 32, -128, 127, (part(32, lambda j: 2 + j, 0, 8),), d_at=0, signed_codes=True),
    BlockType("Q4_0", 32, 32, -8, 7, (nibbles32(2),), d_at=0),
    BlockType("Q4_1", 32, 32, 0, 15, (nibbles32(4),), d_at=0, dmin_at=2),
    BlockType("Q5_0", 32, 32, -16, 15, (nibbles32(6), bits32(2)), d_at=0),
    BlockType("Q5_1", 32, 32, 0, 31, (nibbles32(8), bits32(4)), d_at=0, dmin_at=2),
    BlockType("Q2_K", 256, 16, 0, 3, (k_bits2(16),), d_at=80, dmin_at=82, scale_bits=4,
              scales=(part(16, lambda j: j, 0, 4),), mins=(part(16, lambda j: j, 4, 4),)),
    BlockType("Q3_K", 256, 16, -4, 3, (k_bits2(32), k_bits1(0, 2)), d_at=108, scale_bits=6, scale_offset=-32,
              scales=(part(16, lambda j: 96 + j % 8, lambda j: 4 * (j // 8), 4),
                      part(16, lambda j: 104 + j % 4, lambda j: 2 * (j // 4), 2, 4))),
    BlockType("Q4_K", 256, 32, 0, 15, (k_nibbles(16),), d_at=0, dmin_at=2, scale_bits=6,
              scales=tuple(k_scales6(4, mins=False)), mins=tuple(k_scales6(4, mins=True))),
    BlockType("Q5_K", 256, 32, 0, 31, (k_nibbles(48), k_bits1(16, 4)), d_at=0, dmin_at=2, scale_bits=6,
              scales=tuple(k_scales6(4, mins=False)), mins=tuple(k_scales6(4, mins=True))),
    BlockType("Q6_K", 256, 16, -32, 31,
              (part(256, lambda j: 64 * (j // 128) + j % 64, lambda j: 4 * (j % 128 // 64), 4),
               part(256, lambda j: 128 + 32 * (j // 128) + j % 32, lambda j: 2 * (j % 128 // 32), 2, 4)),
              d_at=208, scale_bits=8, signed_scales=True, scales=(part(16, lambda j: 192 + j, 0, 8),)),
)}


@dataclass
class BlockGrid:
    """The per-block fields of a matrix [rows, in] in one block type (rows, nb = in / block, ns = block / sub)."""

    d: torch.Tensor  # float16 [rows, nb]
    dmin: torch.Tensor  # float16 [rows, nb]: K-quants' min scale, Q4_1/Q5_1's min; zero for the others
    sc: torch.Tensor  # int64 [rows, nb, ns]: sub-block scales (1 for the 32-blocks)
    mn: torch.Tensor  # int64 [rows, nb, ns]: sub-block mins (0 where the type has none)

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s and b [rows, groups] in float32, computed as llama.cpp computes them."""
        d, dmin = self.d.float()[..., None], self.dmin.float()[..., None]
        s, b = d * self.sc.float(), -(dmin * self.mn.float())
        if self.sc.shape[-1] == 1:  # 32-blocks: s = d, b = m
            s, b = d.expand_as(self.sc.float()), dmin
        return s.flatten(1), b.flatten(1)


def check_width(t: BlockType, in_features: int) -> None:
    if in_features % t.block:
        raise ValueError(f"{t.name} needs a width divisible by {t.block}; got {in_features}")


def weight(t: BlockType, grid: BlockGrid, codes: torch.Tensor) -> torch.Tensor:
    """The weights [rows, in] (float32) that codes [rows, in] stand for on `grid`: s * c, or s * q + b."""
    s, b = grid.scale_offset()
    s, b = s.repeat_interleave(t.sub, 1), b.repeat_interleave(t.sub, 1)
    return s * codes.float() + b if t.affine else s * codes.float()


def _put(values: torch.Tensor, parts: tuple[Part, ...], out: torch.Tensor) -> None:
    """Add the bits of values [B, n] (non-negative int64) into blocks out [B, type_size] (int64)."""
    for p in parts:
        byte, shift, nbits, low = (torch.tensor(v, dtype=torch.int64) for v in (p.byte, p.shift, p.nbits, p.low))
        bits = (values >> low) & ((1 << nbits) - 1)
        out.scatter_add_(1, byte.expand_as(values), bits << shift)


def _get(blocks: torch.Tensor, parts: tuple[Part, ...]) -> torch.Tensor:
    """The values [B, n] that `parts` place in blocks [B, type_size] (int64)."""
    value = 0
    for p in parts:
        byte, shift, nbits, low = (torch.tensor(v, dtype=torch.int64) for v in (p.byte, p.shift, p.nbits, p.low))
        value = value + (((blocks[:, byte] >> shift) & ((1 << nbits) - 1)) << low)
    return value


def _half_bytes(x: torch.Tensor) -> torch.Tensor:  # float16 [B] -> its 2 little-endian bytes [B, 2]
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2).long()


def encode(t: BlockType, grid: BlockGrid, codes: torch.Tensor) -> torch.Tensor:
    """The GGUF data uint8 [rows, in / block * type_size] of codes [rows, in] (c, or q) on `grid`."""
    rows, in_features = codes.shape
    check_width(t, in_features)
    n = rows * (in_features // t.block)
    out = torch.zeros(n, t.type_size, dtype=torch.int64)
    stored = codes.long().reshape(n, t.block) - (0 if t.signed_codes else t.lo)
    _put(stored & 0xFF if t.signed_codes else stored, t.codes, out)
    out[:, t.d_at:t.d_at + 2] = _half_bytes(grid.d.reshape(n))
    if t.dmin_at is not None:
        out[:, t.dmin_at:t.dmin_at + 2] = _half_bytes(grid.dmin.reshape(n))
    if t.scales:
        sc = grid.sc.reshape(n, -1)
        _put(sc & 0xFF if t.signed_scales else sc - t.scale_offset, t.scales, out)
    if t.mins:
        _put(grid.mn.reshape(n, -1), t.mins, out)
    return out.to(torch.uint8).reshape(rows, -1)


def decode(t: BlockType, data: torch.Tensor) -> tuple[BlockGrid, torch.Tensor]:
    """The grid and codes [rows, in] stored in GGUF data uint8 [rows, in / block * type_size]."""
    rows = data.shape[0]
    blocks = data.reshape(-1, t.type_size).long()
    n, nb = blocks.shape[0], blocks.shape[0] // rows

    def half(at: int) -> torch.Tensor:
        return blocks[:, at:at + 2].to(torch.uint8).contiguous().view(torch.float16).reshape(rows, nb)

    codes = _get(blocks, t.codes)
    codes = (codes ^ 0x80) - 0x80 if t.signed_codes else codes + t.lo
    ones = torch.ones(rows, nb, t.block // t.sub, dtype=torch.int64)
    sc = _get(blocks, t.scales) if t.scales else ones.reshape(n, -1)
    sc = (sc ^ 0x80) - 0x80 if t.signed_scales else sc + t.scale_offset
    mn = _get(blocks, t.mins) if t.mins else torch.zeros_like(ones).reshape(n, -1)
    dmin = half(t.dmin_at) if t.dmin_at is not None else torch.zeros(rows, nb, dtype=torch.float16)
    grid = BlockGrid(half(t.d_at), dmin, sc.reshape(ones.shape), mn.reshape(ones.shape))
    return grid, codes.reshape(rows, -1)


def dequantize(t: BlockType, data: torch.Tensor) -> torch.Tensor:
    """The float32 weights [rows, in] of GGUF data uint8 [rows, in / block * type_size]."""
    return weight(t, *decode(t, data))
