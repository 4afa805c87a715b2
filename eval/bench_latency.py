"""Forward latency and memory on this machine's CPU: a dense model against compressed checkpoints.

    python eval/bench_latency.py bundled:smollm2-135m out/w4 out/wanda-2of4 [...] [--threads 1 2]

For each model, mode (`default`: quantized and pruned linears unpacked at load, as `compressor.load` gives
them; `packed`: `keep_packed=True`, each weight rebuilt on every call) and thread count, one fresh process
times at batch 1 a forward over a prompt of each `--prompts` length (prefill) and one decoding step with a
KV cache of the first prompt length, and another process the same decoding step at batch 8: median of the
repeats after one warm-up. A fresh process per measurement keeps them apart (in one shared process the KV
cache's concatenations varied up to 4x from model to model) and gives each its own peak RSS (loading
included). With `--eval-windows N`, each model and mode is also evaluated by `compress eval --windows N` in
its own process (wall time, peak RSS, perplexity); `--no-latency` skips the latency runs. Rows measured
again replace the old ones in eval/results/latency.json (which keeps the command of each run); latency.md
is rewritten from it.
"""

import argparse
import json
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from run import code_version, compress_cmd, cpu_name  # eval/run.py: the commit and machine every result names

ROOT = Path(__file__).resolve().parents[1]
MODES = ("default", "packed")


@torch.no_grad()
def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


