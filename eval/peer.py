"""The peer: vLLM's llm-compressor (Wanda, SparseGPT, GPTQ, AWQ, QuIP, SpinQuant) on our models, calibration and
protocol v1.

llm-compressor pins its own transformers, so it runs in a separate environment that still sees
this checkout (and torch) from the main one:

    python -m venv --system-site-packages .peer
    .peer/bin/pip install llmcompressor==0.14.0.1
    .peer/bin/python eval/peer.py --model bundled:smollm2-135m --methods "wanda 50%" "sparsegpt 2:4"

Calibration: the same wikileads-calib-v1 windows (64 x 2048, seed 0) that eval/run.py gives our
passes. Every decoder linear is targeted, the head is not (as in our suites); GPTQ is symmetric int
with llm-compressor's default static act-order unless the method says otherwise. The perplexity is
measured on the model in memory right after `oneshot` (llm-compressor's sparse checkpoints do not
re-load through the peer's transformers), with fake-quantized weights for GPTQ.

Its recommended recipes beyond plain GPTQ, with the settings of its examples where they apply to these models:
AWQ (`AWQModifier(duo_scaling="both")` before round-to-nearest, "AWQ", or before GPTQ, "AWQ+GPTQ"), QuIP
(`QuIPModifier(rotations=["v", "u"], transform_type="hadamard")` before GPTQ) and SpinQuant
(`SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard")` before GPTQ), all on the symmetric
grid of our recipes (equal bits per weight). The transforms use the examples' Hadamard blocks of 128 where 128
divides the input width of every linear (Gemma-3-270m), else blocks of 64 (SmolLM2's width is 576 = 9 x 64). Its
AWQ pins the cached activations in memory for faster copies to a GPU, which fails on a machine without one
("Cannot access accelerator device"); pinning changes no number, so on a CPU-only machine the harness skips it.
Writes eval/results/peer-llmcompressor.json/.md.

When this venv's transformers converts a GGUF differently from ours (Gemma-3's tokenizer under 5.17),
give it our environment's conversion of the same model, so both tools start from the same weights and
token ids (the rows stay keyed by --model):

    .peer/bin/python eval/peer.py --model bundled:gemma-3-270m --methods "sparsegpt 50%" \
        --load "$(python -c 'from compressor.models.sources import resolve; print(resolve("bundled:gemma-3-270m"))')"

`--reverse` feeds the same calibration windows last first: the running means then round differently, which
is enough to flip Wanda 2:4's near-ties (docs/design-decisions.md), so it gives a second draw
of the peer's result; the row's calibration says "reversed". `--shuffle SEED` feeds them in a seeded random
order instead (further draws; the row says "shuffled, seed SEED").

Peak memory of a Gemma-3 run: 9.4 GB (GPTQ W4, while it evaluates: the 262k-token vocabulary's logits;
perplexity() runs without autograd, which would take it to 13-14 GB).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import llmcompressor
import torch
import transformers
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier, QuIPModifier, SpinQuantModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from run import CALIBRATION, calibration_ids  # the benchmark's calibration, so peer rows compare with ours

from compressor.models import load_model
from compressor.perplexity import perplexity, protocol_windows

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():  # pinned memory needs an accelerator (module docstring)
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
SEQLEN, SEED = CALIBRATION["seqlen"], CALIBRATION["seed"]
IGNORE = ["re:.*lm_head"]  # its names end in a dot here ("lm_head."), so a plain "lm_head" does not match
PRUNING = [("50%", {"sparsity": 0.5}), ("2:4", {"sparsity": 0.5, "mask_structure": "2:4"}),
           ("4:8", {"sparsity": 0.5, "mask_structure": "4:8"}), ("60%", {"sparsity": 0.6}), ("70%", {"sparsity": 0.7})]


def scheme(bits: int, group_size: int) -> dict:
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def gptq(bits: int, group_size: int, actorder: str | None) -> GPTQModifier:
    return GPTQModifier(config_groups=scheme(bits, group_size), ignore=IGNORE, actorder=actorder)


def best_recipe(name: str, bits: int, group_size: int) -> list:
    """The peer's recipes beyond plain GPTQ (module docstring)."""
    first = {"AWQ": lambda: AWQModifier(duo_scaling="both"), "AWQ+GPTQ": lambda: AWQModifier(duo_scaling="both"),
             "QuIP+GPTQ": lambda: QuIPModifier(rotations=["v", "u"], transform_type="hadamard", ignore=IGNORE),
             "SpinQuant+GPTQ": lambda: SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard")
             }[name]()
    if name == "AWQ":
        return [first, QuantizationModifier(config_groups=scheme(bits, group_size), ignore=IGNORE)]
    return [first, gptq(bits, group_size, "static")]


METHODS = {
    f"{name} {label}": lambda modifier=modifier, setting=setting: modifier(**setting, targets=["Linear"], ignore=IGNORE)
    for name, modifier in [("wanda", WandaPruningModifier), ("sparsegpt", SparseGPTModifier)]
    for label, setting in PRUNING
} | {
    f"GPTQ W{bits} g{group}{suffix}": lambda bits=bits, group=group, order=order: gptq(bits, group, order)
    for bits in (4, 3, 2) for group in (64, 128) for suffix, order in [("", "static"), (" no act-order", None)]
} | {
    f"{name} W{bits} g{group}": lambda name=name, bits=bits, group=group: best_recipe(name, bits, group)
    for name in ("AWQ", "AWQ+GPTQ", "QuIP+GPTQ", "SpinQuant+GPTQ") for bits in (4, 3) for group in (64, 128)
}


def transform_block(model: torch.nn.Module) -> int:
    """128 where it divides the input width of every linear, else 64."""
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return 128 if all(w % 128 == 0 for w in widths) else 64


