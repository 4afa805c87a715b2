"""The linear shapes and random quantized linears the GPU benchmarks time (bench_kernels.py,
bench_semi_structured.py)."""

import torch

from compressor.formats import pack
from compressor.nn import QuantLinear
from compressor.passes.factors import store_factors

SHAPES = {  # (in_features K, out_features N)
    "smollm2 mlp": (576, 1536), "smollm2 down": (1536, 576), "gemma3 qkv": (640, 1024),
    "qwen2.5-1.5b mlp": (1536, 8960), "llama-7b": (4096, 11008), "llama-70b mlp": (8192, 28672),
}


def random_quant_linear(K: int, N: int, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                        rank: int = 0) -> QuantLinear:
    """A QuantLinear [K -> N] on the GPU with random codes, scales, zeros (and rank-`rank` factors), seeded by
    its shape and bit width."""
    g = torch.Generator().manual_seed(K + N + bits)
    q = QuantLinear(K, N, bits, group_size, scale_dtype=dtype, dtype=dtype, rank=rank)
    q.qweight.copy_(pack(torch.randint(0, 2**bits, (N, K), generator=g), bits))
    q.scales.copy_(torch.rand(q.scales.shape, generator=g) * 0.02 + 0.001)
    zeros = torch.randint(0, 2**bits, q.zeros.shape, generator=g) if not symmetric else 2 ** (bits - 1)
    q.zeros.copy_(torch.as_tensor(zeros, dtype=torch.uint8).expand_as(q.zeros))
    if rank:
        store_factors(q, torch.randn(K, rank, generator=g) * 0.01, torch.randn(rank, N, generator=g) * 0.01)
    return q.cuda()
