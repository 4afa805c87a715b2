"""Storing LREC factors: A [in, rank] and B [rank, out] as float16/bfloat16, or as int8 / int4 codes.

Integer factors get one float32 scale per rank component (max |.| -> the largest code, symmetric codes in
[-(2^(bits-1) - 1), 2^(bits-1) - 1]), after each rank's column of A and row of B are first given the same
max |.| ((A c) (B / c) = A B), so both codes use their range and neither scale is tiny. int4 codes + 8 are
packed as compressor/formats.py packs 4-bit weights (A^T's rows and B's rows). QuantLinear holds the result.
"""

import torch

from compressor.formats import pack
from compressor.nn import QuantLinear


def factor_codes(t: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of t with one float32 scale per slice along `dim` (max |t| -> the largest code)."""
    top = 2 ** (bits - 1) - 1
    scale = t.abs().amax(dim=dim).float() / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (1, -1) if dim == 0 else (-1, 1)
    return (t.float() / scale.view(shape)).round().clamp(-top, top).to(torch.int8), scale


def quantize_factors(a: torch.Tensor, b: torch.Tensor, bits: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and per-rank scales of A [in, r] (codes [in, r], scales [r]) and B [r, out] (codes [r, out],
    scales [r]), balanced per rank as the module docstring says."""
    peak_a, peak_b = a.abs().amax(0).float(), b.abs().amax(1).float()
    c = torch.where((peak_a > 0) & (peak_b > 0), (peak_b / peak_a.clamp_min(1e-30)).sqrt(), torch.ones_like(peak_a))
    return *factor_codes(a.float() * c, 0, bits), *factor_codes(b.float() / c[:, None], 1, bits)


def round_factors(a: torch.Tensor, b: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 factors that storing A, B as `bits`-bit codes keeps (store_factors)."""
    codes_a, scale_a, codes_b, scale_b = quantize_factors(a, b, bits)
    return codes_a.float() * scale_a[None, :], codes_b.float() * scale_b[:, None]


def store_factors(q: QuantLinear, a: torch.Tensor, b: torch.Tensor, factor_bits: int | None = None) -> None:
    """Give q the factors a [in, rank], b [rank, out], stored in `factor_bits` (16, 8 or 4; by default as q
    already stores its factors)."""
    factor_bits = factor_bits or q.factor_bits
    if factor_bits == 16:
        q.set_factors(a.to(q.scales.dtype), b.to(q.scales.dtype))
        return
    codes_a, scale_a, codes_b, scale_b = quantize_factors(a, b, factor_bits)
    if factor_bits == 4:
        codes_a, codes_b = pack(codes_a.T.int() + 8, 4), pack(codes_b.int() + 8, 4)
    q.set_factors(codes_a, codes_b, scale_a, scale_b, factor_bits)
