"""Export a checkpoint to compressed-tensors, the format vLLM and transformers load quantized models from.

The folder holds config.json with a `quantization_config` as compressed-tensors 0.17 writes it (format
`pack-quantized`: integer weights, group or channel strategy, symmetric or asymmetric), model.safetensors,
the tokenizer and generation_config.json. Per quantized linear NAME:
- `NAME.weight_packed` int32 [out, in * bits / 32]: the codes q - 2^(bits-1), offset back by 2^(bits-1) and
  packed 32 / bits to a word, code j at bit (j % (32 / bits)) * bits of word j // (32 / bits). For 4 and 8
  bits that is exactly compressor/formats.py's layout of our codes q, so `qweight` is written as it is;
- `NAME.weight_scale` [out, groups] in the export dtype; `NAME.weight_shape` int64 [2] = (out, in);
- asymmetric only: `NAME.weight_zero_point` int32 [out * bits / 32, groups], the zero points z - 2^(bits-1)
  packed the same way along the output dimension (symmetric grids have z = 2^(bits-1): no zero point).
The dequantized weight, (q - z) * scale per group, is the one `compressor.load` computes with. GPTQ's
act-order uses static groups here, so no `g_idx` is written.

vLLM's kernels run 4- and 8-bit weights whose groups tile the input width. What it cannot run is refused
before anything is written, or with `dense_fallback` written as a plain dense weight: 2- and 3-bit codes,
groups that do not divide the width, pruned linears (vLLM no longer loads 2:4 sparse storage), low-rank
factorized linears. Sliced models are refused: their shapes differ from the model config.

With `int8_activations` the export is the W4A8 variant for CPU serving (vLLM's CPU build runs 4-bit weights
only with activations quantized to int8 per token at run time): format `int-quantized`, `NAME.weight` int8
[out, in] holding q - 2^(bits-1) unpacked, the same scales, and dynamic per-token int8 `input_activations`.
Only symmetric 4-bit grids have that scheme.

LREC factors go into a PEFT LoRA adapter in `lrec-adapter/` inside the export, which vLLM
(`--enable-lora --lora-modules lrec=OUT/lrec-adapter`) and peft apply on top of the quantized base:
y = x Wq^T + (x A) B is LoRA's y = x Wq^T + (alpha / r) (x lora_A^T) lora_B^T with lora_A = A^T [r, in],
lora_B = B^T [out, r] and alpha = r. Ranks that differ between linears are padded with zeros to the largest
(the product is unchanged), so every engine reads one rank; integer factors are written dequantized.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compressor import checkpoint
from compressor.checkpoint_format import read_compression_config
from compressor.errors import CompressorError
from compressor.formats import pack, unpack
from compressor.nn import GGUFLinear, LowRankLinear, PackedLinear, QuantLinear, SparseLinear

COMPRESSED_TENSORS_VERSION = "0.17.0"  # the version whose format this writes (the one vLLM pins)
EXPORT_BITS = (4, 8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def weights_args(bits: int, group_size: int, in_features: int, symmetric: bool) -> dict:
    """The `weights` QuantizationArgs of compressed-tensors for our grid (as its model_dump writes them)."""
    channel = group_size >= in_features
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": None if channel else group_size,
            "strategy": "channel" if channel else "group", "block_structure": None, "dynamic": False,
            "actorder": None, "scale_dtype": None, "zp_dtype": None if symmetric else "torch.int8",
            "observer": "minmax", "observer_kwargs": {}}


INT8_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                          "block_structure": None, "dynamic": True, "actorder": None, "scale_dtype": None,
                          "zp_dtype": None, "observer": None, "observer_kwargs": {}}


def quantization_config(groups: dict[str, list[str]], schemes: dict[str, dict], ignore: list[str],
                        int8_activations: bool) -> dict:
    """config.json's `quantization_config`: one config group per weight scheme, targeting its linears by name."""
    fmt = "int-quantized" if int8_activations else "pack-quantized"
    activations = INT8_TOKEN_ACTIVATIONS if int8_activations else None
    return {"config_groups": {group: {"targets": targets, "weights": schemes[group], "input_activations": activations,
                                      "output_activations": None, "format": fmt}
                              for group, targets in groups.items()},
            "format": fmt, "global_compression_ratio": None, "ignore": ignore,
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION}


