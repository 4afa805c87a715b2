"""How `lrec_refine` settings lower one decoder layer's error on calibration windows it did not train on.

Quantizes the chosen layers only (GPTQ W2 g128 + LREC 1.0 extra bits, int8 factors: the Gemma W2 recipe's
passes; --factor-bits 4: int4 factors; --bits and --rank: other grids and a fixed rank; the other layers stay
dense, so each chosen layer sees dense inputs),
then, from the same starting factors, refines each with every setting in --configs on the first --train
calibration windows and reports the next-norm relative error (`loss: next_norm`) on the --heldout windows after
them: after 5 and 20 steps and every 50 (the factors as trained: integer factors rounded as stored) and at the
end (stored).

    python eval/refine_heldout.py --layers 3 12 --configs 1e-3:300 3e-3:200 1e-3:300:scales:bfloat16

A config is lr:steps, then optionally `scales` (train the group scales too) and/or `bfloat16` (autocast).
Appends one JSON line per layer and config to --out.
"""

import argparse
import json
import time

import torch

from compressor.data import calibration_windows, load_documents
from compressor.engine import compress_model
from compressor.models import load_model
from compressor.passes import lrec_refine
from compressor.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled:gemma-3-270m")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 12])
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["1e-3:100", "1e-3:300"])
    ap.add_argument("--factor-bits", type=int, default=8, help="the lrec pass's factor_bits")
    ap.add_argument("--bits", type=int, default=2, help="GPTQ's bits (groups of 128)")
    ap.add_argument("--rank", type=int, help="a fixed LREC rank instead of 1.0 extra bits per weight")
    ap.add_argument("--out", default="refine-heldout.jsonl")
    args = ap.parse_args()
    targets = [r"re:model\.layers\.(" + "|".join(map(str, args.layers)) + r")\..*"]
    recipe = load_recipe({
        "model": args.model,
        "calibration": {"dataset": "bundled:wikileads", "samples": args.train + args.heldout, "seqlen": 2048,
                        "seed": 0},
        "passes": [{"gptq": {"bits": args.bits, "group_size": 128, "targets": targets}},
                   {"lrec": {**({"rank": args.rank} if args.rank else {"extra_bits": 1.0}),
                             "factor_bits": args.factor_bits, "targets": targets}},
                   {"lrec_refine": {"steps": 1, "loss": "next_norm", "targets": targets}}]})

    def sweep(self, model, adapter, index, layer, hidden, kwargs, device, names):
        """Stands in for lrec_refine.apply_layer: tries every config from the same start, then restores it."""
        if not names:
            return hidden, {}, None
        linears = {n: model.get_submodule(n) for n in names}
        start = {n: (q.low_rank_factors(), q.scales.clone()) for n, q in linears.items()}
        train, held = hidden[:args.train], hidden[args.train:]
        train_targets = lrec_refine.dense_outputs(layer, train, kwargs, device)
        held_targets = lrec_refine.dense_outputs(layer, held, kwargs, device)
        readout = lrec_refine.next_norm(model, adapter, index)

        def heldout_error() -> float:  # the layer as it stands, on the held-out windows
            return lrec_refine.mean_error(layer, held, held_targets, kwargs, device, readout, None)

        unrefined = heldout_error()
        for config in args.configs:
            lr, steps, *flags = config.split(":")
            refine = lrec_refine.LRECRefine(steps=int(steps), lr=float(lr), scales="scales" in flags,
                                            loss="next_norm", autocast="bfloat16" if "bfloat16" in flags else "none")
            curve = []  # (step, held-out error)

            def probe(step: int, curve: list = curve) -> None:
                if step in (5, 20) or step % 50 == 0:
                    curve.append((step, round(heldout_error(), 6)))

            began = time.time()
            factors, scale_factors, _ = refine.fit(layer, linears, train, train_targets, kwargs, device, readout,
                                                   None, probe)
            seconds = time.time() - began
            with torch.no_grad():  # store as the pass does, measure, then put the starting state back
                lrec_refine.store(linears, factors, scale_factors)
                stored = heldout_error()
                for n, ((a, b), scales) in start.items():
                    linears[n].set_low_rank(a, b)
                    linears[n].scales.copy_(scales)
            row = {"model": args.model, "layer": index, "train_windows": len(train), "heldout_windows": len(held),
                   "bits": args.bits, "rank": args.rank or "1.0 extra bits", "factor_bits": args.factor_bits,
                   "config": config, "unrefined": round(unrefined, 6),
                   "curve": curve, "stored": round(stored, 6),
                   "seconds": round(seconds), "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if index == max(args.layers):
            raise SystemExit(0)  # nothing after the last chosen layer is needed
        return hidden, {}, None

    lrec_refine.LRECRefine.apply_layer = sweep  # the recipe's lrec_refine runs the sweep instead
    loaded = load_model(recipe.model, recipe.dtype)
    cal = recipe.calibration
    windows = calibration_windows(loaded.tokenizer, load_documents(cal.dataset, "calibration"), cal.samples,
                                  cal.seqlen, cal.seed)
    with torch.no_grad():
        compress_model(loaded.model, loaded.adapter, recipe.passes, windows, torch.device("cpu"), progress=False)


if __name__ == "__main__":
    main()
