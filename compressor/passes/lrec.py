"""LREC: low-rank factors that correct a quantized linear's error, y = x Wq^T + (x A) B.

With E = W - Wq [out, in], the factors are the truncated SVD of E^T in the basis whitened by the
calibration inputs (EoRA / QERA; see compressor/passes/svd.py), which minimises the linear's output
error ||X (E^T - A B)||_F. `whiten: false` takes the plain SVD of E^T instead (ZeroQuant-V2's LoRC).
The quantized weights stay as they are; the factors are stored in float16 (or bfloat16, as the scales) and
counted in bits per weight. `factor_bits: 8` stores them as int8 codes with a float32 scale per rank
instead, so the same bits buy about twice the rank; `factor_bits: 4` as int4 codes, four times. Integer
factors are fitted to what storing keeps (fit_integer_factors): A rounded GPTQ-style (each rounding error
made up for by the entries not yet rounded), B refitted to the rounded A, then rounded the same way.
The rank comes from exactly one of `rank` (the same for every targeted linear) or `extra_bits` (a budget:
the factors add at most this many bits per weight to each linear, rank = floor(extra_bits * in * out /
(16 * (in + out))) for float16 factors, so wide MLP linears get higher ranks than narrow k/v
projections). For ranks that differ by module, use several lrec passes with different `targets`.
`alternate: N` then repeats N times what LoftQ does for LoRA: re-quantize W - A B with the same
quantizer (GPTQ with its Hessian, or RTN) and refit the factors to the new error, keeping the round
with the least output error (a round can do worse: GPTQ is not the exact minimiser). The low-rank part
takes the structure that the 2-bit grid handles worst, so the grid is spent on the rest.
As in GPTQ, the first token of each calibration window can count `sink_weight` times in the Hessian.
What these choices measured: docs/design-decisions.md ("LREC: whitened SVD, integer factors").
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressor.errors import CompressorError
from compressor.formats import FACTOR_BITS, low_rank_bits
from compressor.nn import QuantLinear
from compressor.passes.base import LayerState, ParamError, Pass, check_sink_weight
from compressor.passes.factors import round_factors, store_factors
from compressor.passes.hessian import check_damp, inverse_hessian_cholesky, output_error
from compressor.passes.svd import split_factors, whitened_svd, whitening
from compressor.passes.sweep import Ahead, sweep_columns

DEFAULT_RANK = 32


def rank_bits(in_features: int, out_features: int, factor_bits: int = 16) -> float:
    """Bits per weight of one rank of factors: a column of A [in] and a row of B [out]."""
    return low_rank_bits(in_features, out_features, 1, factor_bits) / (in_features * out_features)


class FactorRounding:
    """LREC's column rule: round each column to the grid scale * {-top, ..., top} (scale [rows, n])."""

    def __init__(self, scale: torch.Tensor, top: int):
        self.scale, self.top = scale, top

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def column(self, index: int, ahead: Ahead) -> torch.Tensor:
        scale = self.scale[:, index]
        return (ahead.columns(1)[:, 0] / scale).round().clamp(-self.top, self.top) * scale


def round_with_feedback(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """w [rows, n] rounded to the grid scale * {-top, ..., top} (scale broadcasts to [rows, n]) column by
    column, each column's rounding error spread over the columns not yet rounded through hinv [n, n], the
    inverse_hessian_cholesky of a Hessian H, as GPTQ does (sweep_columns): minimises sum over rows of
    (w - w') H (w - w')^T better than rounding alone."""
    W = w.clone().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).expand_as(W).float()
    return sweep_columns(W, hinv, FactorRounding(scale, top), block_size=128)


