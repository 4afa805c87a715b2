"""LowRankLinear: a linear layer stored as two thin factors, y = (x down^T) up^T + bias."""

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """W [out, in] ~ up [out, rank] @ down [rank, in]: two dense matmuls of rank * (in + out) weights."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def runtime_config(self) -> dict:
        return {"class": "LowRankLinear", "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype) -> "LowRankLinear":
        return cls(old.in_features, old.out_features, config["rank"], config["bias"], dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
