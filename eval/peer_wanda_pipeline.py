"""Our whole Wanda pipeline against llm-compressor's `oneshot`: the masks of every decoder linear.

Run with the peer's environment (it imports llm-compressor):
    .peer/bin/python eval/peer_wanda_pipeline.py --load FOLDER [--sparsity 2:4] [--windows 8]
FOLDER: our environment's conversion of the model (see eval/peer.py). Both prune the dense model, layer by
layer, each layer's statistics taken on the outputs of the layers it already pruned, with the same
calibration windows: ours through the engine (`compress_model`), theirs through `oneshot` (eval/peer.py's
Wanda). Prints the perplexity of both pruned models (and the dense one) on the first --eval-windows eval
windows, then for each layer the largest fraction of weights whose kept/pruned state differs between the
two, over its linears. `--norms running_mean` (our default since session 44): ours sums the statistic with
llm-compressor's arithmetic, so the two differ only in the layers' own rounding; `--norms sum`: in float64.
"""

import argparse

import torch
from peer import METHODS, run_oneshot
from run import SPARSITIES, calibration_ids, pruned_masks

from compressor.engine import compress_model
from compressor.evaluate import perplexity
from compressor.models import LoadedModel, load_model
from compressor.passes.prune import Wanda
from compressor.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="the model folder both start from")
    parser.add_argument("--sparsity", default="2:4", choices=[label for label, _ in SPARSITIES])
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--norms", choices=Wanda.norms_allowed, default=Wanda.norms,
                        help="how our Wanda sums the input norms (the pass's `norms`)")
    args = parser.parse_args()

    def ppl(loaded: LoadedModel) -> float:
        return perplexity(loaded.model, loaded.tokenizer, windows=args.eval_windows, progress=False)["ppl"]

    loaded = load_model(args.load)
    ids = calibration_ids(loaded.tokenizer, args.windows)
    results = {"dense": ppl(loaded)}
    wanda = dict(SPARSITIES)[args.sparsity] | {"norms": args.norms}
    recipe = load_recipe({"model": args.load, "passes": [{"wanda": wanda}]})
    with torch.no_grad():
        compress_model(loaded.model, loaded.adapter, recipe.passes, ids, torch.device("cpu"), False)
    ours, results["ours"] = pruned_masks(loaded), ppl(loaded)

    loaded = load_model(args.load)
    run_oneshot(loaded.model, ids, METHODS[f"wanda {args.sparsity}"]())
    peer, results["llm-compressor"] = pruned_masks(loaded), ppl(loaded)

    print(f"first {args.eval_windows} eval windows: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    print("| layer | most weights differing in one linear | which |")
    print("|---|---|---|")
    for i, (layer_ours, layer_peer) in enumerate(zip(ours, peer, strict=True)):
        differ = {name: (mask != layer_peer[name]).float().mean().item() for name, mask in layer_ours.items()}
        worst = max(differ, key=differ.get)
        print(f"| {i} | {differ[worst]:.2e} | {worst} |")


if __name__ == "__main__":
    main()
