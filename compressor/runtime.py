"""Device choice and resource measurements shared by the CLI, the API and the benchmarks."""

import functools
import resource
import sys
import time
import warnings

import torch
from torch import nn

from compressor.errors import CompressorError, CompressorWarning

SLOW_MATMUL = 2.0  # a dtype whose matmuls run this many times slower than float32's is not worth its memory saving


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise CompressorError(f"device {spec!r} asked for, but torch sees no CUDA GPU; use device: auto or cpu")
    return torch.device(spec)


@functools.cache
def matmul_slowdown(dtype: torch.dtype, device_type: str) -> float:
    """How many times longer a [256, 256] x [256, 256] matmul takes in `dtype` than in float32 on this machine's
    CPU (best of 3 each); 1.0 for float32 and off the CPU. A CPU without native bfloat16 / float16 instructions
    (an AMD EPYC with AVX2 only) runs them about 100x slower."""
    if dtype == torch.float32 or device_type != "cpu":
        return 1.0
    a = torch.randn(256, 256)

    def seconds(x: torch.Tensor) -> float:
        x @ x  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(a.to(dtype)) / seconds(a)


def warn_if_slow_dtype(model: nn.Module, device: torch.device) -> None:
    """Warn when the model's dtype runs its matmuls far slower than float32 would on `device`."""
    dtype = next(model.parameters()).dtype
    slowdown = matmul_slowdown(dtype, device.type)
    if slowdown > SLOW_MATMUL:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"the model is in {name}, and this CPU runs {name} matmuls {slowdown:.0f}x slower than float32 "
                      "ones (no native instructions for them): `dtype: float32` (recipe) runs far faster here",
                      CompressorWarning, stacklevel=1)  # warned from here: once per process


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says an allocation failed: MemoryError, torch.OutOfMemoryError (CUDA), or the CPU
    allocator's RuntimeError."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def available_memory() -> int | None:
    """Bytes of memory the system can give this process now (MemAvailable of /proc/meminfo); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def peak_memory(device: torch.device) -> dict[str, float]:
    report = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return report


def weights_in(module: nn.Module) -> tuple[int, int]:
    """(weights, nonzero weights) of the module's tensors in memory: shared parameters counted once; a runtime
    module that stores its weight in another form (QuantLinear) counts the weights it stands for
    (`weight_counts()`); tensors on the meta device (a streamed model's layers not in memory) count nothing."""
    params = [p for p in {id(p): p for p in module.parameters()}.values() if not p.is_meta]
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    for sub in module.modules():
        if hasattr(sub, "weight_counts") and not any(b.is_meta for b in sub.buffers()):
            n, nz = sub.weight_counts()
            total, nonzero = total + n, nonzero + nz
    return total, nonzero


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters (see weights_in), how many are nonzero, and how many are outside the input embeddings and the
    output head."""
    total, nonzero = weights_in(model)
    ends = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    embedding = sum(p.numel() for p in {id(p): p for m in ends for p in m.parameters()}.values())
    return {"parameters": total, "nonzero_parameters": nonzero, "parameters_without_embeddings": total - embedding}


def with_layers(counts: dict[str, int], layers: tuple[int, int]) -> dict[str, int]:
    """`counts` (count_parameters of a streamed model: its embeddings and head) with the (weights, nonzero) of the
    decoder layers that the run counted as it held them."""
    return {"parameters": counts["parameters"] + layers[0],
            "nonzero_parameters": counts["nonzero_parameters"] + layers[1],
            "parameters_without_embeddings": counts["parameters_without_embeddings"] + layers[0]}
