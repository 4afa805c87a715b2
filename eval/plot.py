"""Perplexity against effective bits per weight of the linears, one curve per method family.

    python eval/plot.py quantization-grid      # reads eval/results/quantization-grid.json, writes .png

Needs matplotlib (`pip install -e .[eval]`). Rows without bits per weight (dense, pruning) are left out;
the dense perplexity is drawn as a horizontal line per model. A job the suite lists under two names (the
same passes, e.g. a setting spelled out that is also the default) is drawn once, under the name that comes first.
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def family(method: str) -> str:
    """The curve a method lies on: without its group size, and without what the curve sweeps, the bits
    ('GPTQ W3, sink weight 1' -> 'GPTQ, sink weight 1') or, with LREC, the rank at fixed bits
    ('GPTQ W2 + LREC r16 refined' -> 'GPTQ W2 + LREC refined')."""
    swept = r"\br\d+\b" if "LREC" in method else r"\bW\d+\b"
    name = re.sub(r"\s+", " ", re.sub(rf"{swept}|\bg\d+\b", "", method)).strip()
    return name.replace(" ,", ",")  # 'GPTQ W3, sink weight 1' -> 'GPTQ, sink weight 1'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = ROOT / "eval" / "results" / args.suite
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    models = sorted({r["model"] for r in rows})
    names = sorted({family(r["method"]) for r in rows if r.get("linear_bits_per_weight")})  # the curves
    tab10 = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 7]  # gray is for dense
    palette = tab10 + list(plt.cm.Dark2.colors) + list(plt.cm.Set1.colors)
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}  # the same in every panel
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        curves, drawn = defaultdict(list), set()
        for r in mine:
            point = (r.get("linear_bits_per_weight"), r["ppl"])
            if point[0] and point not in drawn:  # a job listed twice: its first name
                curves[family(r["method"])].append(point)
                drawn.add(point)
            elif r["method"] == "dense":
                ax.axhline(r["ppl"], color="gray", linestyle="--", label=f"dense {r['ppl']:.2f}")
        for name, points in sorted(curves.items()):
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=name, color=colors[name])
        windows = {f"{r['windows']} of {r['windows_in_split']}" for r in mine}
        ax.set(title=f"{model}\nwikileads-ppl-v1, L=2048, windows {', '.join(sorted(windows))}",
               xlabel="bits per weight of the quantized linears\n(codes, scales, zeros and factors)",
               ylabel="perplexity", yscale="log")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below: points stay visible
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