def why_not_exportable(q: QuantLinear, symmetric: bool, int8_activations: bool) -> str | None:
    """Why vLLM's kernels cannot run this quantized linear as compressed-tensors stores it (None: they can)."""
    if int8_activations and not (q.bits == 4 and symmetric):
        grid = f"{q.bits}-bit {'' if symmetric else 'a'}symmetric"
        return f"{grid} codes (the int8-activation scheme takes symmetric 4-bit codes)"
    if q.bits not in EXPORT_BITS:
        return f"{q.bits}-bit codes (vLLM's compressed-tensors kernels run {' and '.join(map(str, EXPORT_BITS))} bits)"
    if q.group_size < q.in_features and q.in_features % q.group_size:
        return f"groups of {q.group_size} that do not divide its {q.in_features} inputs"
    return None


def packed_tensors(name: str, q: QuantLinear, symmetric: bool, dtype: torch.dtype, int8_activations: bool
                   ) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (module docstring)."""
    if int8_activations:  # int-quantized: the signed codes unpacked, one int8 per weight
        codes = unpack(q.qweight, q.bits, q.in_features) - 2 ** (q.bits - 1)
        tensors = {f"{name}.weight": codes.to(torch.int8).contiguous(),
                   f"{name}.weight_scale": q.scales.to(dtype).contiguous()}
    else:
        tensors = {f"{name}.weight_packed": q.qweight.contiguous(),
                   f"{name}.weight_scale": q.scales.to(dtype).contiguous(),
                   f"{name}.weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64)}
    if not symmetric:  # zero points z packed along the output dimension: [words(out), groups]
        tensors[f"{name}.weight_zero_point"] = pack(q.zeros.T.long(), q.bits).T.contiguous()
    if q.bias is not None:
        tensors[f"{name}.bias"] = q.bias.detach().to(dtype)
    return tensors


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight [out, in] a linear computes with: rebuilt from a packed form, or the two factors of a
    low-rank linear (each maybe quantized) multiplied out."""
    if isinstance(module, LowRankLinear):
        return dense_weight(module.up) @ dense_weight(module.down)
    if isinstance(module, PackedLinear):
        return module.runtime_weight(torch.float32)
    return module.weight.detach().float()


ROTATED = ("export: a rotated model runs fast Hadamard transforms (before down_proj, around some norms) that the "
           "model's architecture in vLLM does not have; leave `rotate` out of a recipe that exports")


def check_recipe(passes: list, dense_fallback: bool) -> None:
    """Refuse, before any work starts, a recipe whose checkpoint the export would refuse."""
    for p in passes:
        if p.name == "slice":
            raise CompressorError("export: a sliced model's shapes differ from its config, which vLLM builds the "
                                  "model from; leave `slice` out of a recipe that exports")
        if p.name == "rotate":
            raise CompressorError(ROTATED)
        if dense_fallback:
            continue
        if getattr(p, "gguf", None):
            raise CompressorError(f"export: {p.name} with `gguf:` makes GGUF blocks; export them with `format: gguf`, "
                                  "or set `export: {dense_fallback: true}` to write them dense")
        if getattr(p, "bits", 4) not in EXPORT_BITS:
            raise CompressorError(f"export: {p.name} with {p.bits} bits makes linears vLLM's kernels cannot run "
                                  "(4 or 8 bits); set `export: {dense_fallback: true}` to write them dense")
        if p.name in ("magnitude", "wanda", "sparsegpt", "lowrank") and not any(
                q.name in ("rtn", "gptq") for q in passes):
            raise CompressorError(f"export: {p.name} leaves linears that compressed-tensors cannot hold packed "
                                  "and nothing quantized; set `export: {dense_fallback: true}` to write them dense")


