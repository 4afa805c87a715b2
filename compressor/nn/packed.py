"""PackedLinear: what QuantLinear and SparseLinear share, a weight stored in another form than a dense matrix.

Their forward computes y = x W^T + bias with W rebuilt from the stored form (codes and scales, kept values
and their positions). Two ways to run it:
- packed (`unpacked = False`): W is rebuilt on every call, so only the stored form stays in memory;
- unpacked (`unpacked = True`, what `compressor.load` gives by default): W is rebuilt once, in the dtype and
  on the device of the inputs, and kept beside the stored form, so each call costs a dense matmul.
The unpacked weight is runtime state, never saved; moving or casting the module drops it, and the next call
builds it again where the module now is.
"""

import torch
from torch import nn


class PackedLinear(nn.Module):
    unpacked: bool = False

    def runtime_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] the stored form stands for, in `dtype`, as the forward uses it."""
        raise NotImplementedError

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight to multiply x by: rebuilt now (packed), or the one kept (unpacked)."""
        if not self.unpacked:
            return self.runtime_weight(x.dtype)
        weight = self.__dict__.get("_unpacked_weight")
        if weight is None or weight.dtype != x.dtype or weight.device != x.device:
            weight = self.__dict__["_unpacked_weight"] = self.runtime_weight(x.dtype)
        return weight

    def unpack(self, dtype: torch.dtype) -> None:
        """Run unpacked from now on, building the weight in `dtype` at once."""
        self.unpacked = True
        self.__dict__["_unpacked_weight"] = self.runtime_weight(dtype)

    def pack(self) -> None:
        """Run packed from now on, dropping the unpacked weight."""
        self.unpacked = False
        self.__dict__.pop("_unpacked_weight", None)

    def has_kernel(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this device runs the packed form directly, with no need to unpack (QuantLinear on CUDA)."""
        return False

    def unpacked_bytes(self, dtype: torch.dtype) -> int:
        """Memory the unpacked weight takes in `dtype`."""
        return self.in_features * self.out_features * torch.finfo(dtype).bits // 8

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: the kept weight is where it was
        self.__dict__.pop("_unpacked_weight", None)
        return super()._apply(fn, recurse)


def unpack_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Unpack (in `dtype`) every PackedLinear of `model` whose device has no kernel for its packed form;
    return how many were unpacked."""
    unpacked = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            device = next(module.buffers()).device
            if not module.has_kernel(dtype, device):
                module.unpack(dtype)
                unpacked += 1
    return unpacked
