"""The CUDA dequant-matmul kernels in cuda/, built with torch.utils.cpp_extension on first use (cached
by torch under ~/.cache/torch_extensions) for sm_80 and sm_90. `compressor` imports and runs without
them: QuantLinear falls back to its PyTorch reference forward, warning once."""

import warnings
from pathlib import Path

import torch

from compressor.errors import CompressorWarning

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
_extension = None
_unavailable: str | None = None


def extension():
    """The built extension, or None (with the reason in `unavailable_reason()`)."""
    global _extension, _unavailable
    if _extension is None and _unavailable is None:
        if not torch.cuda.is_available():
            _unavailable = "no CUDA GPU"
        elif not (CUDA_DIR / "qgemv.cu").is_file():
            _unavailable = f"kernel sources not found in {CUDA_DIR} (install compressor from a checkout)"
        else:
            try:
                from torch.utils.cpp_extension import load

                _extension = load(name="compressor_cuda", sources=[str(CUDA_DIR / "bindings.cpp"),
                                                                   str(CUDA_DIR / "qgemv.cu")],
                                  extra_cuda_cflags=["-O3", *ARCH_FLAGS], verbose=False)
            except Exception as e:  # a failed build must not stop the reference path
                _unavailable = f"building the kernels failed: {e}"
    return _extension


def unavailable_reason() -> str | None:
    return _unavailable


K_MULTIPLE = 64  # cuda/qgemv.h kKMultiple: the kernels read x in 16-byte vectors from aligned rows


def supports(bits: int, group_size: int, in_features: int, x: torch.Tensor) -> bool:
    return (bits in (2, 4) and group_size % (32 // bits) == 0 and in_features % K_MULTIPLE == 0
            and in_features // (32 // bits) < 2**22 and x.dtype in (torch.float16, torch.bfloat16))


_warned = False


def warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(f"compressor: QuantLinear on CUDA uses the PyTorch reference path ({reason})",
                      CompressorWarning, stacklevel=3)
        _warned = True
