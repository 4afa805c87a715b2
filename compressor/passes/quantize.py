"""Weight-only integer quantization: round-to-nearest (RTN) and GPTQ (Frantar et al., 2022).

Grid, per group of input columns of one output row, with maxq = 2^bits - 1:
  symmetric:  scale = 2 max|w| / maxq, zero = 2^(bits-1)        (GPTQ's symmetric grid)
  asymmetric: scale = (max(w, 0) - min(w, 0)) / maxq, zero = round(-min(w, 0) / scale)
  q = clamp(round(w / scale) + zero, 0, maxq);  w_hat = (q - zero) * scale
Scales are rounded to their storage dtype (float16) before the codes are chosen, so the stored
tensors reproduce exactly the weights the pass measured. A group size that does not divide the
input width leaves a shorter last group (SmolLM2's 576 inputs with groups of 128: 4 x 128 + 64).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.formats import SUPPORTED_BITS, pack
from compressor.gguf_blocks import BlockGrid, BlockType, encode
from compressor.nn import GGUFLinear, QuantLinear
from compressor.passes import gguf_grid
from compressor.passes.base import LayerState, ParamError, Pass, Quantized, check_sink_weight
from compressor.passes.hessian import check_damp, inverse_hessian_cholesky, without_dead_inputs
from compressor.passes.sweep import Ahead, sweep_columns

SCALE_DTYPE = torch.float16


# Range shrink factors tried by `clip_search`: 1.0, 0.95, ..., 0.5.
SHRINKS = [1.0 - 0.05 * i for i in range(11)]


def grid(w: torch.Tensor, bits: int, symmetric: bool, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out] for the columns w [out, n] of one group. With `clip_search`, each row's
    range is shrunk by the factor in SHRINKS that gives the least squared error of the rounded weights
    (the weights beyond the shrunk range are clipped): GPTQ's `mse` option, llm-compressor's MSE observer."""
    scale, zero = shrunk_grid(w, bits, symmetric, 1.0)
    if not clip_search:
        return scale, zero
    best = _rounding_error(w, scale, zero, bits)
    for shrink in SHRINKS[1:]:
        s, z = shrunk_grid(w, bits, symmetric, shrink)
        error = _rounding_error(w, s, z, bits)
        better = error < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(error, best)
    return scale, zero


