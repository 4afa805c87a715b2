"""Our whole Wanda pipeline against llm-compressor's `oneshot`: the masks of every decoder linear.

Run with the peer's environment (it imports llm-compressor):
    .peer/bin/python eval/peer_wanda_pipeline.py --load FOLDER [--pattern 2:4] [--windows 8]
FOLDER: our environment's conversion of the model (see eval/peer.py). Both prune the dense model, layer by
layer, each layer's statistics taken on the outputs of the layers it already pruned, with the same
calibration windows: ours through the engine (`compress_model`), theirs through `oneshot`. Prints the
perplexity of both pruned models (and the dense one) on the first --eval-windows eval windows, then for
each layer the largest fraction of weights whose kept/pruned state differs between the two, over its linears.
"""

import argparse

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from run import calibration_ids

from compressor.engine import compress_model
from compressor.evaluate import perplexity
from compressor.models import load_model
from compressor.recipe import load_recipe


def pruned_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Which weights are zero, for every linear inside the decoder layers (not the head)."""
    return {name: m.weight == 0 for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="the model folder both start from")
    parser.add_argument("--pattern", default="2:4", help="unstructured (50%%), 2:4 or 4:8")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--eval-windows", type=int, default=4)
    args = parser.parse_args()
    ppl = {}
    loaded = load_model(args.load)
    ids = calibration_ids(loaded.tokenizer, args.windows)
    ppl["dense"] = perplexity(loaded.model, loaded.tokenizer, windows=args.eval_windows, progress=False)["ppl"]
    setting = {"sparsity": 0.5} if args.pattern == "unstructured" else {"pattern": args.pattern}
    recipe = load_recipe({"model": args.load, "passes": [{"wanda": setting}]})
    with torch.no_grad():
        compress_model(loaded.model, loaded.adapter, recipe.passes, ids, torch.device("cpu"), False)
    ours = pruned_masks(loaded.model)
    ppl["ours"] = perplexity(loaded.model, loaded.tokenizer, windows=args.eval_windows, progress=False)["ppl"]

    loaded = load_model(args.load)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern  # llm-compressor's "unstructured"
    modifier = WandaPruningModifier(sparsity=0.5, mask_structure=structure, targets=["Linear"],
                                    ignore=["re:.*lm_head"])
    oneshot(model=loaded.model, dataset=dataset, recipe=modifier, num_calibration_samples=args.windows,
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    peer = pruned_masks(loaded.model)
    ppl["llm-compressor"] = perplexity(loaded.model, loaded.tokenizer, windows=args.eval_windows,
                                       progress=False)["ppl"]

    print(f"first {args.eval_windows} eval windows: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print("| layer | most weights differing in one linear | which |")
    print("|---|---|---|")
    differ = {name: (ours[name] != peer[name]).float().mean().item() for name in ours}
    for i in sorted({int(name.split("layers.")[1].split(".")[0]) for name in differ}):
        worst = max((name for name in differ if f"layers.{i}." in name), key=differ.get)
        print(f"| {i} | {differ[worst]:.2e} | {worst.split(f'layers.{i}.')[1]} |")


if __name__ == "__main__":
    main()
