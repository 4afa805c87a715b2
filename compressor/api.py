"""The Python API: compress, load, evaluate; and `run`, the whole job behind `compress run`."""

import dataclasses
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from compressor import checkpoint
from compressor.checkpoint_format import read_compression_config
from compressor.data import calibration_windows, load_documents
from compressor.distributed import barrier, is_main, rank_and_size, share
from compressor.engine import compress_model, plan
from compressor.errors import CompressorError
from compressor.export import check_recipe, export_compressed_tensors
from compressor.export_gguf import check_exportable as export_gguf_check
from compressor.export_gguf import check_output as export_gguf_check_output
from compressor.export_gguf import export_gguf
from compressor.models import LoadedModel, adapter_for, load_model
from compressor.nn import SparseLinear, unfuse_experts
from compressor.passes.base import LayerPass
from compressor.perplexity import perplexity
from compressor.recipe import Perplexity, Recipe, load_recipe
from compressor.resume import Progress
from compressor.runtime import count_parameters, peak_memory, resolve_device, warn_if_slow_dtype, with_layers


def open_model(source: str, dtype: str = "float32", keep_packed: bool = False, device: str | torch.device = "cpu"
               ) -> LoadedModel:
    """A compressor checkpoint folder through `checkpoint.load` (onto `device`); any other source through
    `load_model` (onto the CPU)."""
    if read_compression_config(source) is None:
        return load_model(source, dtype)
    model = checkpoint.load(source, device, keep_packed)
    return LoadedModel(model, AutoTokenizer.from_pretrained(source), adapter_for(model), source, Path(source))


def compress(recipe: "str | Path | dict | Recipe", model: PreTrainedModel | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None, overwrite: bool = False,
             progress: bool = True, resume: bool = False, stream: bool = False) -> PreTrainedModel:
    """Compress a model by a recipe (YAML path, dict or Recipe) and save it when the recipe has `output`.

    With `model` (and its `tokenizer`) given, that in-memory model is compressed instead of the
    recipe's `model` source. Returns the compressed model; what was done is in `.compression_config`.
    The recipe's `device` runs the passes one decoder layer at a time, each moved there and back, so the
    returned model is where it was loaded (the CPU for a recipe's source): `.to("cuda")` to run it there.
    Its quantized and pruned linears run packed (each call rebuilds the weight); `compressor.load` of the
    saved checkpoint runs them at the dense model's speed, as `compressor.nn.unpack_weights` does in memory.
    With an `output`, each finished decoder layer is kept on disk until the checkpoint is saved; `resume` goes on
    from those of an interrupted run of the same recipe and model (compressor/resume.py).
    With `stream`, the model (a local folder) is never whole in memory: each decoder layer is read from its files
    when its turn comes and written out once compressed (compressor/models/streamed.py); the checkpoint is the
    same, and the returned model holds its decoder layers' shapes only (load the checkpoint to run it).
    """
    recipe = load_recipe(recipe)
    check_outputs(recipe, overwrite)
    check_stream(recipe, stream, model is not None, rank_and_size()[1])
    if model is None:
        loaded = load_model(recipe.model, recipe.dtype, stream)
    else:
        if tokenizer is None:
            raise CompressorError("compress(model=...) also needs tokenizer=...")
        unfuse_experts(model)  # as load_model does: experts as linears, so that the plan sees them
        loaded = LoadedModel(model, tokenizer, adapter_for(model), recipe.model, None)
    return _compress_loaded(recipe, loaded, overwrite, progress, resume)


