"""Runtime modules that compressed checkpoints are rebuilt from: class name -> builder(config, old, dtype)."""

from compressor.nn.experts import UnfusedExperts, unfuse_experts
from compressor.nn.gguf_linear import GGUFLinear
from compressor.nn.low_rank_linear import LowRankLinear
from compressor.nn.packed import PackedLinear, unpack_weights
from compressor.nn.quant_linear import QuantLinear
from compressor.nn.sliced import RMSNormOverWidth, Rotation, resize, sliced_layer
from compressor.nn.sparse_linear import SparseLinear

RUNTIME_MODULES = {cls.__name__: cls.from_runtime_config
                   for cls in (QuantLinear, GGUFLinear, SparseLinear, LowRankLinear, RMSNormOverWidth, Rotation,
                               UnfusedExperts)}
RUNTIME_MODULES |= {"Resized": resize, "SlicedLayer": sliced_layer}

__all__ = ["RUNTIME_MODULES", "GGUFLinear", "LowRankLinear", "PackedLinear", "QuantLinear", "RMSNormOverWidth",
           "Rotation", "SparseLinear", "UnfusedExperts", "unfuse_experts", "unpack_weights"]
