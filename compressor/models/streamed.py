"""Models larger than memory: the model's structure on the meta device, its tensors read from its safetensors
files one decoder layer at a time.

`open_streamed` builds the model on the meta device (shapes, no tensors) and reads only what lies outside the
decoder layers (embeddings, final norm, head, rotary tables), which every calibration window needs.
`StreamedLayers.load(i)` reads decoder layer i from the memory-mapped files when the engine comes to it, in the
recipe's dtype, and `release(i)` drops it again once the compressed layer is written (compressor/resume.py keeps
each finished layer; checkpoint.save_streamed makes the checkpoint's shards of them). Peak memory is then about
one layer, its calibration activations, and the embeddings and head, whatever the depth of the model.

The files must hold each tensor under the name the model's module has (what save_pretrained writes for most
families); a family whose files transformers converts while loading (fused mixture-of-experts tensors stored
per expert, renamed keys) is refused, naming the tensors not found.
"""

import ctypes
import json
import struct
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from compressor.errors import CompressorError
from compressor.models.adapters import Adapter, adapter_for
from compressor.models.sources import check_causal_lm
from compressor.runtime import weights_in


class SafetensorsFiles:
    """Where each tensor of a model folder lies: tensor name -> file, read from the files' headers."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise CompressorError(f"{folder} has no .safetensors files; streaming reads a model's tensors from them "
                                  "(a model saved with save_pretrained has them)")
        self.headers = {f: read_header(f) for f in self.files}
        self.file_of = {name: f for f, header in self.headers.items() for name in header}

    def element_counts(self) -> Counter:
        """How many elements the files hold in each dtype (safetensors' names: BF16, F32, ...)."""
        counts: Counter = Counter()
        for header in self.headers.values():
            for entry in header.values():
                counts[entry["dtype"]] += int(torch.tensor(entry["shape"], dtype=torch.int64).prod())
        return counts

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as stored (each file memory-mapped; only these tensors are read)."""
        tensors = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for file, in_file in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                tensors |= {name: f.get_tensor(name) for name in in_file}
        return tensors


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> {dtype, shape, data_offsets} (the metadata entry left out)."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def materialize(model: PreTrainedModel, module: nn.Module, prefix: str, files: SafetensorsFiles,
                recurse: bool = True) -> None:
    """Give `module` (named `prefix` in `model`, on the meta device) real CPU tensors: its parameters and
    persistent buffers read from `files` (converted to the module's dtypes), its non-persistent buffers (rotary
    tables, embedding scales) computed as transformers computes them when it loads a model (`_init_weights`)."""
    module.to_empty(device="cpu", recurse=recurse)
    for sub in module.modules() if recurse else [module]:
        if sub._non_persistent_buffers_set:
            model._init_weights(sub)
    own = module.state_dict(keep_vars=True) if recurse else {
        k: v for k, v in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if k not in module._non_persistent_buffers_set}
    names = {prefix + k: k for k in own if prefix + k in files.file_of}  # a tied head: tied again afterwards
    with torch.no_grad():
        for name, tensor in files.read(list(names)).items():
            own[names[name]].copy_(tensor)


class StreamedLayers:
    """The decoder layers of a model opened by `open_streamed`: each read from the files when its turn comes
    (`load`) and dropped once written (`release`)."""

    def __init__(self, model: PreTrainedModel, adapter: Adapter, files: SafetensorsFiles):
        self.model, self.adapter, self.files = model, adapter, files
        self.dense = self.compressed = (0, 0)  # (weights, nonzero weights) of the layers loaded, and released

    def load(self, index: int) -> None:
        layer = self.adapter.decoder_layers(self.model)[index]
        materialize(self.model, layer, f"{self.adapter.layers}.{index}.", self.files)
        self.dense = add(self.dense, weights_in(layer))

    def release(self, index: int) -> None:
        layer = self.adapter.decoder_layers(self.model)[index]
        self.compressed = add(self.compressed, weights_in(layer))
        layer.to("meta")
        release_free_memory()


def release_free_memory() -> None:
    """Hand the memory freed on the heap back to the system (glibc's malloc_trim). Tensors under glibc's mmap
    threshold (up to 32 MB) live on the heap, where what one layer freed is not always reused by the next, so the
    process would otherwise grow layer after layer (docs/design-decisions.md)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library
            pass


def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def open_streamed(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                                              Adapter, StreamedLayers]:
    """The model in `folder` on the meta device, with everything outside its decoder layers read in `dtype`."""
    config = AutoConfig.from_pretrained(str(folder))
    check_causal_lm(config, folder)
    files = SafetensorsFiles(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    tied = set(model.all_tied_weights_keys) if config.tie_word_embeddings else set()
    missing = sorted(set(model.state_dict()) - set(files.file_of) - tied)
    if missing:
        raise CompressorError(f"{folder}: its files do not hold {len(missing)} of the model's tensors under the "
                              f"model's own names (e.g. {', '.join(missing[:3])}): transformers converts this "
                              "family's files while loading, which streaming does not do; run without --stream")
    in_layers = {id(m) for m in adapter.decoder_layers(model).modules()}
    for name, module in model.named_modules():
        if id(module) not in in_layers:
            materialize(model, module, f"{name}." if name else "", files, recurse=False)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(folder)), adapter, StreamedLayers(model, adapter, files)
