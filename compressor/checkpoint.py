"""Save and load compressed checkpoints.

A checkpoint is a Hugging Face model folder (config.json, safetensors weights, tokenizer) whose
config.json also holds `compression_config`: the resolved recipe, what each pass did to each
module, and the versions of the tools. It is written to a temporary folder beside the target and
renamed into place only when complete.
"""

import json
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from compressor.checkpoint_format import FORMAT_VERSION, VERSION, read_compression_config
from compressor.errors import CompressorError, CompressorWarning
from compressor.models.streamed import read_header
from compressor.nn import PackedLinear, rebuild, unpack_weights
from compressor.runtime import is_out_of_memory


def versions() -> dict[str, str]:
    return {"compressor": VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_output(output: str | Path, overwrite: bool) -> None:
    out = Path(output)
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; choose another `output` or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output {out} exists and is not a folder")


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: str | Path,
         compression_config: dict, overwrite: bool = False) -> Path:
    """Write the checkpoint atomically; refuse an existing folder unless `overwrite`."""
    out = Path(output)
    check_output(out, overwrite)
    with folder_in_place(out) as tmp:
        # the tensors as the model holds them (load reads them back one to one), not converted back to a family's
        # older layout (transformers 5 would write fused experts [experts, out, in] as one tensor per expert)
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
        finish_folder(tmp, tokenizer, compression_config)
    return out


def save_streamed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: str | Path,
                  compression_config: dict, layer_files: list[Path], layers: str, overwrite: bool = False) -> Path:
    """Write the checkpoint of a streamed run (compressor/models/streamed.py), whose decoder layers are no longer in
    memory: each finished layer's file (its tensors under their full names) becomes one shard, hard-linked where
    the filesystem allows; the tensors outside the layers go into the last shard; an index names each tensor's
    shard, as save_pretrained's sharded checkpoints do. Atomic, as `save` is."""
    out = Path(output)
    check_output(out, overwrite)
    shards = len(layer_files) + 1
    name = "model-{:05d}-of-{:05d}.safetensors".format
    with folder_in_place(out) as tmp:
        weight_map, total = {}, 0
        for i, file in enumerate(layer_files):
            link_or_copy(file, tmp / name(i + 1, shards))
            for key, entry in read_header(file).items():
                weight_map[key] = name(i + 1, shards)
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        rest, seen = {}, set()
        for key, tensor in model.state_dict().items():
            if not key.startswith(layers + ".") and tensor.data_ptr() not in seen:  # a tied head is stored once
                seen.add(tensor.data_ptr())
                rest[key] = tensor.contiguous()
        save_file(rest, tmp / name(shards, shards), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(rest, name(shards, shards))
        total += sum(t.numel() * t.element_size() for t in rest.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        finish_folder(tmp, tokenizer, compression_config)
    return out


def finish_folder(folder: Path, tokenizer: PreTrainedTokenizerBase, compression_config: dict) -> None:
    """Add the tokenizer to a model folder, and `compression_config` (with the format and tool versions) to its
    config.json: what makes the folder a checkpoint."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["compression_config"] = {"format_version": FORMAT_VERSION, **compression_config, "versions": versions()}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, target)


@contextmanager
def folder_in_place(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into, renamed to `out` (replacing it) when the block completes and
    removed if it fails: a reader never sees a half-written `out`. A write that fails (a full disk) is reported as
    such, with nothing left behind."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as error:
        raise CompressorError(f"could not write {out} ({error}); nothing was written there: free space (or choose "
                              "another output) and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str | Path, device: str | torch.device = "cpu", keep_packed: bool = False) -> PreTrainedModel:
    """Load a compressed checkpoint as a working model (forward and generate). Quantized and pruned linears
    are unpacked once into dense weights where the device has no kernel for their packed form, so each call
    costs what the dense model's does (compressor/nn/packed.py); `keep_packed` keeps only the packed form
    in memory and rebuilds each weight on every call instead (less memory, slower)."""
    model = build(path)
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CompressorError(f"{path}: weights do not match the model its config describes "
                              f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model = model.to(device).eval()
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if keep_packed and not packed:
        warnings.warn(f"keep_packed: {path} has no packed weights (no quantized or pruned linears); it loads "
                      "as it would without", CompressorWarning, stacklevel=2)
    if not keep_packed and packed:
        try:
            unpack_weights(model, model.dtype)
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            need = sum(m.unpacked_bytes(model.dtype) for m in packed)
            raise CompressorError(f"{path}: unpacking the quantized and pruned weights needs {need / 1e6:.0f} MB "
                                  f"more on {device}, which it does not have; load with keep_packed=True (`compress "
                                  "eval --keep-packed`) to run from the packed weights (less memory, slower)") from None
    return model


def build(path: str | Path) -> PreTrainedModel:
    """The checkpoint's model with its runtime modules in place and its weights not yet loaded (built under
    `torch.device("meta")`, it has the shapes only)."""
    cc = read_compression_config(path)
    if cc is None:
        raise CompressorError(f"{path} is not a compressor checkpoint (no compression_config in config.json)")
    if cc.get("format_version", 0) > FORMAT_VERSION:
        raise CompressorError(f"{path} was written by a newer compressor (format {cc['format_version']}); "
                              "upgrade compressor to load it")
    dtype = getattr(torch, cc["recipe"]["dtype"])
    # dtype= rather than .to(dtype): buffers such as RoPE's inv_freq stay float32, as from_pretrained keeps them
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
    rebuild(model, cc["modules"], dtype)
    model.compression_config = cc
    return model


def memory_bytes(path: str | Path) -> dict[str, int]:
    """The bytes a loaded checkpoint's parameters and buffers take: `packed` (keep_packed=True) and `unpacked`
    (the default on a CPU: packed plus each quantized or pruned linear's dense weight), from the shapes alone."""
    with torch.device("meta"):
        model = build(path)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    packed = sum(t.numel() * t.element_size() for t in tensors)
    extra = sum(m.unpacked_bytes(model.dtype) for m in model.modules() if isinstance(m, PackedLinear))
    return {"packed": packed, "unpacked": packed + extra}


def linear_bits_per_weight(compression_config: dict) -> float | None:
    """Storage bits per weight over the quantized linears (codes, scales, zeros, low-rank factors),
    weighted by each linear's size; None when nothing was quantized or the records lack the sizes."""
    sized = [[r for r in records if "bits_per_weight" in r][-1] for records in compression_config["modules"].values()
             if any("bits_per_weight" in r for r in records)]
    if not sized or any("weights" not in r for r in sized):
        return None
    return sum(r["bits_per_weight"] * r["weights"] for r in sized) / sum(r["weights"] for r in sized)


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (*.safetensors) in a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