@torch.no_grad()
def measure(source: str, mode: str, threads: int, batch: int, prompts: list[int], repeats: int) -> dict:
    """One process's measurements (see the module docstring)."""
    from compressor.api import open_model

    torch.set_num_threads(threads)
    model = open_model(source, keep_packed=mode == "packed").model.eval()
    generator = torch.Generator().manual_seed(0)
    row = {"model": source, "mode": mode, "threads": threads, "batch": batch}
    if batch == 1:
        for tokens in prompts:
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
            row[f"prefill_{tokens}_ms"] = median_ms(lambda ids=ids: model(input_ids=ids, use_cache=False),
                                                    max(3, repeats // 2))
    ids = torch.randint(0, model.config.vocab_size, (batch, prompts[0]), generator=generator)
    cache = model(input_ids=ids, use_cache=True).past_key_values

    def decode():
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token again, so every step sees the prompt's cache length

    row["decode_ms"] = median_ms(decode, repeats)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def measure_eval(source: str, mode: str, threads: int, windows: int) -> dict:
    """`compress eval` of `source` on the first `windows` windows, in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        subprocess.run(compress_cmd("eval", source, "--windows", str(windows), "--threads", str(threads),
                                    "--json", str(report), *(["--keep-packed"] * (mode == "packed"))),
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        r = json.loads(report.read_text())
    return {"model": source, "mode": mode, "threads": threads, "windows": windows, "eval_wall_s": r["eval_wall_s"],
            "peak_rss_mb": round(r["peak_rss_mb"]), "ppl": round(r["ppl"], 4)}


def describe(source: str) -> str:
    """`source`, and for a checkpoint its recipe's passes as written: "out/w4 (rtn bits=4 group_size=64)"."""
    from compressor.checkpoint_format import read_compression_config

    cc = read_compression_config(source)
    if cc is None:
        return source
    passes = [f"{name} " + " ".join(f"{k}={v}" for k, v in params.items() if k not in ("targets", "ignore"))
              for spec in cc["recipe_as_written"]["passes"] for name, params in spec.items()]
    return f"{source} ({'; '.join(passes)})"


def has_packed_weights(source: str) -> bool:
    from compressor.checkpoint_format import read_compression_config

    cc = read_compression_config(source)
    return cc is not None and any(r.get("runtime", {}).get("class") in ("QuantLinear", "SparseLinear")
                                  for records in cc["modules"].values() for r in records)


def write(rows: list[dict], eval_rows: list[dict], commands: list[str], prompts: list[int], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "commands": commands, "rows": rows,
                                                     "eval_rows": eval_rows}, indent=2) + "\n")
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["mode"], r["threads"])
        entry = merged.setdefault(key, {"model": r["model"], "mode": r["mode"], "threads": r["threads"]})
        entry.update({k: v for k, v in r.items() if k.startswith("prefill")})
        entry[f"decode_b{r['batch']}_ms"] = r["decode_ms"]
        entry["peak_rss_mb"] = max(entry.get("peak_rss_mb", 0), r["peak_rss_mb"])
    columns = [*(f"prefill_{t}_ms" for t in prompts), "decode_b1_ms", "decode_b8_ms"]
    labels = [*(f"prefill {t}" for t in prompts), "decode, batch 1", "decode, batch 8"]
    dense_model = (rows or eval_rows)[0]["model"] if rows or eval_rows else None
    lines = ["# latency", "",
             f"Reproduce: {'; '.join(commands)}. Machine: {machine()}. Median of the repeats after a warm-up; "
             "prefill = one forward over a prompt of that many tokens at batch 1, decode = one token with a KV "
             f"cache of {prompts[0]} tokens. Beside each checkpoint: its recipe's passes as written. Mode default: "
             "quantized and pruned linears unpacked at load "
             "(`compressor.load`); packed: `keep_packed=True`. (x dense): against the dense model at the same "
             "thread count. Peak RSS: the process's, loading included (the largest of its measurements).", "",
             "| threads | model | mode | " + " | ".join(labels) + " | peak RSS |",
             "|---|---|---|" + "---|" * len(labels) + "---|"]
    for (model, mode, threads), entry in merged.items():
        dense = merged.get((dense_model, "default", threads), {})
        cells = []
        for column in columns:
            value = entry.get(column)
            ratio = f" ({value / dense[column]:.2f}x)" if value and dense.get(column) else ""
            cells.append("-" if value is None else f"{value} ms{ratio}")
        lines.append(f"| {threads} | {describe(model)} | {mode} | " + " | ".join(cells)
                     + f" | {entry['peak_rss_mb']} MB |")
    if eval_rows:
        lines += ["", "`compress eval` of each model (perplexity by protocol v1 on the first windows only), in its "
                  "own process:", "",
                  "| threads | model | mode | windows | wall time | x dense | peak RSS | perplexity |",
                  "|---|---|---|---|---|---|---|---|"]
        dense = {(r["threads"], r["windows"]): r for r in eval_rows if r["model"] == dense_model}
        for r in eval_rows:
            base = dense.get((r["threads"], r["windows"]))
            ratio = f"{r['eval_wall_s'] / base['eval_wall_s']:.2f}" if base else "-"
            lines.append(f"| {r['threads']} | {describe(r['model'])} | {r['mode']} | {r['windows']} | "
                         f"{r['eval_wall_s']} s | {ratio} | {r['peak_rss_mb']} MB | {r['ppl']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, float32, CPU"


def command() -> str:
    return (f"`python eval/bench_latency.py {' '.join(sys.argv[1:])}` at commit {code_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="the dense source first, then checkpoints")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prefill lengths; the first "
                        "is also the decode step's KV cache length")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--eval-windows", type=int, help="also time `compress eval --windows N` of each model")
    parser.add_argument("--no-latency", action="store_true", help="skip the prefill and decode measurements")
    args = parser.parse_args()
    stem = ROOT / "eval" / "results" / "latency"
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    rows, commands = old.get("rows", []), [*old.get("commands", []), command()]
    eval_rows = old.get("eval_rows", [])
    for threads in args.threads:
        for model in args.models:
            for mode in MODES if has_packed_weights(model) else MODES[:1]:
                if args.eval_windows:
                    row = measure_eval(model, mode, threads, args.eval_windows)
                    key = [row[k] for k in ("model", "mode", "threads", "windows")]
                    eval_rows = [r for r in eval_rows if [r[k] for k in ("model", "mode", "threads", "windows")]
                                 != key] + [row]
                    print(row, flush=True)
                    write(rows, eval_rows, commands, args.prompts, stem)
                for batch in () if args.no_latency else (1, 8):
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
                        row = fresh_process.submit(measure, model, mode, threads, batch, args.prompts,
                                                   args.repeats).result()
                    key = [row[k] for k in ("model", "mode", "threads", "batch")]
                    rows = [r for r in rows if [r[k] for k in ("model", "mode", "threads", "batch")] != key] + [row]
                    print(row, flush=True)
                    write(rows, eval_rows, commands, args.prompts, stem)


if __name__ == "__main__":
    main()
