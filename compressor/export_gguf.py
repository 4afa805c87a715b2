"""Export a checkpoint to GGUF, the file llama.cpp runs (and Ollama, LM Studio, llama-cpp-python with it).

The file is the source GGUF with its weights replaced. Every metadata key (architecture, hyperparameters,
tokenizer, chat template) is copied from the GGUF the model was loaded from, except the file type; every
tensor keeps the source's name and order:
- a linear quantized with `gguf:` (nn.GGUFLinear): its blocks as they are, byte for byte, so llama.cpp
  computes with exactly the weights `compressor.load` computes with;
- the token embeddings and the output head: rounded to nearest on the block type `embedding_type` and
  `head_type` name; by default as llama-quantize's K-quant files choose: Q6_K for the output head and for
  embeddings tied to it, Q4_K for untied embeddings, each falling back (Q8_0, Q5_0) where 256 does not divide
  the width;
- norms and biases in float32; linears no block fits in float16, as llama.cpp keeps them.
The family's GGUF conventions come from its adapter: Llama's q/k rows permuted into llama.cpp's rotary order,
Gemma's norms stored as 1 + w.

Sliced models, low-rank factors (`lowrank`, LREC), pruned storage and our own integer grids (`rtn`/`gptq`
without `gguf:`) are refused, naming the pass; with `dense_fallback` those linears are written in float16.
The source must have been a GGUF file (`bundled:` models are): its metadata and tokenizer are the ones
llama.cpp reads.
"""

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from compressor import checkpoint
from compressor.checkpoint_format import read_compression_config
from compressor.errors import CompressorError
from compressor.export import dense_weight
from compressor.gguf_blocks import BLOCK_TYPES, encode
from compressor.models import Adapter, adapter_for
from compressor.models.sources import source_gguf
from compressor.nn import GGUFLinear, LowRankLinear, PackedLinear
from compressor.passes.gguf_grid import fit_width
from compressor.passes.quantize import rtn_blocks

