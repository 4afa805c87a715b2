"""Forward latency on this machine's CPU: a dense model against compressed checkpoints.

    python eval/bench_latency.py bundled:smollm2-135m out/smollm2-135m-slice25 [more checkpoints]

For each model and batch size (1 and 8), times a forward pass over `--tokens` tokens per sequence
(prefill) and one decoding step with a KV cache of that length: median of `--repeats` runs after
one warm-up. Each (model, batch) runs in a fresh process: in one shared process, the time of the
KV cache's concatenations varied up to 4x from model to model and decided the decode numbers.
Appends to eval/results/latency.json and rewrites latency.md.
"""

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from compressor.api import open_model
from compressor.runtime import count_parameters

ROOT = Path(__file__).resolve().parents[1]


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
def measure(source: str, batch: int, tokens: int, repeats: int, dense: str) -> dict:
    model = open_model(source).model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    prefill = median_ms(lambda: model(input_ids=ids, use_cache=False), repeats)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    step_ids = ids[:, -1:]

    def decode():
        model(input_ids=step_ids, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token again, so every step sees the prompt's cache length

    counts = count_parameters(model)
    return {"model": source, "dense_model": dense, "batch": batch, "tokens": tokens, "prefill_ms": prefill,
            "decode_step_ms": median_ms(decode, repeats), "parameters": counts["parameters"],
            "parameters_without_embeddings": counts["parameters_without_embeddings"]}


def write(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    measured = {(r["model"], r["batch"], r["tokens"]): r for r in rows}
    lines = ["# latency", "", f"Reproduce: `python eval/bench_latency.py MODEL...`. Machine: {machine()}. "
             "Median of the repeats after a warm-up; prefill = one forward over the prompt, decode = one token "
             "with a KV cache of the prompt's length. x dense: against the first model of the same command.", "",
             "| model | batch | prompt tokens | prefill | x dense | decode step | x dense | params | "
             "params without embeddings and head |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = measured.get((r["dense_model"], r["batch"], r["tokens"]))
        prefill, decode = (f"{r[k] / d[k]:.2f}" if d else "-" for k in ("prefill_ms", "decode_step_ms"))
        lines.append(f"| {r['model']} | {r['batch']} | {r['tokens']} | {r['prefill_ms']} ms | {prefill} | "
                     f"{r['decode_step_ms']} ms | {decode} | {r['parameters']:,} | "
                     f"{r['parameters_without_embeddings']:,} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine() -> str:
    import platform

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="the dense source first, then checkpoints")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    stem = ROOT / "eval" / "results" / "latency"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"] if stem.with_suffix(".json").exists() else []
    for model in args.models:
        for batch in args.batches:
            rows = [r for r in rows if (r["model"], r["batch"], r["tokens"]) != (model, batch, args.tokens)]
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
                rows.append(fresh_process.submit(measure, model, batch, args.tokens, args.repeats,
                                                 dense=args.models[0]).result())
            print(rows[-1], flush=True)
            write(rows, stem)


if __name__ == "__main__":
    main()
