"""Runtime modules that compressed checkpoints are rebuilt from: class name -> builder(config, old, dtype)."""

import torch
from torch import nn

from compressor.nn.experts import UnfusedExperts, unfuse_experts
from compressor.nn.gguf_linear import GGUFLinear
from compressor.nn.hadamard import RotatedInput, RotatedNorm
from compressor.nn.low_rank_linear import LowRankLinear
from compressor.nn.packed import PackedLinear, unpack_weights
from compressor.nn.quant_linear import QuantLinear
from compressor.nn.sliced import RMSNormOverWidth, Rotation, resize, sliced_layer
from compressor.nn.sparse_linear import SparseLinear

RUNTIME_MODULES = {cls.__name__: cls.from_runtime_config
                   for cls in (QuantLinear, GGUFLinear, SparseLinear, LowRankLinear, RMSNormOverWidth, Rotation,
                               UnfusedExperts, RotatedInput, RotatedNorm)}
RUNTIME_MODULES |= {"Resized": resize, "SlicedLayer": sliced_layer}


def rebuild(model: nn.Module, records: dict[str, list[dict]], dtype: torch.dtype) -> None:
    """Put the runtime module each record names in place of the model's module, in the order of the records (a
    checkpoint's, or a resumed run's finished layers'): the shapes and classes, not yet the tensors."""
    for name, module_records in records.items():
        for runtime in (r["runtime"] for r in module_records if "runtime" in r):  # in the order the passes ran
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, RUNTIME_MODULES[runtime["class"]](runtime, getattr(parent, child, None), dtype))

__all__ = ["RUNTIME_MODULES", "GGUFLinear", "LowRankLinear", "PackedLinear", "QuantLinear",
           "RMSNormOverWidth", "RotatedInput", "RotatedNorm", "Rotation", "SparseLinear", "UnfusedExperts", "rebuild",
           "unfuse_experts", "unpack_weights"]
