"""compressor: post-training compression of Hugging Face causal LMs."""

from compressor.api import compress, evaluate, load, run
from compressor.checkpoint_format import VERSION as __version__
from compressor.errors import CompressorError
from compressor.recipe import load_recipe

__all__ = ["CompressorError", "__version__", "compress", "evaluate", "load", "load_recipe", "run"]
