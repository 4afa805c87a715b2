"""How far perplexity moves when only float rounding changes: the same compression job with the
calibration windows fed in reverse order (every statistic is the same sum, added up in another order).

    python eval/rounding_spread.py --pass '{"sparsegpt": {"pattern": "2:4"}}' [--windows 16]
Prints one JSON line: the pass, the window order, perplexity (protocol wikileads-ppl-v1) and wall times.
"""

import argparse
import json
import time

import torch
from run import CALIBRATION, calibration_ids  # the benchmark's calibration, so the two orders compare with its rows

from compressor.engine import compress_model
from compressor.errors import CompressorError
from compressor.evaluate import perplexity
from compressor.models import load_model
from compressor.recipe import parse_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--pass", dest="step", required=True,
                        help='one pass as JSON, e.g. {"wanda": {"sparsity": 0.5}}')
    parser.add_argument("--order", choices=["forward", "reversed"], default="reversed")
    parser.add_argument("--windows", type=int, help="first N eval windows only (quick runs)")
    args = parser.parse_args()
    try:  # the recipe parser's checks and messages, as `compress run` gives them
        passes = parse_recipe({"model": args.model, "passes": [json.loads(args.step)]}, "--pass").passes
    except json.JSONDecodeError as error:
        parser.error(f"--pass is not JSON: {error}")
    except CompressorError as error:
        parser.error(str(error))
    loaded = load_model(args.model)
    ids = calibration_ids(loaded.tokenizer)
    if args.order == "reversed":
        ids = ids.flip(0)
    start = time.perf_counter()
    compress_model(loaded.model, loaded.adapter, passes, ids, torch.device("cpu"), progress=False)
    compress_wall = time.perf_counter() - start
    result = perplexity(loaded.model, loaded.tokenizer, windows=args.windows, progress=False)
    print(json.dumps({"model": args.model, "pass": json.loads(args.step), "calibration order": args.order,
                      "calibration": CALIBRATION, **result,
                      "compress_wall_s": round(compress_wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
