"""CUDA kernels against the PyTorch reference (skipped without a CUDA GPU).

Outputs are poisoned before each call: a NaN-filled block of the output's size is freed just
before, so the caching allocator hands it to the kernel's output and any entry it fails to write
stays NaN."""

import pytest
import torch

from compressor import kernels
from eval.shapes import SHAPES, random_quant_linear  # the shapes the kernel benchmark times

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MS = [1, 2, 3, 8, 16, 33, 64, 128, 512, 2048]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (4, 64, False), (4, 32, True),
                                                       (2, 128, False), (2, 64, True)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_kernel_matches_reference(shape, bits, group_size, symmetric, dtype, tolerance):
    K, N = SHAPES[shape]
    q = random_quant_linear(K, N, bits, group_size, symmetric, dtype)
    assert kernels.extension() is not None, kernels.unavailable_reason()
    w = q.weight_dequantized(torch.float32)
    for M in MS:
        if M * K * N > 2**36:  # keep the largest products affordable
            continue
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        torch.full((M, N), float("nan"), device="cuda", dtype=dtype)  # freed at once: the poisoned block
        y = q(x).float()
        expected = x.float() @ w.T
        assert torch.isfinite(y).all(), f"M={M}: entries left unwritten"
        error = (y - expected).norm() / expected.norm()
        assert error < tolerance, f"M={M}: relative error {error:.2e}"


def test_lrec_factors_are_added_on_the_kernel_path():
    q = random_quant_linear(576, 1536, 4, 64, True, torch.float16, rank=16)
    x = torch.randn(3, 576, device="cuda", dtype=torch.float16)
    expected = x.float() @ q.weight_dequantized(torch.float32).T + (x.float() @ q.lora_a.float()) @ q.lora_b.float()
    assert ((q(x).float() - expected).norm() / expected.norm()) < 1e-3
