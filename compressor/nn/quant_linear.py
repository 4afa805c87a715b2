"""QuantLinear: a linear layer stored as packed integer codes (compressor/formats.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from compressor.formats import bits_per_weight, dequantize, low_rank_bits, packed_words, unpack
from compressor.nn.packed import PackedLinear


class QuantLinear(PackedLinear):
    """y = x dequant(qweight)^T + (x A) B + bias, the low-rank term only when rank > 0 (LREC factors
    A [in, rank], B [rank, out], stored in the scales' dtype, or with factor_bits 8 as int8 codes times a
    float32 scale per rank: A = lora_a * lora_a_scale[None, :], B = lora_b * lora_b_scale[:, None]; with
    factor_bits 4 the codes + 8 are packed as compressor/formats.py packs 4-bit weights, A^T's rows in
    lora_a [rank, words(in)] and B's in lora_b [rank, words(out)]).
    On a CUDA GPU, 2- and 4-bit codes with float16/bfloat16 inputs run on the kernels in cuda/ (packed), with
    the factors added after. Elsewhere the weight is rebuilt (PackedLinear): packed, x dequant(W)^T + (x A) B
    on every call; unpacked, the factors are folded in once, W' = dequant(W) + (A B)^T, and each call is the
    one dense matmul x W'^T (equal to the packed result up to float rounding)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32, rank: int = 0,
                 factor_bits: int = 16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.rank, self.factor_bits = 0, factor_bits
        if rank:  # empty factors of the stored shapes and dtypes, which loading fills
            self.set_factors(*self._empty_factors(rank, factor_bits), factor_bits=factor_bits)

    def _empty_factors(self, rank: int, factor_bits: int) -> list[torch.Tensor]:
        if factor_bits == 16:
            return [torch.zeros(self.in_features, rank, dtype=self.scales.dtype),
                    torch.zeros(rank, self.out_features, dtype=self.scales.dtype)]
        if factor_bits == 8:
            codes = [torch.zeros(self.in_features, rank, dtype=torch.int8),
                     torch.zeros(rank, self.out_features, dtype=torch.int8)]
        else:
            codes = [torch.zeros(rank, packed_words(self.in_features, 4), dtype=torch.int32),
                     torch.zeros(rank, packed_words(self.out_features, 4), dtype=torch.int32)]
        return codes + [torch.ones(rank), torch.ones(rank)]

    def set_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor, lora_a_scale: torch.Tensor | None = None,
                    lora_b_scale: torch.Tensor | None = None, factor_bits: int = 16) -> None:
        """Attach (or replace) stored LREC factors: float16/bfloat16 A [in, rank] and B [rank, out], or their
        codes and per-rank scales (the class docstring; compressor/passes/factors.py makes them)."""
        self.rank = lora_a.shape[0] if factor_bits == 4 else lora_a.shape[1]
        self.factor_bits = factor_bits
        self.register_buffer("lora_a", lora_a.contiguous())
        self.register_buffer("lora_b", lora_b.contiguous())
        for name, scale in (("lora_a_scale", lora_a_scale), ("lora_b_scale", lora_b_scale)):
            if scale is None:
                self._buffers.pop(name, None)
            else:
                self.register_buffer(name, scale)

    def low_rank_factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors as stored, A [in, rank] and B [rank, out], in `dtype`."""
        if self.factor_bits == 16:
            return self.lora_a.to(dtype), self.lora_b.to(dtype)
        codes_a, codes_b = self.lora_a, self.lora_b
        if self.factor_bits == 4:
            codes_a = unpack(codes_a, 4, self.in_features).T.to(dtype) - 8
            codes_b = unpack(codes_b, 4, self.out_features).to(dtype) - 8
        return (codes_a.to(dtype) * self.lora_a_scale.to(dtype)[None, :],
                codes_b.to(dtype) * self.lora_b_scale.to(dtype)[:, None])

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    def runtime_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """dequant(W) + (A B)^T [out, in] in `dtype` (the factors folded in, in float32 first)."""
        if not self.rank:
            return self.weight_dequantized(dtype)
        a, b = self.low_rank_factors(torch.float32)
        return (self.weight_dequantized(torch.float32) + (a @ b).T).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unpacked:
            return F.linear(x, self.weight_for(x), self.bias)
        y = self._kernel_forward(x) if x.is_cuda else None
        if y is None:
            y = F.linear(x, self.weight_dequantized(x.dtype), self.bias)
        elif self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.rank:
            a, b = self.low_rank_factors(x.dtype)
            y = y + (x @ a) @ b
        return y

    def has_kernel(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether calls with `dtype` inputs on `device` run on the CUDA kernels (which read the packed codes)."""
        from compressor import kernels

        return device.type == "cuda" and kernels.supports(self.bits, self.group_size, self.in_features,
                                                          torch.empty(0, dtype=dtype)) \
            and kernels.extension() is not None

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
        scale_bits = torch.finfo(self.scales.dtype).bits
        codes = bits_per_weight(self.out_features, self.in_features, self.bits, self.group_size, scale_bits)
        factor_bits = scale_bits if self.factor_bits == 16 else self.factor_bits
        return codes + low_rank_bits(self.in_features, self.out_features, self.rank, factor_bits) / (
            self.in_features * self.out_features)

    def runtime_config(self) -> dict:
        """What `compressor.checkpoint.load` needs to rebuild this module before loading its tensors."""
        return {"class": "QuantLinear", "bits": self.bits, "group_size": self.group_size, "rank": self.rank,
                "factor_bits": self.factor_bits, "bias": self.bias is not None,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype):
        in_features, out_features = old.in_features, old.out_features
        return cls(in_features, out_features, config["bits"], config["group_size"], config["bias"],
                   getattr(torch, config["scale_dtype"]), dtype, config.get("rank", 0),
                   config.get("factor_bits", 16))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
                + (f", rank={self.rank}" if self.rank else "")
                + (f", int{self.factor_bits} factors" if self.rank and self.factor_bits < 16 else ""))