def export_compressed_tensors(path: str | Path, out: str | Path, dense_fallback: bool = False,
                              dtype: str | None = None, overwrite: bool = False, int8_activations: bool = False
                              ) -> Path:
    """Write the checkpoint at `path` as a compressed-tensors folder `out` (module docstring); `dtype` (float32,
    float16 or bfloat16; default the checkpoint's) is that of every tensor that is not an integer code;
    `int8_activations` writes the W4A8 variant."""
    checkpoint.check_output(out, overwrite)
    cc = read_compression_config(path)
    if cc is not None and any(r["pass"] == "slice" for records in cc["modules"].values() for r in records):
        raise CompressorError(f"{path} was sliced: its layers' shapes differ from the model config, which "
                              "vLLM builds the model from; export a checkpoint that was not sliced")
    if cc is not None and any(r["pass"] == "rotate" for records in cc["modules"].values() for r in records):
        raise CompressorError(f"{path}: {ROTATED}")
    if cc is not None and any(r["pass"] == "unfuse_experts" for records in cc["modules"].values() for r in records):
        raise CompressorError(f"{path} holds a mixture-of-experts model's experts as one linear each, a layout the "
                              "compressed-tensors export does not write yet; load it with compressor.load")
    model = checkpoint.load(path, keep_packed=True)  # a folder that is not a checkpoint is refused here
    dtype = getattr(torch, dtype) if dtype else model.dtype
    state = {name: t.detach().to(dtype) if t.is_floating_point() else t for name, t in model.state_dict().items()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # LREC factors A [in, r], B [r, out]
    groups: dict[str, list[str]] = {}  # config group -> the linears it quantizes
    schemes: dict[str, dict] = {}  # config group -> its weights' QuantizationArgs
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # exported as they are
    refused = []
    low_rank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, SparseLinear, LowRankLinear, GGUFLinear)):
            continue
        if any(name.startswith(parent + ".") for parent in low_rank):  # a factor: its low-rank linear decides
            continue
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        symmetric = isinstance(module, QuantLinear) and \
            next(r["symmetric"] for r in reversed(cc["modules"][name]) if "symmetric" in r)
        reason = why_not_exportable(module, symmetric, int8_activations) if isinstance(module, QuantLinear) else \
            "pruned storage (vLLM no longer loads 2:4 sparse weights)" if isinstance(module, SparseLinear) else \
            "GGUF blocks (export them with --format gguf)" if isinstance(module, GGUFLinear) else \
            "low-rank factors (the model config has one weight there)"
        if reason is None:
            scheme = weights_args(module.bits, module.group_size, module.in_features, symmetric)
            group = next((g for g, s in schemes.items() if s == scheme), f"group_{len(schemes)}")
            schemes.setdefault(group, scheme)
            groups.setdefault(group, []).append(name)
            state |= packed_tensors(name, module, symmetric, dtype, int8_activations)
            if module.rank:
                factors[name] = module.low_rank_factors(torch.float32)
        elif dense_fallback:
            dense.append(name)
            state[f"{name}.weight"] = dense_weight(module).to(dtype).contiguous()
            bias = module.up.bias if isinstance(module, LowRankLinear) else module.bias
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().to(dtype)
        else:
            refused.append(f"{name}: {reason}")
    if refused:
        raise CompressorError(f"{path}: {len(refused)} linears cannot be exported to compressed-tensors, e.g. "
                              f"{refused[0]}; pass --dense-fallback to write them as dense weights instead")
    if not groups:
        raise CompressorError(f"{path} has no linear that compressed-tensors can hold packed (4- or 8-bit); "
                              "nothing to export")
    config = json.loads((Path(path) / "config.json").read_text())
    config.pop("compression_config")
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config(groups, schemes, sorted(dense), int8_activations)
    if model.config.tie_word_embeddings:  # the tied head is the embedding, saved once
        state.pop("lm_head.weight", None)
    adapter = lora_adapter(factors, dtype, str(Path(out).resolve())) if factors else None
    return write_folder(out, state, config, path, adapter)


def lora_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, base: str
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and adapter_model.safetensors of a PEFT LoRA adapter holding the LREC factors
    (module docstring)."""
    rank = max(a.shape[1] for a, _ in factors.values())
    tensors = {}
    for name, (a, b) in factors.items():  # a [in, r_i], b [r_i, out], zero-padded to rank
        lora_a = torch.zeros(rank, a.shape[0])
        lora_a[:a.shape[1]] = a.T
        lora_b = torch.zeros(b.shape[1], rank)
        lora_b[:, :b.shape[0]] = b.T
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
              "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
              "target_modules": sorted({name.rpartition(".")[2] for name in factors})}
    return config, tensors


def write_folder(out: str | Path, state: dict[str, torch.Tensor], config: dict, source: str | Path,
                 adapter: tuple[dict, dict[str, torch.Tensor]] | None) -> Path:
    """Write the folder (and the adapter in it), renamed into place when complete."""
    out = Path(out)
    with checkpoint.folder_in_place(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, tmp / name)
        if adapter is not None:
            (tmp / "lrec-adapter").mkdir()
            (tmp / "lrec-adapter" / "adapter_config.json").write_text(json.dumps(adapter[0], indent=2) + "\n")
            save_file(adapter[1], tmp / "lrec-adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