def _compress_loaded(recipe: Recipe, loaded: LoadedModel, overwrite: bool, progress: bool, resume: bool = False
                     ) -> PreTrainedModel:
    model, tokenizer = loaded.model, loaded.tokenizer
    device = resolve_device(recipe.device)
    if resume and not recipe.output:
        raise CompressorError(f"{recipe.source}: resume needs the recipe's `output` (where the run kept its layers)")
    processes = rank_and_size()[1]
    check_processes(recipe, processes, resume)
    resolved = recipe.resolved()
    identity = {"model": loaded.source, **{k: resolved[k] for k in ("dtype", "calibration", "passes")}}
    saved = Progress.open(recipe.output, identity, resume, overwrite, loaded.adapter.layers) \
        if recipe.output and processes == 1 else None
    plan(model, loaded.adapter, recipe.passes)  # fail on bad targets before reading any data
    warn_if_slow_dtype(model, device)
    windows = None
    if any(p.stats for p in recipe.passes):
        cal = recipe.calibration
        docs = load_documents(cal.dataset, "calibration", cal.text_field)
        windows = share(calibration_windows(tokenizer, docs, cal.samples, cal.seqlen, cal.seed))
    streamed = loaded.streamed
    dense = count_parameters(model)  # of a streamed model: its embeddings and head (the layers count as they pass)
    with torch.no_grad():
        records = compress_model(model, loaded.adapter, recipe.passes, windows, device, progress, saved, streamed)
    compressed = count_parameters(model)
    if streamed is not None:
        dense, compressed = with_layers(dense, streamed.dense), with_layers(compressed, streamed.compressed)
    model.compression_config = {"recipe": recipe.resolved(), "recipe_as_written": recipe.raw,
                                "source": loaded.source, "modules": records,
                                "parameters": {"dense": dense, "compressed": compressed}}
    if recipe.output and is_main() and streamed is not None:
        layers = len(loaded.adapter.decoder_layers(model))
        checkpoint.save_streamed(model, tokenizer, recipe.output, model.compression_config,
                                 [saved.layer_file(i) for i in range(layers)], loaded.adapter.layers, overwrite)
        saved.remove()
    elif recipe.output and is_main():
        checkpoint.save(model, tokenizer, recipe.output, model.compression_config, overwrite)
        if saved is not None:
            saved.remove()
    if recipe.export and recipe.export.format == "gguf" and is_main():
        export_gguf(recipe.output, recipe.export.output, recipe.export.embedding_type, recipe.export.head_type,
                    recipe.export.dense_fallback, overwrite)
    elif recipe.export and is_main():
        export_compressed_tensors(recipe.output, recipe.export.output, recipe.export.dense_fallback,
                                  recipe.export.dtype, overwrite)
    barrier()  # the other processes wait until process 0 has written
    return model


def check_stream(recipe: Recipe, stream: bool, in_memory: bool, processes: int) -> None:
    """Refuse, before any work, what a streamed run cannot do: keep no output, run in several processes, stream a
    model already in memory."""
    if not stream:
        return
    if in_memory:
        raise CompressorError("stream=True reads the recipe's model from its files; a model given in memory is "
                              "compressed as it is (leave out stream)")
    if not recipe.output:
        raise CompressorError(f"{recipe.source}: --stream writes each compressed layer to the recipe's `output`; "
                              "add one")
    if processes > 1:
        raise CompressorError("--stream runs in one process only; run without torchrun (or --nproc)")


def check_processes(recipe: Recipe, processes: int, resume: bool) -> None:
    """Refuse, before any work, what does not run across processes yet: passes that work on whole layers with
    calibration data (their statistics are not summed across processes; `rotate`, which uses none, does the same
    in every process), resuming, fewer calibration windows than processes."""
    if processes == 1:
        return
    whole_layer = [p.name for p in recipe.passes if isinstance(p, LayerPass) and p.stats]
    if whole_layer:
        raise CompressorError(f"{', '.join(whole_layer)} run in one process only; run this recipe without torchrun "
                              "(or --nproc)")
    if resume:
        raise CompressorError("--resume runs in one process only; resume without torchrun (or --nproc)")
    if recipe.calibration.samples < processes:
        raise CompressorError(f"{processes} processes share {recipe.calibration.samples} calibration windows; use "
                              "at most as many processes as windows")


