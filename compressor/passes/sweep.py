"""The column sweep that GPTQ, SparseGPT and LREC's rounding share (Frantar et al.'s OBS update).

Columns of W [out, in] are visited in order. A rule decides each column's new value q (rounded to a
grid, or with some weights pruned to zero); its error, scaled by the inverse Hessian's Cholesky row,
is spread over the columns not yet visited, so that they absorb it:

    err = (w_i - q_i) / U_ii          U = chol((H + damp I)^-1), upper
    W[:, j] -= err * U_ij             for every j > i

Within a block of columns the update is applied column by column; to the columns after the block it
is applied once, as one matmul (GPTQ's lazy batch update). The rule sees the block and the weights
ahead of the current column as the update has left them.
"""

from typing import Protocol

import torch


class ColumnRule(Protocol):
    """What a method does to the columns: the only part of the sweep that differs between methods."""

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        """Called before the columns start .. start + width of a block are visited (block: [out, width])."""

    def column(self, index: int, ahead: "Ahead") -> torch.Tensor:
        """The new value [out] of column `index` (its current value is ahead.columns(1)[:, 0])."""


class Ahead:
    """The not yet visited columns, from the current one on, as the update has left them."""

    def __init__(self, W: torch.Tensor, block: torch.Tensor, offset: int, block_end: int):
        self.W, self.block, self.offset, self.block_end = W, block, offset, block_end

    def columns(self, n: int) -> torch.Tensor:
        """The next n columns [out, n] (fewer at the end of the matrix)."""
        here = self.block[:, self.offset:]
        if here.shape[1] >= n:
            return here[:, :n]
        return torch.cat([here, self.W[:, self.block_end:]], dim=1)[:, :n]


def sweep_columns(W: torch.Tensor, Hinv: torch.Tensor, rule: ColumnRule, block_size: int) -> torch.Tensor:
    """Visit the columns of W [out, in] (float32, changed in place) with `rule`, spreading each column's error
    through Hinv [in, in] (inverse_hessian_cholesky); return W with every column at its rule's value."""
    in_features = W.shape[1]
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # [out, b], [b, b]
        Err1 = torch.zeros_like(W1)
        rule.begin_block(i1, W1, Hinv1)
        ahead = Ahead(W, W1, 0, i2)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            ahead.offset = i
            q = rule.column(i1 + i, ahead)
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W
