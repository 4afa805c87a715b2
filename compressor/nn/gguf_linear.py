"""GGUFLinear: a linear stored in a GGUF block type, as llama.cpp stores it (compressor/gguf_blocks.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from compressor.gguf_blocks import BLOCK_TYPES, dequantize
from compressor.nn.packed import PackedLinear


class GGUFLinear(PackedLinear):
    """y = x W^T + bias with W [out, in] rebuilt from `qweight` uint8 [out, in / block * type_size]: each output
    row's blocks, byte for byte what a GGUF file holds for that row (a GGUF export copies them)."""

    def __init__(self, in_features: int, out_features: int, block_type: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_type = BLOCK_TYPES[block_type]
        row_bytes = in_features // self.block_type.block * self.block_type.type_size
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def runtime_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.block_type, self.qweight.cpu()).to(device=self.qweight.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x), self.bias)

    def weight_counts(self) -> tuple[int, int]:
        """(weights this module stands for, how many are nonzero)."""
        w = self.runtime_weight(torch.float32)
        return w.numel(), int(torch.count_nonzero(w))

    def bits_per_weight(self) -> float:
        return self.block_type.bits_per_weight

    def runtime_config(self) -> dict:
        return {"class": "GGUFLinear", "type": self.block_type.name, "bias": self.bias is not None}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype):
        return cls(old.in_features, old.out_features, config["type"], config["bias"], dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.block_type.name}"
