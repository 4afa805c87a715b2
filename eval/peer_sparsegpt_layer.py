"""Our SparseGPT against llm-compressor's on single linears: same weight, same Hessian, both algorithms.

Run with the peer's environment (it imports llm-compressor):
    .peer/bin/python eval/peer_sparsegpt_layer.py [--windows 8] [--layers 3 10 20]
Prints, for each linear and pattern, both output errors tr(D H D^T) (D = W - W_pruned, in float64), the
fraction of weights whose kept/pruned state differs and the largest weight difference. The Hessians are the
dense model's (no earlier layer pruned), from the engine's own statistics pass.
"""

import argparse

import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
from run import dense_linears

from compressor.models import load_model
from compressor.passes.lrec import output_error
from compressor.passes.prune import sparsegpt

PATTERNS = {"50%": (0.5, None), "2:4": (0.5, (2, 4)), "4:8": (0.5, (4, 8))}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def peer_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    kept, m = nm or (0, 0)  # (0, 0): unstructured
    # llm-compressor's prune_n counts the pruned weights of every m (for 2:4 and 4:8 the same as the kept ones)
    _, pruned = sparsify_weight(linear, {linear: hessian.clone()}, sparsity, m - kept, m, 128, 0.01, False)
    return pruned.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 10, 20])
    args = parser.parse_args()
    print("| layer | linear | pattern | ours tr(DHD^T) | llm-compressor | kept/pruned differ | max weight diff |")
    print("|---|---|---|---|---|---|---|")
    for i, name, weight, hessian in dense_linears(load_model(args.model), args.windows, args.layers, LINEARS):
        for label, (sparsity, nm) in PATTERNS.items():
            ours = sparsegpt(weight, hessian, sparsity, nm)
            peer = peer_sparsegpt(weight, hessian, sparsity, nm)
            differ = ((ours == 0) != (peer == 0)).float().mean().item()
            print(f"| {i} | {name} | {label} | {output_error(weight - ours, hessian):.5g} | "
                  f"{output_error(weight - peer, hessian):.5g} | {differ:.2e} | "
                  f"{(ours - peer).abs().max().item():.3g} |", flush=True)


if __name__ == "__main__":
    main()
