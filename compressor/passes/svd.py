"""Truncated SVD, plain or in the basis whitened by calibration activations.

For a linear y = x M (M [in, out]) and calibration inputs X with H = X^T X = U diag(lam) U^T, the
output error of a rank-r approximation, ||X (M - A B)||_F, equals ||S (M - A B)||_F for
S = diag(sqrt(lam)) U^T. So the best rank-r A B is the truncated SVD in that whitened basis
(EoRA, QERA, SVD-LLM):  S M = P Sigma Q^T,  A = S^-1 P_r Sigma_r^1/2,  B = Sigma_r^1/2 Q_r^T.
Without H (plain SVD) S is the identity and the Frobenius error of M itself is minimised.
"""

import torch


def whitening(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H = U diag(lam) U^T -> (U [in, in], sqrt(lam) [in]), float64, with `damp` times the mean eigenvalue
    added to each, so inputs that calibration never excites stay invertible. S = diag(sqrt(lam)) U^T."""
    lam, U = torch.linalg.eigh(hessian.double())
    lam = lam.clamp_min(0) + damp * lam.clamp_min(0).mean()
    return U, lam.sqrt()


def whitened_svd(M: torch.Tensor, hessian: torch.Tensor | None, damp: float = 0.01,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None, rank: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M [in, out], hessian [in, in] or None -> (left [in, n], sigma [n], right [n, out]), float64, with
    M = left diag(sigma) right and sigma descending in the (whitened) output-error norm. `basis`: H's
    `whitening(hessian, damp)` when already computed (several matrices whitened by one H). `rank`: only the
    leading `rank` terms (n = rank), from leading_svd."""
    svd = torch.linalg.svd if rank is None else lambda m, full_matrices: leading_svd(m, rank)
    M = M.double()
    if hessian is None:
        return svd(M, full_matrices=False)
    U, root = basis or whitening(hessian, damp)
    P, sigma, Qt = svd(root[:, None] * (U.T @ M), full_matrices=False)
    return U @ (P / root[:, None]), sigma, Qt


def leading_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` singular triplets of M [m, n] (float64): P [m, r], sigma [r], Qt [r, n], from the
    eigenvectors of the smaller Gram matrix (M M^T or M^T M), a third of a full SVD's time at LREC's shapes.
    Squaring M loses the singular values below about 1e-8 * sigma_max to rounding; the leading ones a
    truncation keeps are far above that. A direction with sigma = 0 gets a zero partner."""
    wide = M.shape[0] <= M.shape[1]
    lam, V = torch.linalg.eigh(M @ M.T if wide else M.T @ M)  # ascending
    lam, V = lam.flip(0)[:rank], V.flip(1)[:, :rank]
    sigma = lam.clamp_min(0).sqrt()
    inverse = torch.where(sigma > 0, 1 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    if wide:  # V = P: Qt = diag(1 / sigma) P^T M
        return V, sigma, inverse[:, None] * (V.T @ M)
    return (M @ V) * inverse, sigma, V.T  # V = Q: P = M Q diag(1 / sigma)


def split_factors(left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor, rank: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r factors A [in, r], B [r, out] (float32), sigma split evenly between them."""
    root = sigma[:rank].sqrt()
    return (left[:, :rank] * root).float(), (root[:, None] * right[:rank]).float()


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep `energy` of sum(sigma^2)."""
    kept = torch.cumsum(sigma.double() ** 2, 0) / (sigma.double() ** 2).sum()
    index = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype, device=kept.device)).item())
    return min(index + 1, len(sigma))
