"""Load a causal LM and its tokenizer from any supported source, with its architecture adapter."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from compressor.errors import CompressorError
from compressor.models.adapters import ADAPTERS, Adapter, adapter_for
from compressor.models.sources import BUNDLED, load_pretrained, resolve
from compressor.models.streamed import SafetensorsFiles, StreamedLayers, open_streamed
from compressor.nn import unfuse_experts
from compressor.runtime import available_memory


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    source: str
    folder: Path | None  # local folder the weights came from (None for a hub id)
    streamed: StreamedLayers | None = None  # the decoder layers, read from `folder` one at a time (stream=True)


def load_model(source: str, dtype: str = "float32", stream: bool = False) -> LoadedModel:
    """Load `source` (bundled:NAME, folder, .gguf, hub id) on the CPU in `dtype`, mixture-of-experts experts split
    into linears (compressor/nn/experts.py: the same function, and what the passes reach). With `stream`, only
    what lies outside the decoder layers is read; the layers are read one at a time as the engine comes to them
    (compressor/models/streamed.py)."""
    location = resolve(source)
    if stream:
        if not isinstance(location, Path):
            raise CompressorError(f"--stream reads a local model folder's safetensors files; {source!r} is a hub id: "
                                  "download it first (huggingface-cli download) and give the folder")
        model, tokenizer, adapter, streamed = open_streamed(location, getattr(torch, dtype))
        return LoadedModel(model, tokenizer, adapter, source, location, streamed)
    check_fits_in_memory(location, dtype)
    model, tokenizer = load_pretrained(location, getattr(torch, dtype))
    unfuse_experts(model)
    adapter = adapter_for(model)
    return LoadedModel(model, tokenizer, adapter, source, location if isinstance(location, Path) else None)


def check_fits_in_memory(location: Path | str, dtype: str) -> None:
    """Refuse, before loading, a local model whose weights in `dtype` need more memory than this machine has
    available, rather than let the system kill the process: streaming needs about one decoder layer."""
    if not isinstance(location, Path) or not any(location.glob("*.safetensors")):
        return
    need = sum(SafetensorsFiles(location).element_counts().values()) * getattr(torch, dtype).itemsize
    free = available_memory()
    if free is not None and need > free:
        raise CompressorError(f"{location} takes {need / 2**30:.1f} GiB in {dtype}, more than the "
                              f"{free / 2**30:.1f} GiB of memory available: run with --stream (compress run), which "
                              "reads one decoder layer at a time and writes it out when done")


__all__ = ["ADAPTERS", "BUNDLED", "Adapter", "LoadedModel", "adapter_for", "load_model"]
