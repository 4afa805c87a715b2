"""The Hessian of a linear's calibration inputs, H = X^T X, and what GPTQ, SparseGPT and LREC do with it.

For a linear y = x W^T with calibration inputs X [tokens, in], the output error of a changed weight
W' is ||X (W - W')^T||_F^2 = tr((W - W') H (W - W')^T), so H [in, in] is all those passes need to
know about the data. It is summed window by window in float32; the first token of each window (the
attention sink every later token reads) can count `sink_weight` times.
"""

import torch

from compressor.errors import CompressorError
from compressor.passes.base import ParamError


def window_hessian(x: torch.Tensor, sink_weight: float = 1.0) -> torch.Tensor:
    """sum_t x_t x_t^T over one window's inputs x [windows, L, in], in float32 [in, in]; the first position
    of each window counts `sink_weight` times."""
    x = with_sink_weight(x, sink_weight).reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, in]
    return x.T @ x


def with_sink_weight(x: torch.Tensor, sink_weight: float) -> torch.Tensor:
    """x [windows, L, in] with the first position scaled by sqrt(sink_weight), so that it counts sink_weight
    times in any sum of squares. Routed inputs [tokens, in] (a mixture-of-experts expert's) have no positions and
    come back as they are."""
    if sink_weight == 1.0 or x.dim() < 3:
        return x
    return torch.cat([x[:, :1] * sink_weight ** 0.5, x[:, 1:]], dim=1)


def check_damp(damp: float) -> None:
    """`damp` adds damp * mean(diag H) to H's diagonal before it is inverted."""
    if not 0 <= damp < 1:
        raise ParamError("damp", f"got {damp}; allowed: a fraction of mean(diag H) in [0, 1), e.g. 0.01")


def without_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of W [out, in] and H [in, in] where an input that was always zero (H_jj = 0) gets
    H_jj = 1 and a zero weight column: it cannot matter, and H stays invertible."""
    W, H = weight.clone().float(), hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 [in, in]: row i, divided by its diagonal
    entry, is how the columns after i must move to absorb an error in column i (GPTQ, SparseGPT)."""
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise CompressorError("the Hessian is not positive definite even after damping; "
                              "raise `damp` (e.g. 0.1) or use more calibration samples") from None


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X error^T||_F^2 = tr(error H error^T) for error [out, in] and H = X^T X [in, in], in float64."""
    e = error.double()
    return (e @ hessian.double() * e).sum().item()
