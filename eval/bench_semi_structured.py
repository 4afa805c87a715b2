"""2:4 SparseLinear on PyTorch's semi-structured sparse tensors against a dense float16 linear (needs a CUDA
GPU of compute capability 8.0+): median time per shape and M (CUDA events, warm-up), and the speedup; also
F.linear on the same weight as a cuSPARSELt semi-structured tensor (SparseLinear uses PyTorch's default,
CUTLASS), to see which backend to use.
Writes eval/results/semi-structured-<device>.md/.json.

    python eval/bench_semi_structured.py
"""

import torch
import torch.nn.functional as F
from bench_kernels import fmt, graph_ms, time_ms, write_results
from shapes import SHAPES
from torch import nn
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

from compressor.nn import SparseLinear
from compressor.passes.prune import nm_keep_mask

MS = [1, 16, 128, 512, 2048]


def main() -> None:
    device = torch.cuda.get_device_name()
    rows = []
    for name, (K, N) in SHAPES.items():
        dense = nn.Linear(K, N, bias=False, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            dense.weight.mul_(nm_keep_mask(dense.weight.abs(), 2, 4))
        sparse = SparseLinear.from_linear(dense, "2:4")
        assert sparse.use_semi_structured(), "semi-structured sparse tensors unavailable on this GPU"
        cusparselt = SparseSemiStructuredTensorCUSPARSELT.from_dense(dense.weight.detach())
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            t_dense = time_ms(lambda x=x, f=dense: f(x))
            t_sparse = time_ms(lambda x=x, f=sparse: f(x))
            t_cusparselt = time_ms(lambda x=x, w=cusparselt: F.linear(x, w))
            g_dense, g_sparse = graph_ms(lambda x=x, f=dense: f(x)), graph_ms(lambda x=x, f=sparse: f(x))
            rows.append({"shape": name, "K": K, "N": N, "M": M, "dense_ms": t_dense, "sparse_ms": t_sparse,
                         "speedup": t_dense / t_sparse, "cusparselt_ms": t_cusparselt, "graph_dense_ms": g_dense,
                         "graph_sparse_ms": g_sparse,
                         "graph_speedup": g_dense / g_sparse if g_dense and g_sparse else None})
            print(rows[-1], flush=True)
    lines = [f"# 2:4 semi-structured SparseLinear on {device}", "",
             f"Reproduce: `python eval/bench_semi_structured.py` (torch {torch.__version__}). float16, no bias; "
             "dense = nn.Linear on the same 2:4-pruned weight. Median of 50 timed calls after 10 warm-ups "
             "(CUDA events), each call from Python (the CPU's launch overhead included); graph: one call of 20 "
             "captured in a CUDA graph (GPU time).", "",
             "| shape | K | N | M | dense ms | SparseLinear 2:4 ms | speedup | cuSPARSELt 2:4 ms | speedup | "
             "dense graph ms | 2:4 graph ms | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['K']} | {r['N']} | {r['M']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
              f"{r['speedup']:.2f}x | {r['cusparselt_ms']:.4f} | {r['dense_ms'] / r['cusparselt_ms']:.2f}x | "
              f"{fmt(r['graph_dense_ms'], '.4f')} | {fmt(r['graph_sparse_ms'], '.4f')} | "
              f"{fmt(r['graph_speedup'], '.2f')}x |"
              for r in rows]
    write_results("semi-structured", device, rows, lines)


if __name__ == "__main__":
    main()
