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
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from compressor.errors import CompressorError

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from compressor import __version__

    return {"compressor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["compression_config"] = {"format_version": FORMAT_VERSION, **compression_config,
                                        "versions": versions()}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_compression_config(path: str | Path) -> dict | None:
    """The checkpoint's compression_config, or None for a plain model folder."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text()).get("compression_config")


def load(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a compressed checkpoint as a working model (forward and generate)."""
    cc = read_compression_config(path)
    if cc is None:
        raise CompressorError(f"{path} is not a compressor checkpoint (no compression_config in config.json)")
    if cc.get("format_version", 0) > FORMAT_VERSION:
        raise CompressorError(f"{path} was written by a newer compressor (format {cc['format_version']}); "
                              "upgrade compressor to load it")
    dtype = getattr(torch, cc["recipe"]["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.compression_config = cc
    return model.to(device).eval()


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (*.safetensors) in a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
