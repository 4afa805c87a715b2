"""Which pass runs on which architecture: a tiny random model of each family, compressed by each pass, saved,
reloaded and compared, or refused with the reason. Writes eval/results/architectures.md.

    python eval/architectures.py

The families and passes are tests/test_architectures.py's (its CI test asserts the same for the passes that
must work); the table adds the passes that refuse some families, with their messages.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import byte_tokenizer, recipe_dict  # noqa: E402
from run import code_version, cpu_name  # noqa: E402
from test_architectures import FAMILIES, PASSES  # noqa: E402

import compressor  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402

MATRIX = PASSES | {
    "lrec_refine": [*PASSES["lrec"], {"lrec_refine": {"steps": 4}}],
    "slice": [{"slice": {"fraction": 0.25}}],
}
WORDS = "the river city music king war team album film born state county school church party".split()


def outcome(family_dir: Path, corpus: Path, passes: list[dict], out: Path) -> str:
    """'works (max |logit difference| after reloading)' or 'refused: MESSAGE'."""
    try:
        model = compressor.compress(recipe_dict(family_dir, corpus, passes, out), progress=False)
    except CompressorError as error:
        return f"refused: {error}"
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (compressor.load(out)(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    return f"works ({difference:.0e})"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) + "."
                                      for i in range(60)))
        for family, config in FAMILIES.items():
            torch.manual_seed(0)
            family_dir = Path(tmp) / family
            T.AutoModelForCausalLM.from_config(config()).save_pretrained(family_dir)
            byte_tokenizer().save_pretrained(family_dir)
            rows.append((family, [outcome(family_dir, corpus, passes, Path(tmp) / f"{family}-{name}")
                                  for name, passes in MATRIX.items()]))
            print(family, rows[-1][1], flush=True)
    lines = ["# architectures", "",
             f"`python eval/architectures.py` at commit {code_version()}, {time.strftime('%Y-%m-%d')}, {cpu_name()}: "
             "a tiny random model of each family (3 layers, width 64; mixture-of-experts: 4 experts, top-2) "
             "compressed by each pass on 4 x 32 calibration tokens, saved, reloaded by `compressor.load`; "
             "\"works\" gives the largest difference between the logits of the reloaded and the in-memory model.",
             "", "| family | " + " | ".join(MATRIX) + " |", "|---" * (len(MATRIX) + 1) + "|"]
    for family, outcomes in rows:
        lines.append(f"| {family} | " + " | ".join(o.replace("|", "/") for o in outcomes) + " |")
    (ROOT / "eval" / "results" / "architectures.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
