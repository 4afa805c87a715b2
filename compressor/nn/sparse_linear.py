"""SparseLinear: a pruned linear stored compactly.

- unstructured: `mask` uint8 [out, ceil(in/8)], bit j % 8 of byte j // 8 set where weight j of the
  row is kept, and `values` [nnz], the kept weights in row-major order;
- N:M: `values` [out, in*N/M], the N kept weights of every group of M inputs in column order, and
  `indices` int32, their positions inside the group (0..M-1) packed by compressor.formats.pack at
  index_bits(M) bits each (2 bits for M = 4).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressor.formats import pack, packed_words, unpack
from compressor.nn.packed import PackedLinear


def index_bits(m: int) -> int:
    return next(b for b in (2, 3, 4, 8) if 2**b >= m)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in/8)], little-endian bits."""
    out_features, in_features = mask.shape
    padded = F.pad(mask.to(torch.uint8), (0, -in_features % 8)).reshape(out_features, -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :in_features].bool()


class SparseLinear(PackedLinear):
    """y = x W^T + bias with W rebuilt from its kept values (PackedLinear: on every call, or once)."""

    def __init__(self, in_features: int, out_features: int, pattern: str, nnz: int = 0, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.pattern = in_features, out_features, pattern
        # N:M as integers, parsed once (None for unstructured)
        self.nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
        if self.nm is None:
            self.register_buffer("mask", torch.zeros(out_features, math.ceil(in_features / 8), dtype=torch.uint8))
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
        else:
            n, m = self.nm
            kept = in_features // m * n
            self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype))
            self.register_buffer("indices", torch.zeros(out_features, packed_words(kept, index_bits(m)),
                                                        dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: str) -> "SparseLinear":
        w = linear.weight.data
        if pattern == "unstructured":
            keep = w != 0
            module = cls(linear.in_features, linear.out_features, pattern, int(keep.sum()),
                         linear.bias is not None, w.dtype)
            module.mask.copy_(pack_mask(keep))
            module.values.copy_(w[keep])
        else:
            module = cls(linear.in_features, linear.out_features, pattern, 0, linear.bias is not None, w.dtype)
            n, m = module.nm
            groups = w.reshape(w.shape[0], -1, m)
            if ((groups != 0).sum(-1) > n).any():
                raise ValueError(f"weight does not follow the {pattern} pattern; it cannot be stored as {pattern}")
            idx = torch.topk(groups.abs(), n, dim=2).indices.sort(dim=2).values  # the kept positions
            module.values.copy_(torch.gather(groups, 2, idx).reshape(w.shape[0], -1))
            module.indices.copy_(pack(idx.reshape(w.shape[0], -1), index_bits(m)))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module.to(w.device)

    def weight_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.values.dtype
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
        if self.pattern == "unstructured":
            w[unpack_mask(self.mask, self.in_features)] = self.values.to(dtype)
            return w
        n, m = self.nm
        idx = unpack(self.indices, index_bits(m), self.values.shape[1]).long().reshape(self.out_features, -1, n)
        groups = w.reshape(self.out_features, -1, m)
        groups.scatter_(2, idx, self.values.to(dtype).reshape(self.out_features, -1, n))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        semi = self.__dict__.get("semi_structured")
        if semi is not None and x.is_cuda and x.dtype == semi.dtype:
            y = F.linear(x.reshape(-1, self.in_features), semi).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.weight_for(x), self.bias)

    def runtime_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_dense(dtype)

    def use_semi_structured(self) -> bool:
        """Hold a 2:4 weight as PyTorch's semi-structured sparse tensor, so that forward runs on the sparse
        tensor cores of a CUDA GPU of compute capability 8.0+ (float16 or bfloat16). Returns whether it did;
        the packed buffers stay the checkpoint's storage either way."""
        if self.nm != (2, 4) or not self.values.is_cuda or self.values.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.cuda.get_device_capability(self.values.device) < (8, 0):
            return False
        from torch.sparse import to_sparse_semi_structured

        self.__dict__["semi_structured"] = to_sparse_semi_structured(self.weight_dense())
        self.pack()  # the semi-structured tensor replaces the unpacked weight
        return True

    def weight_counts(self) -> tuple[int, int]:
        w = self.weight_dense()
        return w.numel(), int(torch.count_nonzero(w))

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def runtime_config(self) -> dict:
        config = {"class": "SparseLinear", "pattern": self.pattern, "bias": self.bias is not None}
        return config | ({"nnz": self.values.numel()} if self.pattern == "unstructured" else {})

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module, dtype: torch.dtype):
        in_features, out_features = old.in_features, old.out_features
        return cls(in_features, out_features, config["pattern"], config.get("nnz", 0), config["bias"], dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pattern={self.pattern}"