FLOAT_TYPES = ("F32", "F16")
FILE_TYPES = {"llama:Q4_K_M": "MOSTLY_Q4_K_M", "llama:Q3_K_M": "MOSTLY_Q3_K_M", "llama:Q2_K": "MOSTLY_Q2_K",
              "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
              "Q5_1": "MOSTLY_Q5_1", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S",
              "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}
NOT_FROM_GGUF = ("the model comes from {source}, not from a GGUF file; a GGUF export takes its metadata and tokenizer "
                 "from the source GGUF. Convert the model with llama.cpp's convert_hf_to_gguf.py and compress that "
                 "file (model: path/to/model.gguf)")
ROWS_PER_CHUNK = 8192  # embedding rows rounded at a time (bounds the memory of the grid search)


def check_type(name: str, what: str) -> None:
    if name != "auto" and name not in FLOAT_TYPES and name not in BLOCK_TYPES:
        raise CompressorError(f"{what}: unknown GGUF type {name!r}; use auto, {', '.join(FLOAT_TYPES)} or one of "
                              f"{', '.join(BLOCK_TYPES)}")


def end_type(name: str, width: int, head: bool) -> str:
    """The GGUF type of the embeddings or head (`name`: auto, a float or a block type) for rows of `width`."""
    if name == "auto":
        name = "Q6_K" if head else "Q4_K"
    return name if name in FLOAT_TYPES else fit_width(name, width) or "F16"


def check_output(out: str | Path, overwrite: bool) -> None:
    """Refuse an output that is not a .gguf file name, or that exists unless `overwrite`."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise CompressorError(f"GGUF output {out} should be a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise CompressorError(f"{out} already exists; choose another output or pass --overwrite")


ROTATED = ("export to GGUF: a rotated model runs fast Hadamard transforms (before down_proj, around some norms) that "
           "llama.cpp's graph for the architecture does not have; leave `rotate` out of a recipe that exports to GGUF")


def check_exportable(passes: list, dense_fallback: bool, source: str, embedding_type: str = "auto",
                     head_type: str = "auto") -> None:
    """Refuse, before any work starts, a recipe whose checkpoint the GGUF export would refuse."""
    check_type(embedding_type, "embedding_type")
    check_type(head_type, "head_type")
    if source_gguf(source) is None:
        raise CompressorError(NOT_FROM_GGUF.format(source=source))
    for i, p in enumerate(passes):
        if p.name == "slice":
            raise CompressorError("export to GGUF: a sliced model's shapes differ from what llama.cpp builds from "
                                  "the metadata; leave `slice` out of a recipe that exports to GGUF")
        if p.name == "rotate":
            raise CompressorError(ROTATED)
        if dense_fallback or p.produces == "gguf":
            continue
        if p.produces == "quantized":
            raise CompressorError(f"export to GGUF: {p.name} makes our own integer grid (or low-rank factors), which "
                                  "GGUF cannot hold; quantize with `gptq: {gguf: Q4_K}` (or llama:Q4_K_M, ...), or "
                                  "set `export: {dense_fallback: true}` to write those linears in float16")
        pruned_then_gguf = p.produces == "pruned" and any(q.produces == "gguf" for q in passes[i + 1:])
        if p.produces in ("pruned", "lowrank") and not pruned_then_gguf:
            raise CompressorError(f"export to GGUF: {p.name} makes linears GGUF cannot hold ({p.produces} storage); "
                                  "quantize them with `gguf:` after it, or set `export: {dense_fallback: true}` to "
                                  "write them in float16")


def export_gguf(path: str | Path, out: str | Path, embedding_type: str = "auto", head_type: str = "auto",
                dense_fallback: bool = False, overwrite: bool = False) -> Path:
    """Write the checkpoint at `path` as the GGUF file `out` (module docstring)."""
    out = Path(out)
    check_type(embedding_type, "embedding_type")
    check_type(head_type, "head_type")
    check_output(out, overwrite)
    cc = read_compression_config(path)
    if cc is None:
        raise CompressorError(f"{path} is not a compressor checkpoint (no compression_config in its config.json)")
    done = {r["pass"] for records in cc["modules"].values() for r in records}
    if "slice" in done:
        raise CompressorError(f"{path} was sliced: its shapes differ from what llama.cpp builds from the metadata")
    if "rotate" in done:
        raise CompressorError(f"{path}: {ROTATED}")
    if "unfuse_experts" in done:
        raise CompressorError(f"{path} holds a mixture-of-experts model's experts as one linear each, which the GGUF "
                              "export does not write yet")
    source = source_gguf(cc["source"])
    if source is None:
        raise CompressorError(NOT_FROM_GGUF.format(source=cc["source"]))
    model = checkpoint.load(path, keep_packed=True)
    spec = next((r["gguf"] for records in cc["modules"].values() for r in records if r.get("gguf")), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # renamed into place when complete
    try:
        write_gguf(model, adapter_for(model), source, tmp, embedding_type, head_type, dense_fallback,
                   FILE_TYPES.get(spec))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_names(model: PreTrainedModel, arch: str) -> dict[str, tuple[str, str]]:
    """GGUF tensor name -> (module name, weight or bias), by gguf's own table of Hugging Face names."""
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    table = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    names = {}
    for module_name, _ in model.named_modules():
        for kind in ("weight", "bias"):
            found = table.get_name(f"{module_name}.{kind}", try_suffixes=(".weight", ".bias"))
            if found is not None:
                names[found] = (module_name, kind)
    return names


def write_gguf(model: PreTrainedModel, adapter: Adapter, source: Path, out: Path, embedding_type: str,
               head_type: str, dense_fallback: bool, file_type: str | None, float_linears: str = "F16") -> None:
    """Write `model` as GGUF file `out` with the metadata and tensor names of `source`; float linears (those no
    block fits, and all of an uncompressed model) in `float_linears` (F16 or F32)."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    if file_type:
        writer.add_file_type(gguf.LlamaFileType[file_type])
    names = gguf_names(model, arch)
    refused = []
    for tensor in reader.tensors:
        if tensor.name not in names:  # a tensor transformers does not hold (e.g. rope frequencies): as it was
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        module_name, kind = names[tensor.name]
        module = model.get_submodule(module_name)
        data, qtype, reason = tensor_data(model, adapter, module, module_name, kind, tensor.name, embedding_type,
                                          head_type, dense_fallback, float_linears)
        if reason:
            refused.append(f"{module_name}: {reason}")
            continue
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    if refused:
        raise CompressorError(f"{len(refused)} linears cannot be exported to GGUF, e.g. {refused[0]}; pass "
                              "--dense-fallback to write them in float16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_data(model: PreTrainedModel, adapter: Adapter, module: nn.Module, module_name: str, kind: str,
                gguf_name: str, embedding_type: str, head_type: str, dense_fallback: bool, float_linears: str
                ) -> tuple[np.ndarray | None, gguf.GGMLQuantizationType | None, str | None]:
    """One tensor's data and GGUF type, or the reason it cannot be written."""
    permute = model.config.model_type in adapter.gguf_permute_qk and gguf_name.split(".")[-2] in ("attn_q", "attn_k")
    if kind == "bias":
        return rows_in_order(model, module.bias.detach().float(), gguf_name, permute).numpy(), None, None
    if isinstance(module, GGUFLinear):
        return rows_in_order(model, module.qweight, gguf_name, permute).numpy(), module.block_type.ggml_type, None
    if isinstance(module, (PackedLinear, LowRankLinear)):
        if not dense_fallback:
            record = model.compression_config["modules"].get(module_name, [{}])
            return None, None, f"{record[-1].get('pass', type(module).__name__)} made it {type(module).__name__}"
        weight = rows_in_order(model, dense_weight(module), gguf_name, permute)
        return weight.half().numpy(), None, None
    weight = module.weight.detach().float()
    ends = {"embedding": model.get_input_embeddings(), "head": model.get_output_embeddings()}
    if module in ends.values():
        head = module is ends["head"] or model.config.tie_word_embeddings
        return end_tensor(weight, end_type(head_type if head else embedding_type, weight.shape[1], head))
    if isinstance(module, nn.Linear):  # a linear no block fits: float16, as llama.cpp keeps it
        weight = rows_in_order(model, weight, gguf_name, permute)
        return (weight.half() if float_linears == "F16" else weight).numpy(), None, None
    if "norm" in gguf_name:
        weight = weight + adapter.norm_offset
    return weight.numpy(), None, None


def end_tensor(weight: torch.Tensor, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None, None]:
    """The embeddings or head [rows, width] in `type_name`, rounded to nearest chunk by chunk."""
    if type_name in FLOAT_TYPES:
        return (weight.half() if type_name == "F16" else weight).numpy(), None, None
    t = BLOCK_TYPES[type_name]
    data = [encode(t, *rtn_blocks(t, chunk, None)) for chunk in weight.split(ROWS_PER_CHUNK)]
    return torch.cat(data).numpy(), t.ggml_type, None


def rows_in_order(model: PreTrainedModel, rows: torch.Tensor, gguf_name: str, permute: bool) -> torch.Tensor:
    """Rows of q or k [out, ...] in llama.cpp's rotary order (per head: the even, then the odd rotary pairs'
    rows interleaved as its Llama graph reads them) when `permute`; otherwise as they are."""
    if not permute:
        return rows
    heads = model.config.num_attention_heads if gguf_name.split(".")[-2] == "attn_q" else \
        model.config.num_key_value_heads
    order = torch.arange(rows.shape[0]).reshape(heads, 2, -1).transpose(1, 2).reshape(-1)
    return rows[order]
