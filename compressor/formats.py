"""Packed storage of integer weight codes: the one layout the packer, the PyTorch reference and the
CUDA kernels share.

A quantized linear W [out, in] is stored as
- `qweight` int32 [out, ceil(in * bits / 32)]: each output row's codes q[0..in) as a little-endian
  bit stream, code j in bits [j*bits, (j+1)*bits) of the row, bit k of the stream being bit k % 32
  of word k // 32. For bits 2, 4, 8 a word holds 16, 8, 4 whole codes (code j in word j // (32/bits)
  at bit (j % (32/bits)) * bits); 3-bit codes run across word boundaries (32 codes in 3 words).
  Padding bits are zero.
- `scales` float16/bfloat16 [out, n_groups] and `zeros` uint8 [out, n_groups]: input columns
  [g*G, (g+1)*G) form group g (the last group is shorter when G does not divide `in`);
  w = (q - zero) * scale. Symmetric schemes store zero = 2^(bits-1).
"""

import math

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
FACTOR_BITS = (16, 8, 4)  # LREC factors: in the scales' dtype, or int8 / int4 codes with a float32 scale per rank


def packed_words(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 32)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] integers in [0, 2^bits) -> qweight int32 [out, ceil(in*bits/32)]."""
    check_bits(bits)
    out_features, in_features = codes.shape
    codes = codes.to(torch.int64)
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"codes out of range for {bits} bits")
    n_words = packed_words(in_features, bits)
    start = torch.arange(in_features, device=codes.device) * bits  # first bit of code j in the row stream
    word, offset = start // 32, start % 32
    words = torch.zeros(out_features, n_words + 1, dtype=torch.int64, device=codes.device)
    low = (codes << offset) & 0xFFFFFFFF                  # the part that fits in `word`
    high = codes >> (32 - offset)                          # spill-over into `word + 1` (3-bit only)
    words.scatter_add_(1, word.expand_as(codes), low)
    words.scatter_add_(1, (word + 1).expand_as(codes), torch.where(offset + bits > 32, high, 0))
    words = words[:, :n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, as int32


def unpack(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [out, words] -> codes uint8 [out, in_features]."""
    check_bits(bits)
    mask = 2**bits - 1
    if bits == 3:  # 32 codes in every 3 words: codes 0-10 lie in stream bits 0-63, codes 11-31 in bits 32-95
        words = qweight.to(torch.int64) & 0xFFFFFFFF
        words = F.pad(words, (0, -words.shape[1] % 3)).unflatten(1, (-1, 3))  # [out, triples, 3]
        low = words[..., 0] | words[..., 1] << 32  # stream bits 0-63 of each triple
        high = words[..., 1] | words[..., 2] << 32  # stream bits 32-95
        j = torch.arange(32, device=qweight.device)
        codes = torch.cat([(low[..., None] >> 3 * j[:11]) & mask, (high[..., None] >> 3 * j[11:] - 32) & mask], -1)
    else:  # whole codes per word: code j at bit (j % per_word) * bits of word j // per_word
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        codes = (qweight[:, :, None] >> shifts) & mask  # [out, words, 32 / bits]
    return codes.flatten(1)[:, :in_features].to(torch.uint8)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Group of each input column, [in] int64."""
    return torch.arange(in_features) // group_size


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] the packed tensors stand for: (q - zero) * scale, per group."""
    out_features, n_groups = scales.shape
    codes = unpack(qweight, bits, in_features).to(dtype)
    codes = F.pad(codes, (0, n_groups * group_size - in_features))  # a short last group padded to full
    w = (codes.view(out_features, n_groups, group_size) - zeros[:, :, None].to(dtype)) * scales[:, :, None].to(dtype)
    return w.flatten(1)[:, :in_features]


def bits_per_weight(out_features: int, in_features: int, bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage bits per weight of one linear, codes + scales + zero points (8 bits) included."""
    n_groups = math.ceil(in_features / group_size)
    total = out_features * (packed_words(in_features, bits) * 32 + n_groups * (scale_bits + 8))
    return total / (out_features * in_features)


def low_rank_bits(in_features: int, out_features: int, rank: int, factor_bits: int) -> int:
    """Storage bits of rank-r factors A [in, r], B [r, out]; integer factors add two float32 scales per rank,
    and int4 factors fill whole int32 words (a rank's column of A and row of B are packed separately)."""
    if factor_bits == 4:
        entries = (packed_words(in_features, 4) + packed_words(out_features, 4)) * 32
    else:
        entries = (in_features + out_features) * factor_bits
    return rank * (entries + (64 if factor_bits < 16 else 0))