def check_outputs(recipe: Recipe, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that exists and an export that would be refused."""
    if recipe.output:
        checkpoint.check_output(recipe.output, overwrite)
    if recipe.export and recipe.export.format == "gguf":
        export_gguf_check_output(recipe.export.output, overwrite)
        export_gguf_check(recipe.passes, recipe.export.dense_fallback, recipe.model, recipe.export.embedding_type,
                          recipe.export.head_type)
    elif recipe.export:
        checkpoint.check_output(recipe.export.output, overwrite)
        check_recipe(recipe.passes, recipe.export.dense_fallback)


def load(path: str | Path, device: str = "cpu", semi_structured: bool = False, keep_packed: bool = False
         ) -> PreTrainedModel:
    """Load a compressed checkpoint written by `compress`. Quantized and pruned linears are unpacked once
    into dense weights, so the model runs as fast as the dense one; with `keep_packed`, only their packed form
    is kept and every call rebuilds the weight (less memory, slower). With `semi_structured` on a CUDA GPU of
    compute capability 8.0+, 2:4-pruned float16/bfloat16 linears run as PyTorch semi-structured sparse tensors."""
    model = checkpoint.load(path, resolve_device(device), keep_packed)
    if semi_structured:
        converted = [m.use_semi_structured() for m in model.modules() if isinstance(m, SparseLinear)]
        if not any(converted):
            raise CompressorError("semi_structured=True needs 2:4-pruned linears in float16 or bfloat16 on a CUDA "
                                  "GPU of compute capability 8.0+; none of this model's linears qualify")
    return model


def evaluate(model: "PreTrainedModel | str", tokenizer: PreTrainedTokenizerBase | None = None,
             dataset: str = "bundled:wikileads", seqlen: int = 2048, windows: int | None = None,
             device: str = "auto", progress: bool = True, keep_packed: bool = False) -> dict:
    """Perplexity (protocol v1) with parameters, bytes on disk, wall time and peak memory.

    `model` is a loaded model (give `tokenizer`) or any model source / checkpoint path (`keep_packed`: as
    for `load`).
    """
    folder = None
    target = resolve_device(device)
    if isinstance(model, str):
        loaded = open_model(model, keep_packed=keep_packed, device=target)
        model, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
    elif tokenizer is None:
        raise CompressorError("evaluate(model) needs tokenizer=... when given a model object")
    home = next(model.parameters()).device
    model.to(target)
    warn_if_slow_dtype(model, target)
    try:
        report = perplexity(model, tokenizer, dataset, seqlen, windows, progress=progress)
    finally:
        model.to(home)
    report["threads"] = torch.get_num_threads()
    report["keep_packed"] = keep_packed
    report["bytes_on_disk"] = checkpoint.weight_bytes(folder) if folder else None
    cc = getattr(model, "compression_config", None)
    report["linear_bits_per_weight"] = checkpoint.linear_bits_per_weight(cc) if cc else None
    return report


def run(recipe_path: "str | Path | dict", overwrite: bool = False, progress: bool = True,
        windows: int | None = None, no_eval: bool = False, resume: bool = False, stream: bool = False) -> dict:
    """`compress run`: load, evaluate before (if asked), compress, save, re-load, evaluate after.
    `windows` evaluates on the first N windows whatever the recipe says (its dataset and seqlen, or the
    defaults); `no_eval` skips both evaluations; `resume` goes on from an interrupted run's finished layers;
    `stream` reads and writes one decoder layer at a time (see `compress`), and so evaluates nothing."""
    recipe = load_recipe(recipe_path)
    if recipe.output is None:
        raise CompressorError(f"{recipe.source}: output: missing; `compress run` writes a checkpoint")
    if windows is not None and no_eval:
        raise CompressorError("give --windows N (evaluate on the first N windows) or --no-eval (no evaluation), "
                              "not both")
    check_outputs(recipe, overwrite)
    ev = None if no_eval else recipe.evaluate
    if windows is not None:
        ev = dataclasses.replace(ev or Perplexity(), windows=windows)
    check_stream(recipe, stream, False, rank_and_size()[1])
    if stream and ev:
        raise CompressorError(f"{recipe.source} evaluates the model, which --stream never holds whole: add --no-eval, "
                              "and evaluate the checkpoint on a machine that holds it (compress eval OUTPUT)")
    loaded = load_model(recipe.model, recipe.dtype, stream)
    plan(loaded.model, loaded.adapter, recipe.passes)
    report: dict = {"model": recipe.model, "recipe": recipe.source, "output": recipe.output,
                    "export": recipe.export.output if recipe.export else None}
    size = {"bytes_on_disk": checkpoint.weight_bytes(loaded.folder) if loaded.folder else None}
    main = is_main()  # under torchrun, process 0 evaluates and reports; the others only compress their share
    if ev and main:
        report["before"] = {**evaluate(loaded.model, loaded.tokenizer, ev.dataset, ev.seqlen, ev.windows,
                                       recipe.device, progress), **size}
    start = time.perf_counter()
    model = _compress_loaded(recipe, loaded, overwrite, progress and main, resume)
    if not main:
        return {}
    if not ev:  # the dense counts that compression recorded
        report["before"] = {**model.compression_config["parameters"]["dense"], **size}
    report["compress_wall_s"] = round(time.perf_counter() - start, 1)
    report["threads"] = torch.get_num_threads()
    report["processes"] = rank_and_size()[1]
    report["compress_memory"] = peak_memory(resolve_device(recipe.device))
    del loaded, model
    if ev:
        report["after"] = evaluate(recipe.output, None, ev.dataset, ev.seqlen, ev.windows, recipe.device, progress)
    else:  # the counts that compression recorded
        cc = read_compression_config(recipe.output)
        report["after"] = {**cc["parameters"]["compressed"], "bytes_on_disk": checkpoint.weight_bytes(recipe.output),
                           "linear_bits_per_weight": checkpoint.linear_bits_per_weight(cc)}
    return report
