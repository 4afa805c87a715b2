"""Our GPTQ against llm-compressor's on single linears: same weight, same Hessian, both algorithms.

Run with the peer's environment (it imports llm-compressor):
    .peer/bin/python eval/peer_gptq_layer.py --model bundled:gemma-3-270m [--windows 8] [--layers 3 9 15]
Prints, for each linear, both output errors tr(D H D^T) (D = W - W_quantized, in float64) at llm-compressor's
default GPTQ settings (W4 symmetric, static act-order, damping 0.01, blocks of 128; ours `sink_weight: 1`,
`clip_search: false`), and the largest weight difference in units of that weight's quantization step.
The Hessians are the dense model's (no earlier layer quantized), from the engine's own statistics pass;
llm-compressor's scales come from its own min-max formula on the original weights (its observer's).
"""

import argparse

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from run import GROUP_SIZE, dense_linears, gptq_weight

from compressor.models import load_model
from compressor.passes.lrec import output_error

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def peer_gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's quantized weight [out, in] and its per-weight quantization step [out, in]."""
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size,
                            actorder="static")
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)  # [out, groups]
    quantized = quantize_weight(weight[None].clone(), hessian[None].clone(), scale[None], zero_point[None], None,
                                args, blocksize=128, percdamp=0.01)[0][0]
    return quantized, scale.repeat_interleave(group_size, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:gemma-3-270m", choices=list(GROUP_SIZE))
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    args = parser.parse_args()
    group_size = GROUP_SIZE[args.model]
    print(f"{args.model}, W4 g{group_size}, {args.windows} x 2048 calibration")
    print("| layer | linear | ours tr(DHD^T) | llm-compressor | ours / theirs | max weight diff (steps) |")
    print("|---|---|---|---|---|---|")
    for i, name, weight, hessian in dense_linears(load_model(args.model), args.windows, args.layers, LINEARS):
        ours = gptq_weight(weight, hessian, 4, group_size, damp=0.01, block_size=128, act_order=True)
        peer, step = peer_gptq(weight, hessian, group_size)
        e_ours, e_peer = output_error(weight - ours, hessian), output_error(weight - peer, hessian)
        print(f"| {i} | {name} | {e_ours:.5g} | {e_peer:.5g} | {e_ours / e_peer:.4f} | "
              f"{((ours - peer).abs() / step).max().item():.3g} |", flush=True)


if __name__ == "__main__":
    main()