def shrunk_grid(w: torch.Tensor, bits: int, symmetric: bool, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the module docstring over the range of w [out, n] times `shrink`."""
    maxq = 2**bits - 1
    if symmetric:
        scale = 2 * shrink * w.abs().amax(1) / maxq
        scale = torch.where(scale == 0, 1.0, scale).to(SCALE_DTYPE).float()
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    lo, hi = shrink * w.amin(1).clamp(max=0), shrink * w.amax(1).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / maxq, 1.0).to(SCALE_DTYPE).float()
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error per row [out] of w [out, n] rounded on the grid (scale, zero) [out]."""
    w_hat = (to_codes(w, scale, zero, bits) - zero[:, None]) * scale[:, None]
    return (w_hat - w).pow(2).sum(1)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for w [out, n] (or [out]) given per-row scale and zero [out]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_search: bool = False):
    """Round to nearest, group by group. weight [out, in] -> codes [out, in], scales, zeros [out, groups]."""
    out_features, in_features = weight.shape
    codes = torch.empty_like(weight)
    scales, zeros = [], []
    for start in range(0, in_features, group_size):
        w = weight[:, start:start + group_size]
        scale, zero = grid(w, bits, symmetric, clip_search)
        codes[:, start:start + group_size] = to_codes(w, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


class GridRounding:
    """GPTQ's column rule: round each column to its group's grid, leave the weights in `pruned` at zero.
    With static groups the grids [out, groups] are given up front; otherwise each group's grid is set from the
    error-updated weights when the sweep reaches the group's first column. `codes` [out, in] collects the codes."""

    def __init__(self, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor, pruned: torch.Tensor,
                 bits: int, group_size: int, symmetric: bool, clip_search: bool, static_groups: bool):
        self.scales, self.zeros, self.perm, self.pruned = scales, zeros, perm, pruned
        self.bits, self.group_size, self.symmetric, self.clip_search = bits, group_size, symmetric, clip_search
        self.static_groups = static_groups
        self.codes = torch.zeros_like(pruned, dtype=torch.float32)

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def column(self, index: int, ahead: Ahead) -> torch.Tensor:
        col = int(self.perm[index])
        g = col // self.group_size
        scale, zero = self.scales[:, g], self.zeros[:, g]
        if not self.static_groups and col % self.group_size == 0:  # group starts: grid from the updated weights
            scale[:], zero[:] = grid(ahead.columns(self.group_size), self.bits, self.symmetric, self.clip_search)
        w = ahead.columns(1)[:, 0]
        q = torch.where(self.pruned[:, index], zero, to_codes(w, scale, zero, self.bits))
        self.codes[:, index] = q
        return (q - zero) * scale


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False, clip_search: bool = False,
         pruned: torch.Tensor | None = None):
    """GPTQ: quantize columns one at a time, spreading each column's error over the columns not yet
    quantized through the inverse Hessian H = X^T X of the layer's calibration inputs (sweep_columns).

    weight [out, in], hessian [in, in] (float32 sums; the scale of H does not matter).
    With act_order, columns go in order of decreasing H_jj; group grids are then fixed from the
    original weights up front ("static groups"), so codes stay in the original column order and
    the runtime needs no permutation. `pruned` [out, in] (bool): weights an earlier pass pruned, which
    stay zero. Other weights that happen to be zero are quantized and updated like any other.
    Returns codes [out, in], scales and zeros [out, groups].
    """
    W, H = without_dead_inputs(weight, hessian)
    pruned = torch.zeros_like(W, dtype=torch.bool) if pruned is None else pruned
    out_features, in_features = W.shape
    n_groups = -(-in_features // group_size)
    scales = torch.zeros(out_features, n_groups, device=W.device)
    zeros = torch.zeros_like(scales)
    if act_order:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid(W[:, g * group_size:(g + 1) * group_size], bits, symmetric, clip_search)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(in_features, device=W.device)
    W, H, pruned = W[:, perm], H[perm][:, perm], pruned[:, perm]
    rule = GridRounding(scales, zeros, perm, pruned, bits, group_size, symmetric, clip_search, act_order)
    sweep_columns(W, inverse_hessian_cholesky(H, damp), rule, block_size)
    return rule.codes[:, torch.argsort(perm)], scales, zeros


def rtn_blocks(t: BlockType, weight: torch.Tensor, keep_zero: torch.Tensor | None) -> tuple[BlockGrid, torch.Tensor]:
    """Round to nearest on GGUF block grids fitted to weight [out, in] (compressor/passes/gguf_grid.py);
    `keep_zero` [out, in]: weights that stay exactly 0 (code 0 of a symmetric type). Returns the grid and codes."""
    grid = gguf_grid.fit_grid(t, weight, torch.ones(weight.shape[1]))
    codes = gguf_grid.to_codes(t, weight, *gguf_grid.group_scale_offset(t, grid))
    return grid, codes if keep_zero is None else codes.masked_fill(keep_zero, 0)


def gptq_blocks(t: BlockType, weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int,
                act_order: bool, keep_zero: torch.Tensor | None) -> tuple[BlockGrid, torch.Tensor]:
    """GPTQ on GGUF block grids: the grids are fitted to the original weight [out, in] first, weighted by the
    Hessian's diagonal (as llama.cpp weights by its importance matrix), then fixed while the columns are rounded,
    so every code lands on a point the GGUF block can hold. Returns the grid and codes [out, in]."""
    grid = gguf_grid.fit_grid(t, weight.cpu(), torch.diag(hessian).cpu())
    W, H = without_dead_inputs(weight, hessian)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1], device=W.device)
    s, b = (v.to(W.device) for v in gguf_grid.group_scale_offset(t, grid))
    rule = gguf_grid.BlockRounding(t, s, b, perm, keep_zero)
    sweep_columns(W[:, perm], inverse_hessian_cholesky(H[perm][:, perm], damp), rule, block_size)
    return grid, rule.codes


