"""LowRankLinear: a linear layer stored as two thin factors, y = up(down(x))."""

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """W [out, in] ~ up.weight [out, rank] @ down.weight [rank, in]: two dense matmuls of rank * (in + out)
    weights. `down` and `up` are ordinary linears, so a later pass (gptq, rtn) can quantize each of them."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def runtime_config(self) -> dict:
        return {"class": "LowRankLinear", "rank": self.rank, "bias": self.up.bias is not None}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype) -> "LowRankLinear":
        return cls(old.in_features, old.out_features, config["rank"], config["bias"], dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
