"""Layer-level look at W2 + LREC against W3: each linear's output error ||X (W - W')^T||^2 after GPTQ
W2 + LREC factors worth 1.0 extra bit per weight (float16, int8 or int4 factors, LoftQ-style alternation off
or on) and after GPTQ W3, as a fraction of GPTQ W2's own output error, on one decoder layer of the
dense model (its inputs are the dense model's, so the numbers are about the quantizers alone).

    python eval/lrec_layer_error.py --model bundled:smollm2-135m --layer 5 [--samples 4]
Prints a markdown table: one row per linear, one column per method, and the mean over the linears.
"""

import argparse

import torch
from run import GROUP_SIZE, dense_layers, layer_hessians

from compressor.models import load_model
from compressor.passes.lrec import LREC, output_error
from compressor.passes.quantize import GPTQ

METHODS = {  # name -> (LREC parameters, or None for GPTQ W3 alone)
    "W3": None,
    "W2 + LREC fp16": {"factor_bits": 16},
    "W2 + LREC int8": {"factor_bits": 8},
    "W2 + LREC int4": {"factor_bits": 4},
    "W2 + LREC fp16, alternate 4": {"factor_bits": 16, "alternate": 4},
    "W2 + LREC int8, alternate 4": {"factor_bits": 8, "alternate": 4},
    "W2 + LREC int4, alternate 4": {"factor_bits": 4, "alternate": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4, help="calibration windows of 2048 tokens")
    args = parser.parse_args()
    _, layer, hidden, kwargs = next(dense_layers(load_model(args.model), args.samples, [args.layer]))
    names = [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    hessians = layer_hessians(layer, names, hidden, kwargs)
    group = GROUP_SIZE[args.model]
    print(f"| {args.model} layer {args.layer} | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    totals = dict.fromkeys(METHODS, 0.0)
    for name, H in hessians.items():
        weight = layer.get_submodule(name).weight.data.float()
        w2, _ = GPTQ(bits=2, group_size=group).apply(name, layer.get_submodule(name), H)
        w2_error = output_error(weight - w2.weight_dequantized(torch.float32), H)
        row = []  # output error left, as a fraction of GPTQ W2's
        for lrec in METHODS.values():
            if lrec is None:
                w3, _ = GPTQ(bits=3, group_size=group).apply(name, layer.get_submodule(name), H)
                row.append(output_error(weight - w3.weight_dequantized(torch.float32), H) / w2_error)
            else:  # a fresh W2 each time: lrec changes the codes it is given when it alternates
                w2, _ = GPTQ(bits=2, group_size=group).apply(name, layer.get_submodule(name), H)
                row.append(LREC(extra_bits=1.0, **lrec).apply(name, w2, H)[1]["output_error_kept"])
        for method, kept in zip(METHODS, row, strict=True):
            totals[method] += kept / len(hessians)
        print(f"| {name} | " + " | ".join(f"{kept:.3f}" for kept in row) + " |")
    print("| mean | " + " | ".join(f"{t:.3f}" for t in totals.values()) + " |")


if __name__ == "__main__":
    main()
