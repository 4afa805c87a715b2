"""Runtime modules that compressed checkpoints are rebuilt from."""

from compressor.nn.quant_linear import QuantLinear
from compressor.nn.sparse_linear import SparseLinear

RUNTIME_MODULES = {"QuantLinear": QuantLinear, "SparseLinear": SparseLinear}

__all__ = ["RUNTIME_MODULES", "QuantLinear", "SparseLinear"]
