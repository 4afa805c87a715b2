"""Compression time per pass on one decoder layer: where a recipe's time goes, without running it whole.

    python eval/bench_layer.py recipes/smollm2-135m-gptq-w2g64-lrec.yaml [--layer 5] [--samples 8 --seqlen 512]

Loads the recipe's model, draws its calibration windows (or `--samples` x `--seqlen` of them), runs the
uncompressed layers before `--layer` to get that layer's inputs, then applies each pass of the recipe to it
as the engine does (statistics included) and times each; then one forward of the compressed layer over the
windows (what the engine does to get the next layer's inputs). Appends a row to eval/results/compress-time.json
and rewrites compress-time.md.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from run import code_version, cpu_name  # eval/run.py: the commit and machine every result names

from compressor.data import calibration_windows, load_documents
from compressor.engine import apply_linear_pass, capture_layer_inputs, plan, run_layer
from compressor.models import load_model
from compressor.passes.base import LayerContext, LayerPass, LayerState
from compressor.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def time_layer(recipe_path: str, index: int, samples: int | None, seqlen: int | None) -> dict:
    recipe = load_recipe(recipe_path)
    cal = recipe.calibration
    samples, seqlen = samples or cal.samples, seqlen or cal.seqlen
    loaded = load_model(recipe.model, recipe.dtype)
    model, adapter, device = loaded.model, loaded.adapter, torch.device("cpu")
    windows = calibration_windows(loaded.tokenizer, load_documents(cal.dataset, "calibration", cal.text_field),
                                  samples, seqlen, cal.seed)
    targets = plan(model, adapter, recipe.passes)
    with torch.no_grad():
        hidden, layer_kwargs = capture_layer_inputs(model, adapter, windows)
        layers = adapter.decoder_layers(model)
        for i in range(index):
            hidden = [run_layer(layers[i], h, layer_kwargs[i], device) for h in hidden]
    layer, kwargs, state = layers[index], layer_kwargs[index], LayerState()
    seconds = {}
    for p, per_layer in zip(recipe.passes, targets, strict=True):
        start = time.perf_counter()
        if isinstance(p, LayerPass):
            ctx = LayerContext(model, adapter, index, layer, hidden, kwargs, device, per_layer[index], state)
            p.apply_layer(ctx, p.new_run())
        else:
            apply_linear_pass(p, model, index, layer, hidden, kwargs, device, per_layer[index], state)
        seconds[p.name] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    with torch.no_grad():
        [run_layer(layer, h, kwargs, device) for h in hidden]
    seconds["next layer's inputs"] = round(time.perf_counter() - start, 2)
    return {"recipe": recipe_path, "layer": index, "calibration": f"{samples} x {seqlen}", "seconds": seconds}


def write(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# compress-time", "", "Seconds per pass on one decoder layer (`python eval/bench_layer.py RECIPE ...`): "
             "each pass with the statistics it collects, as the engine runs it, then one forward of the compressed "
             "layer over the calibration windows. CPU, float32.", "",
             "| recipe | layer | calibration | seconds per pass | commit | date | machine | threads | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        passes = ", ".join(f"{name} {s}" for name, s in r["seconds"].items())
        lines.append(f"| {r['recipe']} | {r['layer']} | {r['calibration']} | {passes} | {r['commit']} | "
                     f"{r['date']} | {r['machine']} | {r['threads']} | {r.get('load', '-')} |")
    md = stem.with_suffix(".md")
    # what follows the table (the whole-recipe timings) is kept
    sections = (md.read_text() if md.exists() else "").partition("\n## ")
    rest = "\n## " + sections[2] if sections[1] else ""
    md.write_text("\n".join(lines) + "\n" + rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--samples", type=int, help="calibration windows (default: the recipe's)")
    parser.add_argument("--seqlen", type=int, help="calibration window length (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = time_layer(args.recipe, args.layer, args.samples, args.seqlen)
    row |= {"commit": code_version(), "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
            "threads": args.threads,
            "load": f"{os.getloadavg()[0]:.1f} (1-minute load average at the end)"}
    print(row, flush=True)
    stem = ROOT / "eval" / "results" / "compress-time"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"] if stem.with_suffix(".json").exists() else []
    write(rows + [row], stem)


if __name__ == "__main__":
    main()
