"""QuantLinear: a linear layer stored as packed integer codes (compressor/formats.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from compressor.formats import bits_per_weight, dequantize, packed_words


class QuantLinear(nn.Module):
    """y = x dequant(qweight)^T + bias. The PyTorch reference forward dequantizes, then matmuls."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_dequantized(x.dtype), self.bias)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.out_features, self.in_features, self.bits, self.group_size,
                               torch.finfo(self.scales.dtype).bits)

    def runtime_config(self) -> dict:
        """What `compressor.checkpoint.load` needs to rebuild this module before loading its tensors."""
        return {"class": "QuantLinear", "bits": self.bits, "group_size": self.group_size,
                "bias": self.bias is not None, "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_runtime_config(cls, config: dict, in_features: int, out_features: int, dtype: torch.dtype):
        return cls(in_features, out_features, config["bits"], config["group_size"], config["bias"],
                   getattr(torch, config["scale_dtype"]), dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
