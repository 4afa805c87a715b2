"""compressor: post-training compression of Hugging Face causal LMs.

The API (`compress`, `load`, `evaluate`, `run`, `load_recipe`) is imported on first use, so that the
`compress` command answers `--help` and argument errors without loading torch and transformers.
"""

import importlib

from compressor.checkpoint_format import VERSION as __version__
from compressor.errors import CompressorError

_LAZY = {"compress": "compressor.api", "evaluate": "compressor.api", "load": "compressor.api",
         "run": "compressor.api", "load_recipe": "compressor.recipe"}

__all__ = ["CompressorError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
