"""Load a causal LM and its tokenizer from any supported source, with its architecture adapter."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from compressor.models.adapters import ADAPTERS, Adapter, adapter_for
from compressor.models.sources import BUNDLED, load_pretrained, resolve
from compressor.nn import unfuse_experts


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    source: str
    folder: Path | None  # local folder the weights came from (None for a hub id)


def load_model(source: str, dtype: str = "float32") -> LoadedModel:
    """Load `source` (bundled:NAME, folder, .gguf, hub id) on the CPU in `dtype`, mixture-of-experts experts split
    into linears (compressor/nn/experts.py: the same function, and what the passes reach)."""
    location = resolve(source)
    model, tokenizer = load_pretrained(location, getattr(torch, dtype))
    unfuse_experts(model)
    adapter = adapter_for(model)
    return LoadedModel(model, tokenizer, adapter, source, location if isinstance(location, Path) else None)


__all__ = ["ADAPTERS", "BUNDLED", "Adapter", "LoadedModel", "adapter_for", "load_model"]
