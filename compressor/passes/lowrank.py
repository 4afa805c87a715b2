"""Low-rank decomposition (LoRD): W [out, in] ~ up [out, r] @ down [r, in], two thin dense matmuls.

`method: activation` (default) truncates the SVD in the basis whitened by the calibration inputs
(as ASVD / SVD-LLM do), minimising the linear's output error ||X (W^T - down^T up^T)||_F;
`method: svd` truncates the plain SVD of W. The rank comes from exactly one of:
- `rank`: the same rank for every targeted linear;
- `rank_ratio`: rank = round(rank_ratio * min(in, out));
- `param_ratio`: the factors keep at most this fraction of the linear's weights,
  rank = floor(param_ratio * in * out / (in + out)) (0.8 is a 20% cut);
- `energy`: the smallest rank whose singular values keep this fraction of sum(sigma^2).
A linear is only factorized when rank * (in + out) < in * out; otherwise it stays dense (recorded).
A later quantization pass in the same recipe quantizes the two factors (`NAME.down`, `NAME.up`).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.nn import LowRankLinear
from compressor.passes.base import LayerState, ParamError, Pass
from compressor.passes.hessian import check_damp
from compressor.passes.svd import energy_rank, split_factors, whitened_svd

METHODS = ("activation", "svd")
RANK_KEYS = ("rank", "rank_ratio", "param_ratio", "energy")


@dataclass
class LowRank(Pass):
    """Factorize linears by truncated (activation-whitened) SVD."""

    name: ClassVar[str] = "lowrank"
    produces: ClassVar[str] = "lowrank"

    rank: int | None = None
    rank_ratio: float | None = None
    param_ratio: float | None = None
    energy: float | None = None
    method: str = "activation"
    damp: float = 0.01

    @property
    def stats(self) -> str | None:  # only the activation-aware method reads calibration data
        return "hessian" if self.method == "activation" else None

    def validate(self) -> None:
        given = [k for k in RANK_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ParamError("rank", f"give exactly one of {', '.join(RANK_KEYS)} (got {given or 'none'}), "
                                     "e.g. param_ratio: 0.8 for a 20% parameter cut")
        if self.rank is not None and self.rank <= 0:
            raise ParamError("rank", f"got {self.rank}; use a positive integer")
        for key in ("rank_ratio", "param_ratio", "energy"):
            value = getattr(self, key)
            if value is not None and not 0 < value < 1:
                raise ParamError(key, f"got {value}; allowed: a number in (0, 1)")
        if self.method not in METHODS:
            raise ParamError("method", f"got {self.method!r}; allowed: {', '.join(METHODS)}")
        check_damp(self.damp)

    def check_module(self, name: str, linear: nn.Linear) -> None:
        if self.rank is not None and self.rank > min(linear.in_features, linear.out_features):
            raise CompressorError(f"lowrank: rank {self.rank} is larger than {name} allows "
                                  f"(min(in, out) = {min(linear.in_features, linear.out_features)})")

    def choose_rank(self, in_features: int, out_features: int, sigma: torch.Tensor) -> int:
        if self.rank is not None:
            return self.rank
        if self.rank_ratio is not None:
            return max(1, round(self.rank_ratio * min(in_features, out_features)))
        if self.param_ratio is not None:
            return max(1, int(self.param_ratio * in_features * out_features / (in_features + out_features)))
        return energy_rank(sigma, self.energy)

    @torch.no_grad()
    def apply(self, name: str, linear: nn.Linear, hessian: torch.Tensor | None, state: LayerState
              ) -> tuple[nn.Module, dict]:
        W = linear.weight.data
        out_features, in_features = W.shape
        left, sigma, right = whitened_svd(W.T, hessian, self.damp)  # W^T [in, out]
        rank = self.choose_rank(in_features, out_features, sigma)
        kept = (sigma[:rank] ** 2).sum() / (sigma**2).sum()
        record = {"pass": self.name, "method": self.method, "rank": rank, "weights": W.numel(),
                  "energy_kept": round(kept.item(), 6)}
        if rank * (in_features + out_features) >= W.numel():
            return linear, {**record, "factorized": False}
        A, B = split_factors(left, sigma, right, rank)  # W^T ~ A [in, r] @ B [r, out]
        module = LowRankLinear(in_features, out_features, rank, linear.bias is not None, W.dtype).to(W.device)
        module.down.weight.copy_(A.T)
        module.up.weight.copy_(B.T)
        if linear.bias is not None:
            module.up.bias.copy_(linear.bias)
        return module, {**record, "factorized": True, "parameters": rank * (in_features + out_features),
                        "runtime": module.runtime_config()}
