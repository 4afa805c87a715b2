"""`compress`: run a recipe, evaluate a model, describe a checkpoint.

Every user error prints one message and exits with code 2.
"""

import json
import os
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import click
from tabulate import tabulate

from compressor.errors import CompressorError, CompressorWarning

PARAMETER_ROWS = [("parameters", "parameters"), ("nonzero_parameters", "nonzero parameters"),
                  ("parameters_without_embeddings", "parameters without embeddings and head")]


class _Command(click.Command):
    """Turns CompressorError into one message on stderr and exit code 2, and CompressorWarning into one
    line on stderr (other libraries' warnings keep Python's format)."""

    def invoke(self, ctx: click.Context):
        show = warnings.showwarning

        def show_warning(message, category, *args, **kwargs):
            if issubclass(category, CompressorWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                show(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            try:
                return super().invoke(ctx)
            except CompressorError as e:
                click.echo(f"error: {e}", err=True)
                ctx.exit(2)


def _threads_option(command):
    return click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: "
                        "torch's choice, one per core); set it when other jobs share the machine's cores.")(command)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@click.group()
@click.version_option(package_name="compressor")
def main() -> None:
    """Compress Hugging Face causal LMs after training, then measure them.

    \b
    compress run recipes/smollm2-135m-magnitude-2of4.yaml
    compress eval bundled:smollm2-135m --windows 16
    compress info out/smollm2-135m-magnitude-2of4
    """


@main.command(cls=_Command)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report here.")
@click.option("--windows", type=click.IntRange(min=1), help="Evaluate before and after on the first N windows, "
              "whatever the recipe's `evaluate` says (a quick run, labelled windows=N).")
@click.option("--no-eval", is_flag=True, help="Skip the evaluations before and after, whatever the recipe says.")
@click.option("--resume", is_flag=True, help="Go on from the decoder layers an interrupted run of this recipe "
              "finished (kept in .OUTPUT.partial beside the output) instead of starting over.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, help="Calibrate in N processes (torchrun on this "
              "machine), each on a share of the calibration windows; process 0 writes the checkpoint.")
@click.option("--stream", is_flag=True, help="Never hold the whole model: read each decoder layer from the model "
              "folder's safetensors files when its turn comes and write it out once compressed (peak memory: about "
              "one layer, its calibration activations, the embeddings and head). Needs --no-eval.")
@_threads_option
def run(recipe: str, overwrite: bool, json_path: str | None, windows: int | None, no_eval: bool, resume: bool,
        nproc: int, stream: bool, threads: int | None) -> None:
    """Compress a model by RECIPE (YAML) and save the checkpoint; evaluate before/after if it asks."""
    if not Path(recipe).is_file():  # before the heavy imports: an error in well under a second
        raise CompressorError(f"recipe file not found: {recipe}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # this same command in nproc processes under torchrun
        from compressor.api import check_processes, check_stream
        from compressor.recipe import load_recipe

        parsed = load_recipe(recipe)  # refused here, with exit code 2, not in each process
        check_processes(parsed, nproc, resume)
        check_stream(parsed, stream, False, nproc)
        options = {"--overwrite": overwrite, "--no-eval": no_eval, "--resume": resume, "--json": json_path,
                   "--windows": windows, "--threads": threads}
        args = [arg for flag, value in options.items() if value
                for arg in ([flag] if value is True else [flag, str(value)])]
        raise SystemExit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          f"--nproc-per-node={nproc}", "-m", "compressor.cli", "run", recipe, *args]))
    from compressor.api import run as run_recipe
    from compressor.distributed import start

    _set_threads(threads)
    start()
    report = run_recipe(recipe, overwrite=overwrite, windows=windows, no_eval=no_eval, resume=resume, stream=stream)
    if not report:  # a process other than 0 under torchrun: process 0 reports
        return
    before, after = report["before"], report["after"]
    rows = []
    if "ppl" in before:
        rows.append([f"perplexity ({_protocol(before)})", f"{before['ppl']:.3f}", f"{after['ppl']:.3f}"])
    rows += [[label, f"{before[key]:,}", f"{after[key]:,}"] for key, label in PARAMETER_ROWS]
    rows += [
             ["weights on disk", _mb(before.get("bytes_on_disk")), _mb(after.get("bytes_on_disk"))]]
    if after.get("linear_bits_per_weight"):
        rows.append(["bits per weight (quantized linears)", "-", _bits(after["linear_bits_per_weight"])])
    click.echo(tabulate(rows, headers=["", "before", "after"], tablefmt="github"))
    memory = report["compress_memory"]
    threads = report["threads"]
    click.echo(f"compressed in {report['compress_wall_s']} s on {threads} thread{'s' * (threads > 1)}, "
               f"peak RSS {memory['peak_rss_mb']:.0f} MB; "
               f"checkpoint: {report['output']}")
    click.echo(f"run it from Python: model = compressor.load({report['output']!r}) (a transformers model: "
               "forward, generate); `compress info` says what it holds")
    if report.get("export"):
        click.echo(f"exported: {report['export']}")
    report_path = Path(report["output"]) / "compress_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


