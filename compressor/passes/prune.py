"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M.

N:M means at most N nonzero weights in every M consecutive weights along the input dimension
(2:4 is the pattern NVIDIA's sparse tensor cores run). For magnitude and Wanda, unstructured
sparsity s zeroes the floor(s * in_features) lowest-scoring weights of every output row, the
comparison group Wanda uses; SparseGPT chooses its mask block by block (see `sparsegpt`).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.nn import SparseLinear
from compressor.passes.base import LayerState, ParamError, Pass, check_sink_weight
from compressor.passes.hessian import check_damp, inverse_hessian_cholesky, without_dead_inputs
from compressor.passes.sweep import Ahead, sweep_columns


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M). Raises ValueError for anything else."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit()):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} is impossible: N:M needs 0 < N < M (e.g. '2:4', '4:8')")
    return n, m


def row_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask [out, in] that drops the floor(sparsity * in) lowest scores of every row."""
    n_drop = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        drop = torch.argsort(score, dim=1)[:, :n_drop]
        keep.scatter_(1, drop, False)
    return keep


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask [out, in] with the n highest scores of every m consecutive inputs of each row."""
    out_features, in_features = score.shape
    groups = score.reshape(out_features, in_features // m, m)
    top = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return keep.reshape(out_features, in_features)


@dataclass
class _Prune(Pass):
    accepts: ClassVar[tuple[str, ...]] = ("dense", "pruned")
    produces: ClassVar[str] = "pruned"

    sparsity: float | None = None
    pattern: str = "unstructured"

    def validate(self) -> None:
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise ParamError("pattern", str(e)) from None
        if nm is None:
            if self.sparsity is None:
                raise ParamError("sparsity", "unstructured pruning needs a sparsity in [0, 1), e.g. 0.5")
            if not 0 <= self.sparsity < 1:
                raise ParamError("sparsity", f"got {self.sparsity}; allowed: a number in [0, 1)")
        elif self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ParamError("sparsity", f"pattern {self.pattern} fixes sparsity at {1 - nm[0] / nm[1]}; "
                                         f"got {self.sparsity}. Leave sparsity out for N:M.")

    def check_module(self, name: str, linear: nn.Linear) -> None:
        nm = parse_pattern(self.pattern)
        if nm and linear.in_features % nm[1]:
            raise CompressorError(f"{self.name}: pattern {self.pattern} needs in_features divisible by "
                                  f"{nm[1]}, but {name} has {linear.in_features}; add it to `ignore`.")

    def score(self, weight: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, name: str, linear: nn.Linear, stats: torch.Tensor | None, state: LayerState
              ) -> tuple[nn.Module, dict]:
        weight = linear.weight.data
        score = self.score(weight.float(), stats)
        nm = parse_pattern(self.pattern)
        keep = row_keep_mask(score, self.sparsity) if nm is None else nm_keep_mask(score, *nm)
        weight.mul_(keep.to(weight.dtype))
        return self.pruned(name, linear, state)

    def pruned(self, name: str, linear: nn.Linear, state: LayerState) -> tuple[nn.Module, dict]:
        """Note `name` as pruned in the layer's state (a later quantizer keeps its zeros zero) and return the
        linear with this pass's record."""
        state.pruned.add(name)
        zeros = (linear.weight == 0).sum().item()
        return linear, {"pass": self.name, "pattern": self.pattern, "sparsity": zeros / linear.weight.numel()}


@dataclass
class Magnitude(_Prune):
    """Drop the weights of smallest |W|."""

    name: ClassVar[str] = "magnitude"

    def score(self, weight: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        return weight.abs()


@dataclass
class Wanda(_Prune):
    """Drop the weights of smallest |W_ij| * ||X_j||_2 (Sun et al., 2023), X the linear's calibration inputs."""

    name: ClassVar[str] = "wanda"
    norms_allowed: ClassVar[tuple[str, ...]] = ("sum", "running_mean")

    sink_weight: float = 1.0  # as SparseGPT's: the first token of each window counts this many times in ||X_j||^2
    # How ||X_j||^2 is summed: "running_mean", llm-compressor's float32 running mean of each window's squared
    # norm (see engine.collect_stats), which reproduces its masks; "sum", over every token in float64. The two
    # differ by rounding only (docs/design-decisions.md, "Wanda sums the input norms as a float32 running mean").
    norms: str = "running_mean"

    @property
    def stats(self) -> str:
        return "input_sq_norms" if self.norms == "sum" else "input_sq_norms_running_mean"

    def validate(self) -> None:
        super().validate()
        check_sink_weight(self.sink_weight)
        if self.norms not in self.norms_allowed:
            raise ParamError("norms", f"got {self.norms!r}; allowed: {', '.join(self.norms_allowed)}")

    def score(self, weight: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        return weight.abs() * stats.to(weight.device).float().sqrt()[None, :]


class OBSPruning:
    """SparseGPT's column rule: choose which weights to prune by the OBS saliency w^2 / [H^-1]_jj^2 (with
    H^-1's running Cholesky rows), zero them, keep the others (which the sweep then updates).
    Unstructured: the floor(s * width * out) least salient weights of each block of columns, chosen when the
    block starts; N:M: the N most salient of every M consecutive weights of each row, chosen from the updated
    weights when the sweep reaches the group."""

    def __init__(self, out_features: int, sparsity: float, nm: tuple[int, int] | None):
        self.out_features, self.sparsity, self.nm = out_features, sparsity, nm

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        self.start, self.hinv_diag = start, torch.diag(hinv_block)
        self.prune = torch.zeros_like(block, dtype=torch.bool)  # [out, width]
        if self.nm is None:
            saliency = block**2 / self.hinv_diag[None, :] ** 2
            self.prune.view(-1)[torch.argsort(saliency.flatten())[:int(block.numel() * self.sparsity)]] = True

    def column(self, index: int, ahead: Ahead) -> torch.Tensor:
        i = index - self.start
        if self.nm is not None and i % self.nm[1] == 0:  # choose the group's mask from the updated weights
            n, m = self.nm
            group = ahead.columns(m) ** 2 / self.hinv_diag[i:i + m][None, :] ** 2
            self.prune[:, i:i + m] = ~nm_keep_mask(group, n, m)
        w = ahead.columns(1)[:, 0]
        return torch.where(self.prune[:, i], 0.0, w)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
              damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): prune column by column, moving the columns not yet
    visited to absorb each pruned weight's error through the inverse Hessian H = X^T X (sweep_columns,
    with OBSPruning choosing the mask). weight [out, in] -> pruned weight [out, in], float32."""
    W, H = without_dead_inputs(weight, hessian)
    return sweep_columns(W, inverse_hessian_cholesky(H, damp), OBSPruning(W.shape[0], sparsity, nm), block_size)


@dataclass
class SparseGPT(_Prune):
    """Prune with SparseGPT's OBS updates: the kept weights change to make up for the pruned ones.

    `sink_weight`: the first token of every calibration window counts this many times in the Hessian,
    as in GPTQ (see `compressor.passes.quantize.GPTQ`). 64 by default: it beat 1 at every setting measured
    (docs/design-decisions.md, "SparseGPT counts the first token 64 times")."""

    name: ClassVar[str] = "sparsegpt"
    stats: ClassVar[str | None] = "hessian"

    damp: float = 0.01
    block_size: int = 128
    sink_weight: float = 64.0

    def validate(self) -> None:
        super().validate()
        nm = parse_pattern(self.pattern)
        if nm and self.block_size % nm[1]:
            raise ParamError("block_size", f"must be a multiple of M = {nm[1]} for pattern {self.pattern}")
        check_damp(self.damp)
        check_sink_weight(self.sink_weight)

    @torch.no_grad()
    def apply(self, name: str, linear: nn.Linear, hessian: torch.Tensor, state: LayerState
              ) -> tuple[nn.Module, dict]:
        weight = linear.weight.data
        pruned = sparsegpt(weight.float(), hessian.to(weight.device), self.sparsity or 0.0,
                           parse_pattern(self.pattern), self.damp, self.block_size)
        weight.copy_(pruned.to(weight.dtype))
        return self.pruned(name, linear, state)


def store_sparse(model: nn.Module, records: dict[str, list[dict]]) -> None:
    """Replace every linear that a pruning pass touched last by a SparseLinear, where that stores fewer
    bytes than the dense weight, and note the runtime module in its record."""
    pruners = {Magnitude.name, Wanda.name, SparseGPT.name}
    for name, module_records in records.items():
        last = module_records[-1]
        if last["pass"] not in pruners:
            continue
        linear = model.get_submodule(name)
        sparse = SparseLinear.from_linear(linear, last["pattern"])
        if sparse.storage_bytes() < linear.weight.numel() * linear.weight.element_size():
            model.set_submodule(name, sparse)
            last["runtime"] = sparse.runtime_config()
