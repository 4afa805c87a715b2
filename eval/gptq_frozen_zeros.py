"""Our GPTQ with a dense model's exact-zero weights frozen at zero (before b03baa4) or quantized like the rest
(since), on single linears of the dense model: same weight, same Hessian.

    python eval/gptq_frozen_zeros.py [--model bundled:gemma-3-270m] [--windows 8] [--layers 3 9 15] [--bits 3 4]

Prints each linear's share of exact zeros and the ratio of output errors tr(D H D^T) (D = W - W_quantized,
float64), frozen over not, at GPTQ's defaults (act-order, clip search, sink weight 1) and the model's group size.
"""

import argparse

from run import GROUP_SIZE, dense_linears, gptq_weight

from compressor.models import load_model
from compressor.passes.lrec import output_error

LINEARS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:gemma-3-270m", choices=list(GROUP_SIZE))
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()
    group_size = GROUP_SIZE[args.model]
    print(f"{args.model}, g{group_size}, {args.windows} x 2048 calibration")
    print("| layer | linear | exact zeros | bits | output error, frozen / quantized |")
    print("|---|---|---|---|---|")
    for i, name, weight, hessian in dense_linears(load_model(args.model), args.windows, args.layers, LINEARS):
        zero = weight == 0
        for bits in args.bits:
            errors = [output_error(weight - gptq_weight(weight, hessian, bits, group_size, act_order=True,
                                                         clip_search=True, pruned=pruned), hessian)
                      for pruned in (zero, None)]
            print(f"| {i} | {name} | {zero.float().mean():.3f} | {bits} | {errors[0] / errors[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
