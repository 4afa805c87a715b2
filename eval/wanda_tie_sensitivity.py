"""How far rounding-sized changes to Wanda's statistics move the pruned model's perplexity.

Two correct Wanda implementations differ in how they sum ||X_j||^2: we sum in float64, llm-compressor keeps a
float32 running mean (relative error of order 1e-6 after 64 windows). Either choice flips the near-tied
weights of some rows; each flip changes the next layer's inputs, so later layers pick other masks. This
script measures what that costs: it runs our Wanda with every linear's input norms multiplied by
(1 + eps * N(0, 1)), one draw per seed (seed 0: unperturbed), and reports perplexity on the first
--eval-windows eval windows, the fraction of decoder-linear weights whose kept/pruned state differs from
seed 0, and per decoder layer the largest such fraction in one of its linears. A gap between two tools
smaller than this spread says nothing about which is better.

    python eval/wanda_tie_sensitivity.py --model bundled:gemma-3-270m --sparsity 2:4 --seeds 0 1 2 3

`--running-mean` sums the statistic as llm-compressor does instead (`wanda: {norms: running_mean}`: per
window, the float32 norm of each input column squared, folded into a float32 running mean), then perturbs it
the same way; `--reverse` / `--shuffle SEED` feed the calibration windows in the orders eval/peer.py gives
llm-compressor. Together they ask whether our pipeline with the peer's arithmetic lands where the peer does,
and (with seeds other than 0) whether the running mean's draws land lower than the float64 sum's.

Appends one JSON line per seed to --out (so a killed run keeps what it finished).
"""

import argparse
import json
import time
import zlib
from pathlib import Path

import torch
from run import CALIBRATION, SPARSITIES, calibration_ids, pruned_masks

from compressor import engine
from compressor.engine import compress_model
from compressor.errors import CompressorError
from compressor.evaluate import perplexity
from compressor.models import load_model
from compressor.models.sources import resolve
from compressor.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
COLLECT_STATS = engine.collect_stats  # the engine's own, which each seed's wrapper calls


def perturbed_stats(seed: int, eps: float):
    """engine.collect_stats, with each input-norm statistic scaled by 1 + eps * N(0, 1) in float64 (seeded by
    linear; seed 0: unperturbed)."""

    def collect_perturbed(layer, linears, *args, **kwargs):
        stats = COLLECT_STATS(layer, linears, *args, **kwargs)
        for name, stat in stats.items():
            if stat.dim() == 1 and seed != 0:  # the input norms, [in]
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                stats[name] = stat.double() * (1 + eps * torch.randn(stat.shape, generator=generator,
                                                                     dtype=torch.float64))
        return stats
    return collect_perturbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sparsity", default="2:4", choices=[label for label, _ in SPARSITIES])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calibration-windows", type=int, default=CALIBRATION["samples"])
    parser.add_argument("--running-mean", action="store_true", help="llm-compressor's float32 running mean "
                        "instead of the float64 sum (each seed but 0 then perturbs it)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--reverse", action="store_true", help="calibration windows last first")
    order.add_argument("--shuffle", type=int, metavar="SEED", help="calibration windows in this seed's order")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "wanda-tie-sensitivity.jsonl")
    args = parser.parse_args()
    if min(args.calibration_windows, args.eval_windows) < 1:
        parser.error("--calibration-windows and --eval-windows need at least 1 window each")
    try:
        resolve(args.model)  # a model that cannot load fails here, with the loader's message, not mid-run
    except CompressorError as error:
        parser.error(str(error))

    reference = None
    wanda = dict(SPARSITIES)[args.sparsity] | {"norms": "running_mean" if args.running_mean else "sum"}
    recipe = load_recipe({"model": args.model, "passes": [{"wanda": wanda}]})
    for seed in args.seeds:
        loaded = load_model(args.model)
        ids = calibration_ids(loaded.tokenizer, args.calibration_windows, args.reverse, args.shuffle)
        engine.collect_stats = perturbed_stats(seed, args.eps)
        start = time.perf_counter()
        with torch.no_grad():
            compress_model(loaded.model, loaded.adapter, recipe.passes, ids, torch.device("cpu"), False)
        compress_s = time.perf_counter() - start
        result = perplexity(loaded.model, loaded.tokenizer, windows=args.eval_windows, progress=False)
        current = pruned_masks(loaded)  # per decoder layer: linear name -> mask
        if seed == 0:
            reference = current
        differ, by_layer = None, None
        if reference is not None:
            pairs = [(mask, ref[name]) for layer, ref in zip(current, reference, strict=True)
                     for name, mask in layer.items()]
            differ = sum((a != b).sum().item() for a, b in pairs) / sum(a.numel() for a, _ in pairs)
            by_layer = [max((mask != ref[name]).float().mean().item() for name, mask in layer.items())
                        for layer, ref in zip(current, reference, strict=True)]
        row = {"model": args.model, "method": f"wanda {args.sparsity}", "seed": seed, "eps": args.eps,
               "statistic": "float32 running mean (llm-compressor's)" if args.running_mean else "float64 sum",
               "order": "reversed" if args.reverse else f"shuffled, seed {args.shuffle}"
               if args.shuffle is not None else "given",
               "ppl": result["ppl"], "protocol": result["protocol"], "windows": result["windows"],
               "windows_in_split": result["windows_in_split"],
               "calibration": CALIBRATION | {"samples": args.calibration_windows},
               "mask_differs_from_seed_0": differ,
               "most_differing_linear_by_layer": by_layer,
               "compress_s": round(compress_s, 1)}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
