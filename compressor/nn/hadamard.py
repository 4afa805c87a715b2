"""What a rotated model (compressor/passes/rotate.py) is rebuilt from.

- `Hadamard`: x -> x Q with Q = diag(s) (I_m (x) H_b) / sqrt(b), an orthogonal matrix of width n = m * b: random
  signs s, then the Walsh-Hadamard matrix H_b of the largest power of two b that divides n on each of the m blocks
  of b consecutive coordinates. For a power-of-two width that is one randomized Hadamard transform over the whole
  vector; for others (576 = 9 x 64) the coordinates mix within blocks of b. Computed with the fast transform
  (n log2 b additions), in float32 whatever the model's dtype; the signs are the only stored numbers.
- `RotatedInput`: a linear whose weight was stored as W Q and whose input is rotated as it arrives:
  y = (x Q) (W Q)^T = x W^T.
- `RotatedNorm`: a norm whose weight is not folded into a linear, applied in the original basis and writing the
  rotated one: norm(x Q^T) Q for the final norm and Gemma's input norms (they read the rotated stream), norm(x) Q
  for Gemma's norms on each block's output (they read the block's unrotated output).
"""

import torch
from torch import nn


def largest_power_of_two_dividing(n: int) -> int:
    return n & -n


def walsh_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> x (I (x) H_block) / sqrt(block), the Sylvester Hadamard matrix on each block of `block`
    consecutive coordinates (block a power of two dividing n)."""
    shape = x.shape
    h = 1
    while h < block:
        x = x.reshape(*shape[:-1], -1, 2, h)  # pairs of coordinates h apart, inside blocks of 2h
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape) / block**0.5


class Hadamard(nn.Module):
    """x -> x Q, Q = diag(signs) (I (x) H_block) / sqrt(block): a randomized Hadamard rotation of width n."""

    def __init__(self, width: int, signs: torch.Tensor | None = None):
        super().__init__()
        self.width, self.block = width, largest_power_of_two_dividing(width)
        self.register_buffer("signs", torch.ones(width) if signs is None else signs.float().clone())

    @classmethod
    def random(cls, width: int, generator: torch.Generator) -> "Hadamard":
        return cls(width, torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return walsh_hadamard(x.float() * self.signs.float(), self.block).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x -> x Q^T (H is symmetric, so Q^T = (I (x) H) diag(signs) / sqrt(block))."""
        return (walsh_hadamard(x.float(), self.block) * self.signs.float()).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """Q [n, n] in float64, for folding into weights."""
        eye = torch.eye(self.width, dtype=torch.float64, device=self.signs.device)
        return walsh_hadamard(eye * self.signs.double(), self.block)

    def extra_repr(self) -> str:
        return f"width={self.width}, block={self.block}"


class RotatedInput(nn.Module):
    """y = linear(x Q): the linear's weight holds W Q, so the pair computes x W^T."""

    def __init__(self, rotation: Hadamard, linear: nn.Module):
        super().__init__()
        self.rotation, self.linear = rotation, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotation(x))

    def runtime_config(self) -> dict:
        return {"class": "RotatedInput", "width": self.rotation.width}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype) -> "RotatedInput":
        return cls(Hadamard(config["width"]), old)


class RotatedNorm(nn.Module):
    """The original norm (weights and all) writing into a rotated stream: norm(x) Q, or norm(x Q^T) Q when its input
    is rotated too (`reads_rotated`)."""

    def __init__(self, rotation: Hadamard, norm: nn.Module, reads_rotated: bool):
        super().__init__()
        self.rotation, self.norm, self.reads_rotated = rotation, norm, reads_rotated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.norm(self.rotation.inverse(x) if self.reads_rotated else x))

    def runtime_config(self) -> dict:
        return {"class": "RotatedNorm", "width": self.rotation.width, "reads_rotated": self.reads_rotated}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype) -> "RotatedNorm":
        return cls(Hadamard(config["width"]), old, config["reads_rotated"])
