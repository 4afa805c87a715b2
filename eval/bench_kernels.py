"""Kernel benchmark (needs a CUDA GPU): for each shape and M, median time of the compressor kernel
(CUDA events, warm-up) per call from Python and per call inside a CUDA graph (the GPU's time alone,
without the CPU's launch overhead), achieved GB/s (graph time) against the device's measured copy
bandwidth, and speedup over fp16 torch.matmul on the dequantized weight, timed the same two ways.
Writes eval/results/kernels-<device>.md/.json.

    python eval/bench_kernels.py [--bits 4 2] [--group-size 128] [--rank 0 64]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from shapes import SHAPES, random_quant_linear

from compressor import kernels

ROOT = Path(__file__).resolve().parents[1]

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


def graph_ms(fn, calls=20) -> float | None:
    """GPU time per call without the CPU's launch overhead: `calls` calls captured in one CUDA graph,
    replayed. None where the call cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the default stream, as capture requires
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        print(f"not captured: {e}", flush=True)
        return None
    return time_ms(graph.replay, warmup=3, repeats=20) / calls


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
                    g_q = graph_ms(lambda q=q, x=x: q(x))
                    g_fp16 = graph_ms(lambda x=x, w16=w16: x @ w16.T)
                    rows.append({"shape": name, "K": K, "N": N, "bits": bits, "group_size": args.group_size,
                                 "rank": rank, "M": M, "ms": t_q, "fp16_ms": t_fp16, "speedup": t_fp16 / t_q,
                                 "graph_ms": g_q, "graph_fp16_ms": g_fp16,
                                 "graph_speedup": g_fp16 / g_q if g_q and g_fp16 else None,
                                 "GBps": weight_bytes / g_q / 1e6 if g_q else None, "copy_GBps": copy,
                                 "bandwidth_fraction": weight_bytes / g_q / 1e6 / copy if g_q else None})
                    print(rows[-1], flush=True)
    command = " ".join(["python eval/bench_kernels.py", *sys.argv[1:]])
    lines = [f"# Kernels on {device}", "", f"Reproduce: `{command}` (torch {torch.__version__})", "",
             f"Copy bandwidth (read + write): {copy:.0f} GB/s. Weight bytes include scales, zeros, factors. "
             "call: one call from Python between CUDA events (the CPU's launch overhead included); graph: one "
             "call of 20 captured in a CUDA graph (GPU time); GB/s and share of copy bandwidth from graph time. "
             "Median of the timed repeats after warm-ups.", "",
             "| shape | bits | rank | M | call ms | fp16 call ms | speedup | graph ms | fp16 graph ms | speedup | "
             "GB/s | of copy bw |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['bits']} | {r['rank']} | {r['M']} | {r['ms']:.4f} | {r['fp16_ms']:.4f} | "
              f"{r['speedup']:.2f}x | {fmt(r['graph_ms'], '.4f')} | {fmt(r['graph_fp16_ms'], '.4f')} | "
              f"{fmt(r['graph_speedup'], '.2f')}x | {fmt(r['GBps'], '.0f')} | "
              f"{fmt(r['bandwidth_fraction'], '.0%')} |"
              for r in rows]
    write_results("kernels", device, rows, lines)


def write_results(name: str, device: str, rows: list[dict], lines: list[str]) -> None:
    """eval/results/<name>-<device>.json (the rows) and .md (`lines`, the readable table)."""
    stem = ROOT / "eval" / "results" / f"{name}-{device.replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