@main.command(name="eval", cls=_Command)
@click.argument("model")
@click.option("--windows", type=click.IntRange(min=1), help="Only the first N windows (a quick run; "
              "the number is then labelled windows=N). Default: the full eval split.")
@click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True, help="Window length L.")
@click.option("--dataset", default="bundled:wikileads", show_default=True,
              help="bundled:wikileads (its eval split), or a .txt/.jsonl file or saved dataset.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the JSON here.")
@click.option("--keep-packed", is_flag=True, help="Run a checkpoint's quantized and pruned linears from their "
              "packed form, rebuilding each weight on every call (less memory, slower).")
@_threads_option
def eval_(model: str, windows: int | None, seqlen: int, dataset: str, device: str, json_path: str | None,
          keep_packed: bool, threads: int | None) -> None:
    """Perplexity of MODEL (bundled:NAME, folder, .gguf, hub id or checkpoint) by protocol v1."""
    from compressor.api import evaluate

    _set_threads(threads)
    report = {"model": model, **evaluate(model, dataset=dataset, seqlen=seqlen, windows=windows, device=device,
                                         keep_packed=keep_packed)}
    rows = [["perplexity", f"{report['ppl']:.3f}"], ["protocol", _protocol(report)],
            *([label, f"{report[key]:,}"] for key, label in PARAMETER_ROWS),
            ["weights on disk", _mb(report["bytes_on_disk"])],
            ["bits per weight (quantized linears)", _bits(report["linear_bits_per_weight"])],
            ["wall time", f"{report['eval_wall_s']} s"],
            ["peak RSS", f"{report['peak_rss_mb']:.0f} MB"],
            ["quantized and pruned linears", "kept packed" if keep_packed else "unpacked where packed"],
            ["device", report["device"]],
            ["threads", report["threads"]]]
    click.echo(tabulate(rows, tablefmt="github", headers=[model, ""]))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


@main.command(cls=_Command)
@click.argument("checkpoint", type=click.Path())
@click.option("--modules", is_flag=True, help="List every compressed module.")
def info(checkpoint: str, modules: bool) -> None:
    """Summarise what was done to which modules of CHECKPOINT."""
    from compressor.checkpoint import linear_bits_per_weight, memory_bytes, weight_bytes
    from compressor.checkpoint_format import read_compression_config

    cc = read_compression_config(checkpoint) if Path(checkpoint).is_dir() else None
    if cc is None:
        raise CompressorError(f"{checkpoint} is not a compressor checkpoint folder (no compression_config "
                              "in config.json)")
    recipe = cc["recipe"]
    memory = memory_bytes(checkpoint)
    click.echo(f"checkpoint: {checkpoint}\nsource model: {cc['source']}\ndtype: {recipe['dtype']}\n"
               f"weights on disk: {_mb(weight_bytes(checkpoint))}\n"
               f"weights in memory when loaded: {_mb(memory['unpacked'])} (the default: quantized and pruned "
               f"linears unpacked), {_mb(memory['packed'])} with keep_packed\n"
               f"bits per weight of the quantized linears: {_bits(linear_bits_per_weight(cc))}\n"
               f"versions: {', '.join(f'{k} {v}' for k, v in cc['versions'].items())}")
    run_report = Path(checkpoint) / "compress_report.json"
    if run_report.is_file():
        report = json.loads(run_report.read_text())
        threads = report["threads"]
        click.echo(f"compressed in {report['compress_wall_s']} s on {threads} thread{'s' * (threads > 1)}, "
                   f"peak RSS {report['compress_memory']['peak_rss_mb']:.0f} MB"
                   + (f"; evaluated after with peak RSS {report['after']['peak_rss_mb']:.0f} MB"
                      if "peak_rss_mb" in report.get("after", {}) else ""))
    if "parameters" in cc:
        for key, label in PARAMETER_ROWS:
            dense, now = cc["parameters"]["dense"][key], cc["parameters"]["compressed"][key]
            click.echo(f"{label}: {now:,} of {dense:,} dense ({now / dense:.1%})")
    widths = residual_widths(cc)
    if widths:
        click.echo("residual stream width per decoder layer: " + ", ".join(
            f"{layers} {width}" for width, layers in widths))
    by_pass: dict[str, list[dict]] = defaultdict(list)
    for records in cc["modules"].values():
        for r in records:
            by_pass[r["pass"]].append(r)
    rows = []
    for i, spec in enumerate(recipe["passes"]):
        (name, params), = spec.items()
        settings = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("targets", "ignore"))
        done = by_pass.get(name, [])
        sparsity = [r["sparsity"] for r in done if "sparsity" in r]
        mean = f"{sum(sparsity) / len(sparsity):.4f}" if sparsity else "-"
        rows.append([i, name, settings, len(done), mean])
    click.echo(tabulate(rows, headers=["#", "pass", "settings", "modules", "mean sparsity"], tablefmt="github"))
    if modules:
        rows = [[name, "; ".join(_describe(r) for r in records)] for name, records in cc["modules"].items()]
        click.echo(tabulate(rows, headers=["module", "what was done"], tablefmt="github"))