def fit_integer_factors(a: torch.Tensor, b: torch.Tensor, error: torch.Tensor, hessian: torch.Tensor | None,
                        bits: int, damp: float = 0.01, hinv: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A [in, r], B [r, out] from the SVD, fitted to `bits`-bit codes with a scale per rank (as
    store_factors stores them) for the output error ||X (error^T - A B)||^2 (H = X^T X [in, in];
    None: plain Frobenius, rounding only):
    1. A rounded with feedback in H. B = Sigma^1/2 Q^T has orthogonal rows, so the error that rounding
       A's column k adds is sigma_k da_k^T H da_k, a GPTQ problem per rank.
    2. B refitted to the rounded A' by least squares: B* = (A'^T H A')^-1 A'^T H error^T.
    3. B* rounded with feedback in G = A'^T H A' [r, r]: the error left is tr((B* - B')^T G (B* - B')).
    Returns float32 factors on the grids, which storing keeps (up to a rank whose codes no longer reach
    the grid's end, which storing then rounds again on a finer grid). `hinv`: H's inverse_hessian_cholesky
    when already computed (the same H for every round of `alternate`)."""
    top = 2 ** (bits - 1) - 1
    if hessian is not None:
        hinv = inverse_hessian_cholesky(hessian.float(), damp) if hinv is None else hinv
        a = round_with_feedback(a.T, hinv, a.abs().amax(0)[:, None] / top, top).T
    a, _ = round_factors(a, b, bits)  # as storing keeps it
    ha = a.double() if hessian is None else hessian.double() @ a.double()  # [in, r]
    gram = a.double().T @ ha  # [r, r]
    ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    b = torch.linalg.solve(gram + ridge, ha.T @ error.T.double()).float()  # [r, out]
    if hessian is not None:
        gram_inv = inverse_hessian_cholesky(gram.float(), damp)
        b = round_with_feedback(b.T, gram_inv, b.abs().amax(1)[None, :] / top, top).T
    return a, b


@dataclass
class LREC(Pass):
    """Error-correcting low-rank factors for linears quantized by an earlier pass (rtn, gptq)."""

    name: ClassVar[str] = "lrec"
    stats: ClassVar[str | None] = "hessian"
    accepts: ClassVar[tuple[str, ...]] = ("quantized",)
    produces: ClassVar[str] = "quantized"

    rank: int | None = None  # DEFAULT_RANK when extra_bits is not given either
    extra_bits: float | None = None
    whiten: bool = True
    factor_bits: int = 16  # 16: the scales' dtype; 8 or 4: int8 or int4 codes and a float32 scale per rank
    alternate: int = 0  # rounds of re-quantizing W - A B and refitting A, B (LoftQ)
    damp: float = 0.01
    sink_weight: float = 1.0  # as GPTQ's: the first token of each window counts this many times

    def validate(self) -> None:
        if self.rank is not None and self.extra_bits is not None:
            raise ParamError("rank", "give rank or extra_bits, not both")
        if self.rank is not None and self.rank <= 0:
            raise ParamError("rank", f"got {self.rank}; use a positive integer such as 16 or 32")
        if self.extra_bits is not None and not self.extra_bits > 0:
            raise ParamError("extra_bits", f"got {self.extra_bits}; use a positive number of bits per "
                                           "weight, e.g. 1.0 (W2 g64 + 1.0 costs as many bits as W3 g64)")
        if self.alternate < 0:
            raise ParamError("alternate", f"got {self.alternate}; use 0 (no re-quantization) or a few rounds, e.g. 4")
        if self.factor_bits not in FACTOR_BITS:
            raise ParamError("factor_bits", f"got {self.factor_bits}; use 16 (float16/bfloat16 factors), 8 "
                                            "(int8 factors, about twice the rank for the same bits) or 4 (int4)")
        check_damp(self.damp)
        check_sink_weight(self.sink_weight)

    def rank_for(self, in_features: int, out_features: int) -> int:
        if self.extra_bits is None:
            return self.rank or DEFAULT_RANK
        return int(self.extra_bits / rank_bits(in_features, out_features, self.factor_bits))

    def check_module(self, name: str, linear) -> None:
        rank = self.rank_for(linear.in_features, linear.out_features)
        most = min(linear.in_features, linear.out_features)
        if rank > most:
            raise CompressorError(f"lrec: rank {rank} is larger than {name} allows (min(in, out) = {most})"
                                  + ("; lower extra_bits" if self.rank is None else ""))
        if rank == 0:
            one = rank_bits(linear.in_features, linear.out_features, self.factor_bits)
            raise CompressorError(f"lrec: extra_bits {self.extra_bits} buys no rank for {name}: one rank costs "
                                  f"{one:.3f} bits per weight there")

    @torch.no_grad()
    def apply(self, name: str, q: QuantLinear, hessian: torch.Tensor, state: LayerState) -> tuple[QuantLinear, dict]:
        quantized = state.quantized.get(name)
        if quantized is None:
            raise CompressorError(f"lrec: {name} has no float weight to correct; put lrec right after the "
                                  "quantization pass in the same recipe")
        dense = quantized.dense_weight
        rank = self.rank_for(q.in_features, q.out_features)
        H = hessian.double()
        error = dense - q.weight_dequantized(torch.float32)  # [out, in]
        before = output_error(error, H)
        best = None  # (output error, the state of q that gave it): a round that does worse is not kept
        basis = hessian if self.whiten else None  # None: plain SVD, plain Frobenius error
        whitened = whitening(hessian, self.damp) if self.whiten else None  # H's eigenbasis: once, not per round
        hinv = inverse_hessian_cholesky(hessian.float(), self.damp) if self.whiten and self.factor_bits < 16 else None
        for step in range(self.alternate + 1):
            factors = split_factors(*whitened_svd(error.T, basis, self.damp, whitened, rank), rank)
            if self.factor_bits < 16:
                factors = fit_integer_factors(*factors, error, basis, self.factor_bits, self.damp, hinv)
            store_factors(q, *factors, self.factor_bits)
            a, b = q.low_rank_factors()
            correction = (a @ b).T  # [out, in], as stored
            after = output_error(error - correction, H)
            if best is None or after < best[0]:
                best = (after, {k: v.clone() for k, v in q.state_dict().items()})
            if step < self.alternate:
                quantized.requantize(dense - correction)
                error = dense - q.weight_dequantized(torch.float32)
        after, state = best
        q.load_state_dict(state)
        return q, {"pass": self.name, "rank": rank, "whiten": self.whiten,
                   "factor_bits": self.factor_bits, "alternate": self.alternate,
                   "weights": q.in_features * q.out_features,
                   "bits_per_weight": round(q.bits_per_weight(), 4),
                   "output_error_kept": after / before if before else 0.0, "runtime": q.runtime_config()}
