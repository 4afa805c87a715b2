"""LREC: low-rank factors that correct a quantized linear's error, y = x Wq^T + (x A) B.

With E = W - Wq [out, in], the factors are the truncated SVD of E^T in the basis whitened by the
calibration inputs (EoRA / QERA; see compressor/passes/svd.py), which minimises the linear's output
error ||X (E^T - A B)||_F. `whiten: false` takes the plain SVD of E^T instead (ZeroQuant-V2's LoRC).
The quantized weights stay as they are; the factors are stored in float16 and counted in bits per weight.
As in GPTQ, the first token of each calibration window can count `sink_weight` times in the Hessian
(SmolLM2, GPTQ W2 g64 + LREC r16, 8 x 2048 calibration, windows=4: weight 1 2158, 64 1725; one
measurement, so the default stays 1).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressor.errors import CompressorError
from compressor.nn import QuantLinear
from compressor.passes.base import ParamError, Pass
from compressor.passes.quantize import check_damp, check_sink_weight
from compressor.passes.svd import split_factors, whitened_svd


@dataclass
class LREC(Pass):
    """Error-correcting low-rank factors for linears quantized by an earlier pass (rtn, gptq)."""

    name: ClassVar[str] = "lrec"
    stats: ClassVar[str | None] = "hessian"
    accepts: ClassVar[tuple[str, ...]] = ("quantized",)
    produces: ClassVar[str] = "quantized"

    rank: int = 32
    whiten: bool = True
    damp: float = 0.01
    sink_weight: float = 1.0  # as GPTQ's: the first token of each window counts this many times

    def validate(self) -> None:
        if self.rank <= 0:
            raise ParamError("rank", f"got {self.rank}; use a positive integer such as 16 or 32")
        check_damp(self.damp)
        check_sink_weight(self.sink_weight)

    def check_module(self, name: str, linear) -> None:
        if self.rank > min(linear.in_features, linear.out_features):
            raise CompressorError(f"lrec: rank {self.rank} is larger than {name} allows "
                                  f"(min(in, out) = {min(linear.in_features, linear.out_features)})")

    @torch.no_grad()
    def apply(self, name: str, q: QuantLinear, hessian: torch.Tensor) -> tuple[QuantLinear, dict]:
        dense = getattr(q, "dense_weight", None)
        if dense is None:
            raise CompressorError(f"lrec: {name} has no float weight to correct; put lrec right after the "
                                  "quantization pass in the same recipe")
        error = dense - q.weight_dequantized(torch.float32)  # [out, in]
        A, B = split_factors(*whitened_svd(error.T, hessian if self.whiten else None, self.damp), self.rank)
        q.set_low_rank(A, B)
        H = hessian.double()

        def output_error(e: torch.Tensor) -> float:  # ||X e^T||_F^2 = tr(e H e^T)
            e = e.double()
            return (e @ H * e).sum().item()

        residual = error - (q.lora_a.float() @ q.lora_b.float()).T
        before, after = output_error(error), output_error(residual)
        return q, {"pass": self.name, "rank": self.rank, "whiten": self.whiten, "weights": error.numel(),
                   "bits_per_weight": round(q.bits_per_weight(), 4),
                   "output_error_kept": after / before if before else 0.0, "runtime": q.runtime_config()}
