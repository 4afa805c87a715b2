import torch

from compressor.passes.svd import energy_rank, split_factors, whitened_svd


def low_rank(M, hessian, rank):
    return split_factors(*whitened_svd(M, hessian), rank)


def test_whitened_factors_beat_plain_svd_on_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) @ torch.randn(12, 64, generator=g) + 0.1 * torch.randn(400, 64, generator=g)
    M = torch.randn(64, 32, generator=g)
    out = {}
    for name, h in [("whitened", x.T @ x), ("plain", None)]:
        A, B = low_rank(M, h, rank=8)
        assert A.shape == (64, 8) and B.shape == (8, 32)
        out[name] = (x @ (M - A @ B)).norm()
    assert out["whitened"] < 0.5 * out["plain"] < 0.5 * (x @ M).norm()


def test_full_rank_recovers_the_matrix_exactly_plain_and_whitened():
    M = torch.randn(10, 6)
    x = torch.randn(50, 10)
    for h in (None, x.T @ x):
        A, B = low_rank(M, h, rank=6)
        torch.testing.assert_close(A @ B, M, atol=1e-5, rtol=1e-5)


def test_energy_rank_keeps_at_least_the_asked_energy():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25
    assert energy_rank(sigma, 0.5) == 1
    assert energy_rank(sigma, 9 / 14.25) == 1
    assert energy_rank(sigma, 0.64) == 2
    assert energy_rank(sigma, 0.99) == 4
    assert energy_rank(sigma, 1.0) == 4


def test_leading_terms_match_the_full_svd_on_both_orientations():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 40, generator=g)
    for shape in [(40, 90), (40, 25)]:
        M = torch.randn(*shape, generator=g)
        full = split_factors(*whitened_svd(M, x.T @ x), 7)
        lead = split_factors(*whitened_svd(M, x.T @ x, rank=7), 7)
        torch.testing.assert_close(lead[0] @ lead[1], full[0] @ full[1], atol=1e-5, rtol=1e-5)
        plain = whitened_svd(M, None, rank=7)
        assert plain[0].shape == (40, 7) and plain[2].shape == (7, shape[1])
        torch.testing.assert_close(plain[1], torch.linalg.svdvals(M.double())[:7])


def test_leading_terms_of_a_rank_deficient_matrix_stay_finite():
    M = torch.randn(12, 3) @ torch.randn(3, 20)
    A, B = split_factors(*whitened_svd(M, None, rank=6), 6)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    torch.testing.assert_close(A @ B, M, atol=1e-4, rtol=1e-4)
