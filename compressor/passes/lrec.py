"""LREC: low-rank factors that correct a quantized linear's error, y = x Wq^T + (x A) B.

With E = W - Wq [out, in] and the calibration inputs' H = X^T X = U diag(lam) U^T, the layer's
output error ||X (E^T - A B)||_F is ||S (E^T - A B)||_F for S = diag(sqrt(lam)) U^T. Its best
rank-r fix is the truncated SVD in that whitened basis (EoRA / QERA):
    S E^T = P Sigma Q^T,  A = S^-1 P_r Sigma_r^1/2 [in, r],  B = Sigma_r^1/2 Q_r^T [r, out].
`whiten: false` takes the plain SVD of E^T instead (ZeroQuant-V2's LoRC). The quantized weights
stay as they are; the factors are stored in float16 and counted in bits per weight.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressor.errors import CompressorError
from compressor.nn import QuantLinear
from compressor.passes.base import ParamError, Pass
from compressor.passes.quantize import check_damp


def low_rank_correction(error: torch.Tensor, hessian: torch.Tensor | None, rank: int, damp: float = 0.01):
    """error E [out, in], hessian [in, in] or None (plain SVD) -> A [in, rank], B [rank, out]."""
    M = error.T.double()  # [in, out]
    if hessian is None:
        P, sigma, Qt = torch.linalg.svd(M, full_matrices=False)
        root = sigma[:rank].sqrt()
        return (P[:, :rank] * root).float(), (root[:, None] * Qt[:rank]).float()
    lam, U = torch.linalg.eigh(hessian.double())
    lam = lam.clamp_min(0) + damp * lam.clamp_min(0).mean()
    P, sigma, Qt = torch.linalg.svd(lam.sqrt()[:, None] * (U.T @ M), full_matrices=False)
    root = sigma[:rank].sqrt()
    A = U @ ((P[:, :rank] * root) / lam.sqrt()[:, None])
    return A.float(), (root[:, None] * Qt[:rank]).float()


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

    def validate(self) -> None:
        if self.rank <= 0:
            raise ParamError("rank", f"got {self.rank}; use a positive integer such as 16 or 32")
        check_damp(self.damp)

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
        A, B = low_rank_correction(error, hessian if self.whiten else None, self.rank, self.damp)
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
