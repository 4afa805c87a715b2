"""2:4 SparseLinear on PyTorch's semi-structured sparse tensors (skipped without a CUDA GPU of capability 8.0+)."""

import pytest
import torch
from torch import nn

from compressor.nn import SparseLinear
from compressor.passes.prune import nm_keep_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                reason="needs a CUDA GPU of compute capability 8.0+")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (4096, 4096)])
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_semi_structured_forward_matches_the_reference(dtype, shape, tokens):
    torch.manual_seed(0)
    in_features, out_features = shape
    linear = nn.Linear(in_features, out_features, bias=True, dtype=dtype, device="cuda")
    with torch.no_grad():
        linear.weight.mul_(nm_keep_mask(linear.weight.abs(), 2, 4))
    sparse = SparseLinear.from_linear(linear, "2:4")
    x = torch.randn(2, tokens, in_features, dtype=dtype, device="cuda")
    expected = sparse(x)
    assert sparse.use_semi_structured()
    torch.testing.assert_close(sparse(x), expected, rtol=2e-2, atol=2e-2)


def test_other_patterns_and_float32_stay_on_the_reference_path():
    linear = nn.Linear(64, 64, device="cuda")
    with torch.no_grad():
        linear.weight.mul_(nm_keep_mask(linear.weight.abs(), 4, 8))
    assert not SparseLinear.from_linear(linear, "4:8").half().use_semi_structured()
    with torch.no_grad():
        linear.weight.mul_(nm_keep_mask(linear.weight.abs(), 2, 4))
    assert not SparseLinear.from_linear(linear, "2:4").use_semi_structured()  # float32
