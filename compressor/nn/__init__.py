"""Runtime modules that compressed checkpoints are rebuilt from."""

from compressor.nn.quant_linear import QuantLinear

RUNTIME_MODULES = {"QuantLinear": QuantLinear}

__all__ = ["RUNTIME_MODULES", "QuantLinear"]