def check_tokenizer(model_source: str, tokenizer) -> None:
    """Refuse to run when this venv's transformers splits the eval text into another number of windows than
    our suites' dense row recorded: its tokenizer differs, so neither calibration nor perplexity would compare
    (seen with Gemma-3's GGUF tokenizer under transformers 5.17: 241 windows against our 50)."""
    dense = [r for r in json.loads((ROOT / "eval" / "results" / "pruning.json").read_text())["rows"]
             if r["model"] == model_source and r["method"] == "dense"]
    ours, here = (dense[0]["windows_in_split"] if dense else None), len(protocol_windows(tokenizer, seqlen=SEQLEN))
    if ours != here:
        print(f"error: {model_source}: this venv's tokenizer (transformers {transformers.__version__}) gives {here} "
              f"eval windows, our suites {ours}; the peer's numbers would not compare. Run the pruning suite's dense "
              "row first, or pass --load with our environment's conversion of the model (see this file's "
              "docstring).", file=sys.stderr)
        raise SystemExit(2)  # bad input, as the CLI reports it: nothing compressed, nothing written


def weights_origin(folder: str | None) -> str:
    """Which transformers converted the weights this run starts from (source.json of our GGUF cache)."""
    source = Path(folder) / "source.json" if folder else None
    if source is None or not source.is_file():
        return f"loaded by transformers {transformers.__version__}"
    return f"our conversion (transformers {json.loads(source.read_text())['transformers']})"


def run_oneshot(model: torch.nn.Module, ids: torch.Tensor, recipe) -> None:
    """llm-compressor's `oneshot` with `recipe` on the calibration windows `ids` [samples, seqlen], in order."""
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)


def run(model_source: str, method: str, samples: int, windows: int | None, folder: str | None,
        reverse: bool = False, shuffle: int | None = None) -> dict:
    loaded = load_model(folder or model_source)
    check_tokenizer(model_source, loaded.tokenizer)
    ids = calibration_ids(loaded.tokenizer, samples, reverse, shuffle)  # other orders: other roundings
    recipe = METHODS[method]()
    for modifier in recipe if isinstance(recipe, list) else [recipe]:
        if hasattr(modifier, "transform_block_size"):  # the Hadamard block (module docstring)
            modifier.transform_block_size = transform_block(loaded.model)
    start = time.perf_counter()
    run_oneshot(loaded.model, ids, recipe)
    compress_wall = time.perf_counter() - start
    compress_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = perplexity(loaded.model, loaded.tokenizer, windows=windows, progress=False)
    linears = [m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum((m.weight == 0).sum().item() for m in linears) / sum(m.weight.numel() for m in linears)
    return {**result, "model": model_source, "method": method, "tool": f"llmcompressor {llmcompressor.__version__}",
            "transformers": transformers.__version__, "weights": weights_origin(folder),
            "compress_wall_s": round(compress_wall, 1), "compress_peak_rss_mb": round(compress_rss, 1),
            "linear_sparsity": round(zeros, 4),
            "calibration": f"wikileads-calib-v1, {samples} x {SEQLEN}, seed {SEED}" + (", reversed" if reverse else "")
            + (f", shuffled, seed {shuffle}" if shuffle is not None else "")}


def read_rows(stem: Path) -> list[dict]:
    path = stem.with_suffix(".json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def write(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# llm-compressor on our models, data and protocol", "",
             "Reproduce: see eval/peer.py. Calibration as the row says (64 x 2048 in every comparison); every "
             "decoder linear, not the head; perplexity of the model in memory after `oneshot`. Wall times are "
             "from the 2-core CPU machine; `conditions` in each row says what else ran meanwhile.", "",
             "| model | tool | weights | method | PPL | protocol | windows | calibration | "
             "sparsity of decoder linears | compress wall | peak RSS | conditions |", "|---" * 12 + "|"]
    for r in rows:
        weights = r.get("weights", f"loaded by transformers {r['transformers']}")
        lines.append(f"| {r['model']} | {r['tool']} | {weights} | {r['method']} | {r['ppl']:.3f} | {r['protocol']} | "
                     f"{r['windows']} of {r['windows_in_split']} | {r['calibration']} | {r['linear_sparsity']:.4f} | "
                     f"{r['compress_wall_s']} s | {r['compress_peak_rss_mb']} MB | {r.get('conditions', '')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), required=True)
    parser.add_argument("--samples", type=int, default=CALIBRATION["samples"],
                        help="calibration windows (default: the benchmark's)")
    parser.add_argument("--windows", type=int, help="first N eval windows only (quick runs)")
    parser.add_argument("--load", metavar="FOLDER", help="start from this model folder (our environment's "
                        "conversion of --model) instead of loading --model here")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--reverse", action="store_true", help="feed the calibration windows last first (the same "
                       "data, other float rounding in the running sums: a second draw of a near-tie-sensitive run)")
    order.add_argument("--shuffle", type=int, metavar="SEED", help="feed the calibration windows in this seed's "
                       "random order (further draws)")
    parser.add_argument("--conditions", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    stem = ROOT / "eval" / "results" / ("peer-llmcompressor" + (f"-windows{args.windows}" if args.windows else ""))
    for method in args.methods:
        row = run(args.model, method, args.samples, args.windows, args.load, args.reverse, args.shuffle)
        row["conditions"] = args.conditions
        rows = read_rows(stem)  # re-read: another peer run may have written since this one started
        key = (args.model, method, row["calibration"])
        rows = [r for r in rows if (r["model"], r["method"], r["calibration"]) != key] + [row]
        print(f"{args.model} {method}: ppl {row['ppl']:.3f}, compress {row['compress_wall_s']} s", flush=True)
        write(rows, stem)


if __name__ == "__main__":
    main()