@dataclass
class _Quantize(Pass):
    bits: int = 4
    group_size: int | None = 128  # None: one group per output row ("per channel")
    symmetric: bool = True
    clip_search: bool = False  # shrink each group's range where that lowers the rounding error (grid())
    gguf: str | None = None  # a GGUF block type or llama.cpp file type instead of bits/group_size (gguf_grid.py)

    accepts: ClassVar[tuple[str, ...]] = ("dense", "pruned")

    @property
    def produces(self) -> str:  # GGUF blocks keep no float weight for lrec to correct
        return "gguf" if self.gguf else "quantized"

    def validate(self) -> None:
        if self.gguf is not None:
            gguf_grid.check_spec(self.gguf)
        if self.bits not in SUPPORTED_BITS:
            raise ParamError("bits", f"got {self.bits}; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size is not None and self.group_size <= 0:
            raise ParamError("group_size", f"got {self.group_size}; use a positive integer (32, 64, 128, ...) "
                                           "or null for one group per output channel")

    def quantize(self, weight: torch.Tensor, stats, group_size: int, pruned: torch.Tensor | None):
        """Codes, scales and zeros for weight [out, in]; the weights in `pruned` [out, in] (or None) must stay 0."""
        raise NotImplementedError

    def quantize_blocks(self, t: BlockType, weight: torch.Tensor, stats, keep_zero: torch.Tensor | None):
        """The GGUF grid and codes [out, in] for weight [out, in] in block type t."""
        raise NotImplementedError

    def frozen_zeros(self, was_pruned: bool, weight: torch.Tensor) -> torch.Tensor | None:
        """The weights [out, in] that must stay exactly 0 (None: none): those a pruning pass zeroed; a dense
        weight's zeros (common in models dequantized from GGUF) are weights like any other."""
        return (weight == 0) if was_pruned else None

    @torch.no_grad()
    def apply(self, name: str, linear: nn.Linear, stats, state: LayerState) -> tuple[nn.Module, dict]:
        weight = linear.weight.data.float()
        if not torch.isfinite(weight).all():
            raise CompressorError(f"{self.name}: {name} has NaN or Inf weights; the model is broken before "
                                  "compression")
        if self.gguf:
            return self.apply_gguf(name, linear, weight, stats, state)
        group_size = self.group_size or linear.in_features
        q = QuantLinear(linear.in_features, linear.out_features, self.bits, group_size, linear.bias is not None,
                        SCALE_DTYPE, linear.weight.dtype).to(linear.weight.device)

        pruned = self.frozen_zeros(name in state.pruned, weight)

        def requantize(target: torch.Tensor) -> None:  # quantize target [out, in] into q's codes
            target = target if pruned is None else target.masked_fill(pruned, 0)
            codes, scales, zeros = self.quantize(target, stats, group_size, pruned)
            q.qweight.copy_(pack(codes.long(), self.bits))
            q.scales.copy_(scales)
            q.zeros.copy_(zeros)

        requantize(weight)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        state.quantized[name] = Quantized(weight, requantize)  # for lrec and lrec_refine on this layer
        error = (q.weight_dequantized(torch.float32) - weight).norm() / weight.norm().clamp_min(1e-12)
        return q, {"pass": self.name, "bits": self.bits, "group_size": group_size, "symmetric": self.symmetric,
                   "clip_search": self.clip_search, "frozen_zeros": 0 if pruned is None else int(pruned.sum()),
                   "weights": weight.numel(), "bits_per_weight": round(q.bits_per_weight(), 4),
                   "relative_weight_error": error.item(),
                   "runtime": q.runtime_config()}

    def apply_gguf(self, name: str, linear: nn.Linear, weight: torch.Tensor, stats, state: LayerState
                   ) -> tuple[nn.Module, dict]:
        """Quantize onto the GGUF block type this linear gets (gguf_grid.tensor_type); a width no block divides
        stays in float, as llama.cpp keeps it."""
        t = gguf_grid.tensor_type(self.gguf, name, linear.in_features, state.config)
        if t is None:
            return linear, {"pass": self.name, "gguf": self.gguf, "gguf_type": None,
                            "kept_float": f"no GGUF block divides its {linear.in_features} inputs"}
        keep_zero = self.frozen_zeros(name in state.pruned, weight)
        if keep_zero is not None and t.affine:
            raise CompressorError(f"{self.name}: {name} has weights that must stay 0, which {t.name}'s grid (a "
                                  "scale and a min) cannot hold; use a symmetric type (Q8_0, Q5_0, Q4_0, Q6_K, Q3_K)")
        grid, codes = self.quantize_blocks(t, weight, stats, keep_zero)
        g = GGUFLinear(linear.in_features, linear.out_features, t.name, linear.bias is not None, linear.weight.dtype)
        g.qweight.copy_(encode(t, grid, codes.cpu()))
        g = g.to(linear.weight.device)
        if linear.bias is not None:
            g.bias.data.copy_(linear.bias.data)
        error = (g.runtime_weight(torch.float32) - weight).norm() / weight.norm().clamp_min(1e-12)
        return g, {"pass": self.name, "gguf": self.gguf, "gguf_type": t.name, "symmetric": not t.affine,
                   "frozen_zeros": 0 if keep_zero is None else int(keep_zero.sum()), "weights": weight.numel(),
                   "bits_per_weight": t.bits_per_weight, "relative_weight_error": error.item(),
                   "runtime": g.runtime_config()}


@dataclass
class RTN(_Quantize):
    """Round each weight to the nearest point of its group's grid."""

    name: ClassVar[str] = "rtn"

    def quantize(self, weight, stats, group_size, pruned):  # a zero weight rounds to exactly zero on every grid
        return rtn(weight, self.bits, group_size, self.symmetric, self.clip_search)

    def quantize_blocks(self, t, weight, stats, keep_zero):
        return rtn_blocks(t, weight.cpu(), None if keep_zero is None else keep_zero.cpu())


@dataclass
class GPTQ(_Quantize):
    """GPTQ with damping, lazy block updates and act-order with static groups (the default).

    `sink_weight`: the first token of every calibration window counts this many times in the Hessian.
    Every later token attends to that token (the attention sink), yet with weight 1 it is one row in
    2048 and GPTQ moves error onto it. It helps at 4 bits and hurts at 3, so the default stays 1 and the
    W4 recipes set 64.

    `clip_search` is on by default here (off for RTN): it lowered GPTQ's perplexity at 4, 3 and 2 bits.

    `keep_zeros` keeps every weight that is exactly 0 at 0, pruned or not. A model dequantized from GGUF
    has many such zeros (the GGUF's own grids put small weights there); left free, GPTQ moves them, which
    lowers each linear's calibration output error, yet freezing them did better end to end at 2 bits on
    one model. Off by default.

    The measurements behind each default: docs/design-decisions.md (the GPTQ sections)."""

    name: ClassVar[str] = "gptq"
    stats: ClassVar[str | None] = "hessian"

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    sink_weight: float = 1.0
    clip_search: bool = True
    keep_zeros: bool = False

    def validate(self) -> None:
        super().validate()
        check_damp(self.damp)
        check_sink_weight(self.sink_weight)
        if self.block_size <= 0:
            raise ParamError("block_size", f"got {self.block_size}; use a positive integer such as 128")

    def frozen_zeros(self, was_pruned, weight):
        return (weight == 0) if self.keep_zeros else super().frozen_zeros(was_pruned, weight)

    def quantize(self, weight, hessian, group_size, pruned):
        return gptq(weight, hessian.to(weight.device), self.bits, group_size, self.symmetric, self.damp,
                    self.block_size, self.act_order, self.clip_search, pruned)

    def quantize_blocks(self, t, weight, hessian, keep_zero):
        grid, codes = gptq_blocks(t, weight, hessian.to(weight.device), self.damp, self.block_size, self.act_order,
                                  keep_zero)
        return grid, codes.cpu()
