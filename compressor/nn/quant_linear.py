"""QuantLinear: a linear layer stored as packed integer codes (compressor/formats.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from compressor.formats import bits_per_weight, dequantize, packed_words


class QuantLinear(nn.Module):
    """y = x dequant(qweight)^T + (x A) B + bias, the low-rank term only when rank > 0 (LREC factors
    A [in, rank], B [rank, out], stored in the scales' dtype). The PyTorch reference forward
    dequantizes, then matmuls."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32, rank: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.rank = rank
        if rank:
            self.register_buffer("lora_a", torch.zeros(in_features, rank, dtype=scale_dtype))
            self.register_buffer("lora_b", torch.zeros(rank, out_features, dtype=scale_dtype))

    def set_low_rank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Attach (or replace) error-correcting factors a [in, rank], b [rank, out]."""
        self.rank = a.shape[1]
        self.register_buffer("lora_a", a.to(self.scales.dtype).contiguous())
        self.register_buffer("lora_b", b.to(self.scales.dtype).contiguous())

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._kernel_forward(x) if x.is_cuda else None
        if y is None:
            y = F.linear(x, self.weight_dequantized(x.dtype), self.bias)
        elif self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.rank:
            y = y + (x @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype)
        return y

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x dequant(W)^T through the CUDA kernels (compressor/kernels.py), or None to use the reference."""
        from compressor import kernels

        if not kernels.supports(self.bits, self.group_size, self.in_features, x):
            kernels.warn_fallback(f"{self.bits}-bit, group {self.group_size}, {self.in_features} inputs, {x.dtype} "
                                  f"has no kernel (bits 2/4, inputs a multiple of {kernels.K_MULTIPLE}, fp16/bf16)")
            return None
        ext = kernels.extension()
        if ext is None:
            kernels.warn_fallback(kernels.unavailable_reason())
            return None
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        return ext.qmatmul(x.contiguous(), self.qweight, scales.contiguous(), self.zeros, self.bits, self.group_size,
                           torch.cuda.current_stream(x.device).cuda_stream)

    def weight_counts(self) -> tuple[int, int]:
        """(weights this module stands for, how many are nonzero): the dequantized weight and the factors."""
        w = self.weight_dequantized(torch.float32)
        extra = self.rank * (self.in_features + self.out_features)
        return w.numel() + extra, int(torch.count_nonzero(w)) + extra

    def bits_per_weight(self) -> float:
        """Storage bits per weight: codes, scales, zero points and low-rank factors."""
        factor_bits = torch.finfo(self.scales.dtype).bits
        codes = bits_per_weight(self.out_features, self.in_features, self.bits, self.group_size, factor_bits)
        return codes + self.rank * (self.in_features + self.out_features) * factor_bits / (
            self.in_features * self.out_features)

    def runtime_config(self) -> dict:
        """What `compressor.checkpoint.load` needs to rebuild this module before loading its tensors."""
        return {"class": "QuantLinear", "bits": self.bits, "group_size": self.group_size, "rank": self.rank,
                "bias": self.bias is not None, "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype):
        in_features, out_features = old.in_features, old.out_features
        return cls(in_features, out_features, config["bits"], config["group_size"], config["bias"],
                   getattr(torch, config["scale_dtype"]), dtype, config.get("rank", 0))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
                + (f", rank={self.rank}" if self.rank else ""))
