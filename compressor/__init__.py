"""compressor: post-training compression of Hugging Face causal LMs."""

__version__ = "0.1.0"

from compressor.api import compress, evaluate, load, run  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.recipe import load_recipe  # noqa: E402

__all__ = ["CompressorError", "__version__", "compress", "evaluate", "load", "load_recipe", "run"]
