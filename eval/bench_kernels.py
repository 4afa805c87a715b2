"""Kernel benchmark (needs a CUDA GPU): for each shape and M, median time of the compressor kernel
(CUDA events, warm-up), achieved GB/s against the device's measured copy bandwidth, and speedup
over fp16 torch.matmul on the dequantized weight. Writes eval/results/kernels-<device>.md/.json.

    python eval/bench_kernels.py [--bits 4 2] [--group-size 128] [--rank 0 64]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from compressor import kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_kernels_gpu import SHAPES, random_quant_linear  # noqa: E402  (shapes shared with the tests)

MS = [1, 2, 4, 8, 16, 32, 64, 128, 2048]


def time_ms(fn, warmup=10, repeats=50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    a = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    b = torch.empty_like(a)
    return 2 * a.numel() / time_ms(lambda: b.copy_(a)) / 1e6  # read + write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, nargs="+", default=[0, 64])
    args = parser.parse_args()
    assert kernels.extension() is not None, kernels.unavailable_reason()
    device = torch.cuda.get_device_name()
    copy = copy_bandwidth_gbs()
    rows = []
    for name, (K, N) in SHAPES.items():
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
        for bits in args.bits:
            for rank in args.rank:
                q = random_quant_linear(K, N, bits, args.group_size, True, torch.float16, rank)
                weight_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
                for M in MS:
                    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                    t_q = time_ms(lambda q=q, x=x: q(x))
                    t_fp16 = time_ms(lambda x=x, w16=w16: x @ w16.T)
                    rows.append({"shape": name, "K": K, "N": N, "bits": bits, "group_size": args.group_size,
                                 "rank": rank, "M": M, "ms": t_q, "fp16_ms": t_fp16, "speedup": t_fp16 / t_q,
                                 "GBps": weight_bytes / t_q / 1e6, "copy_GBps": copy,
                                 "bandwidth_fraction": weight_bytes / t_q / 1e6 / copy})
                    print(rows[-1], flush=True)
    stem = ROOT / "eval" / "results" / f"kernels-{device.replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                    indent=2) + "\n")
    lines = [f"# Kernels on {device}", "", "Reproduce: `python eval/bench_kernels.py`", "",
             f"Copy bandwidth (read + write): {copy:.0f} GB/s. Weight bytes include scales, zeros, factors.", "",
             "| shape | bits | rank | M | ms | fp16 ms | speedup | GB/s | of copy bw |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['bits']} | {r['rank']} | {r['M']} | {r['ms']:.4f} | {r['fp16_ms']:.4f} | "
              f"{r['speedup']:.2f}x | {r['GBps']:.0f} | {r['bandwidth_fraction']:.0%} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