@main.command(cls=_Command)
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gguf"]), required=True,
              help="compressed-tensors: the folder vLLM and transformers load quantized models from; gguf: the "
              "file llama.cpp runs (OUT ends in .gguf).")
@click.option("--dense-fallback", is_flag=True, help="Write linears the format cannot hold (compressed-tensors: "
              "2/3-bit, pruned, low-rank; gguf: anything not quantized with `gguf:`) as dense weights instead of "
              "refusing.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="compressed-tensors: dtype of scales and unquantized weights (default: the checkpoint's).")
@click.option("--int8-activations", is_flag=True, help="compressed-tensors: the W4A8 variant for CPU serving: "
              "symmetric 4-bit weights, activations quantized to int8 per token at run time (vLLM's CPU build runs "
              "4-bit weights so).")
@click.option("--embedding-type", default="auto", show_default=True, help="gguf: the token embeddings' type "
              "(F32, F16 or a block type; auto: as llama-quantize's K-quant files).")
@click.option("--head-type", default="auto", show_default=True, help="gguf: the output head's type (and the "
              "embeddings' when tied to it).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(checkpoint: str, out: str, fmt: str, dense_fallback: bool, dtype: str | None, int8_activations: bool,
           embedding_type: str, head_type: str, overwrite: bool) -> None:
    """Write CHECKPOINT in another format to OUT (a folder; a .gguf file for gguf)."""
    if fmt == "gguf":
        from compressor.export_gguf import export_gguf

        path = export_gguf(checkpoint, out, embedding_type, head_type, dense_fallback, overwrite)
        click.echo(f"wrote {path} (gguf); run it with llama.cpp: `llama-cli -m {path}`")
        return
    from compressor.export import export_compressed_tensors

    path = export_compressed_tensors(checkpoint, out, dense_fallback, dtype, overwrite, int8_activations)
    click.echo(f"wrote {path} ({fmt}); serve it with `vllm serve {path}`, or load it with transformers' "
               "AutoModelForCausalLM.from_pretrained (with compressed-tensors installed)")


def residual_widths(cc: dict) -> list[tuple[int, str]]:
    """[(width, "layers a-b")] from the records a slice pass leaves on each decoder layer."""
    per_layer = {int(name.rpartition(".")[2]): records[-1]["width"] for name, records in cc["modules"].items()
                 if name.rpartition(".")[2].isdigit() and records[-1]["pass"] == "slice"}
    runs: list[list[int]] = []  # [width, first layer, last layer]
    for layer in sorted(per_layer):
        if runs and runs[-1][0] == per_layer[layer] and runs[-1][2] == layer - 1:
            runs[-1][2] = layer
        else:
            runs.append([per_layer[layer], layer, layer])
    return [(w, f"layer {a}" if a == b else f"layers {a}-{b}") for w, a, b in runs]


def _describe(record: dict) -> str:
    return record["pass"] + " " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in record.items() if k != "pass")


def _protocol(report: dict) -> str:
    windows = "full split" if report["windows"] == report["windows_in_split"] else f"windows={report['windows']}"
    return f"{report['protocol']}, L={report['seqlen']}, {windows}"


def _bits(bits: float | None) -> str:
    return "-" if bits is None else f"{bits:.3f}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
