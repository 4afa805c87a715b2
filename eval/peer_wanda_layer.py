"""Our Wanda against llm-compressor's on single linears: same weight, same calibration inputs, both codes.

Run with the peer's environment (it imports llm-compressor):
    .peer/bin/python eval/peer_wanda_layer.py [--model bundled:gemma-3-270m] [--windows 8] [--layers 3 10 16]
Each side computes its own input statistic from the same inputs (ours: float64 sum_t x_tj^2 from the
engine's statistics pass; theirs: a float32 running mean from `accumulate_row_scalars`, one call per
window) and prunes the same float32 weight with it. Prints the fraction of weights whose kept/pruned state
differs, and both scores' summed output error ||X (W - W_pruned)^T||^2 on those inputs (in float64).
Inputs are the dense model's (no earlier layer pruned).
"""

import argparse

import torch
from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import accumulate_row_scalars, sparsify_weight
from run import dense_layers, layer_hessians

from compressor.engine import collect_stats, run_layer
from compressor.models import load_model
from compressor.passes.lrec import output_error
from compressor.passes.prune import Wanda

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None), "4:8": ("4:8", None)}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def peer_row_scalars(layer: torch.nn.Module, linears: dict, hidden: list, kwargs: dict) -> dict:
    """llm-compressor's statistic for each linear, fed window by window as its hooks would."""
    scalars = {name: (torch.zeros(lin.in_features), 0) for name, lin in linears.items()}

    def hook(name):
        def accumulate(module, inputs, output):
            row, count = scalars[name]
            scalars[name] = accumulate_row_scalars(inputs[0], module, row, count)
        return accumulate

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    for h in hidden:
        run_layer(layer, h, kwargs, torch.device("cpu"))
    for handle in handles:
        handle.remove()
    return {name: row for name, (row, _) in scalars.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:gemma-3-270m")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 10, 16])
    args = parser.parse_args()
    print("| layer | linear | pattern | kept/pruned differ | ours sum ||X D^T||^2 | llm-compressor |")
    print("|---|---|---|---|---|---|")
    for i, layer, hidden, kwargs in dense_layers(load_model(args.model), args.windows, args.layers):
        linears = {name: layer.get_submodule(name) for name in LINEARS}
        ours_stats = collect_stats(layer, linears, hidden, kwargs, "input_sq_norms", torch.device("cpu"))
        hessians = layer_hessians(layer, LINEARS, hidden, kwargs)
        peer_stats = peer_row_scalars(layer, linears, hidden, kwargs)
        for name, linear in linears.items():
            weight = linear.weight.data.float()
            for label, (pattern, sparsity) in PATTERNS.items():
                ours = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                ours.weight.data = weight.clone()
                Wanda(sparsity=sparsity, pattern=pattern).apply(name, ours, ours_stats[name])
                n, m = (0, 0) if sparsity else map(int, pattern.split(":"))
                peer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                peer.weight.data = weight.clone()
                # llm-compressor's prune_n counts the pruned weights of every m (2:4, 4:8: as many as kept)
                pruned = sparsify_weight(peer, {peer: peer_stats[name]}, 0.5, m - n, m).float()
                differ = ((ours.weight == 0) != (pruned == 0)).float().mean().item()
                errors = [output_error(weight - w, hessians[name]) for w in (ours.weight.data, pruned)]
                print(f"| {i} | {name} | {label} | {differ:.2e} | {errors[0]:.6g} | {errors[1]:.6g} |", flush=True)


if __name__ == "__main__":
    main()
