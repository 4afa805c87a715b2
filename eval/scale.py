"""Peak memory and wall time of streamed compression (`compress run --stream`) against model size.

    python eval/scale.py make 8b out/scale/llama-8b     # a random Llama-architecture model, bfloat16 safetensors
    python eval/scale.py run 8b out/scale/llama-8b rtn  # compress it under /usr/bin/time (out/scale/runs.jsonl)
    python eval/scale.py write                          # the table and plot in eval/results/scale.md

The models have the shapes of released ones (Qwen2.5-0.5B's widths in the Llama architecture, a 2B of Llama-3
widths, Llama-3-8B) and random weights: memory and time do not depend on the values. They are written one decoder
layer per shard, so making them never holds a whole model either. The tokenizer is SmolLM2's (bundled).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from compressor.models.sources import resolve

SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
PASSES = {
    "rtn": {"passes": [{"rtn": {"bits": 4, "group_size": 128, "symmetric": True}}]},
    "gptq": {"passes": [{"gptq": {"bits": 4, "group_size": 128}}],
             "calibration": {"dataset": "bundled:wikileads", "samples": 8, "seqlen": 512, "seed": 0}},
}
RUNS = Path("out/scale/runs.jsonl")
RESULTS = Path("eval/results/scale.md")


def make(size: str, folder: Path) -> None:
    """Write a random bfloat16 model of `size` into `folder`: one shard per decoder layer, one for the rest."""
    config = LlamaConfig(**SIZES[size], max_position_embeddings=8192, dtype="bfloat16")
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    groups: dict[str, list[str]] = {}
    for name in shapes.keys() - tied:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer-{int(layer[1]):03d}" if layer else "rest", []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(sorted(groups)):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name].shape) for name in groups[group]}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(resolve("bundled:smollm2-135m"))).save_pretrained(folder)
    print(f"{folder}: {total / 2 / 1e9:.2f}B parameters, {total / 2**30:.1f} GiB")


def random_tensor(name: str, shape: torch.Size) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape) * 0.02).to(torch.bfloat16)


def run(size: str, folder: Path, kind: str, stream: bool, threads: int) -> None:
    """Compress `folder` with the `kind` recipe under /usr/bin/time -v; append what it measured to RUNS."""
    out = Path("out/scale") / f"{folder.name}-{kind}{'' if stream else '-whole'}"
    recipe = {"model": str(folder), "output": str(out), **PASSES[kind]}
    recipe_path = out.parent / f"{out.name}.yaml"
    recipe_path.write_text(json.dumps(recipe))
    command = ["compress", "run", str(recipe_path), "--no-eval", "--overwrite", "--threads", str(threads),
               "--json", str(out.parent / f"{out.name}.json")] + ["--stream"] * stream
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    report = json.loads((out.parent / f"{out.name}.json").read_text())
    config = SIZES[size]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {"size": size, "kind": kind, "stream": stream, "threads": threads, "command": " ".join(command),
           "parameters": report["before"]["parameters"], "compress_wall_s": report["compress_wall_s"],
           "command_wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024),
           "bf16_gib": report["before"]["bytes_on_disk"] / 2**30,
           "layer_f32_mb": layer_parameters(config) * 4 / 2**20,
           "ends_f32_mb": config["vocab_size"] * config["hidden_size"] * 4 * (1 if config["tie_word_embeddings"] else 2)
           / 2**20, "checkpoint_gib": report["after"]["bytes_on_disk"] / 2**30,
           "commit": commit, "date": date.today().isoformat()}
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with RUNS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(row)


def layer_parameters(config: dict) -> int:
    d, inter = config["hidden_size"], config["intermediate_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    return 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d


def write() -> None:
    """Put the measured runs (the last of each size, recipe and mode) into eval/results/scale.md."""
    rows = {}
    for line in RUNS.read_text().splitlines():
        row = json.loads(line)
        rows[(row["size"], row["kind"], row["stream"])] = row
    ordered = sorted(rows.values(), key=lambda r: (r["parameters"], r["kind"], r["stream"]))
    table = ["| model | recipe | mode | threads | parameters | bf16 on disk | float32 | one layer (float32) "
             "| embeddings + head (float32) | peak RSS | compress wall | command wall | checkpoint | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        table.append(f"| {r['size'].upper()} | {r['kind']} W4 g128 | {'--stream' if r['stream'] else 'whole'} "
                     f"| {r['threads']} | {r['parameters'] / 1e9:.2f}B | {r['bf16_gib']:.1f} GiB "
                     f"| {r['parameters'] * 4 / 2**30:.1f} GiB | {r['layer_f32_mb']:.0f} MB "
                     f"| {r['ends_f32_mb']:.0f} MB | **{r['peak_rss_mb']} MB** | {r['compress_wall_s']:.0f} s "
                     f"| {r['command_wall_s']:.0f} s | {r['checkpoint_gib']:.2f} GiB | {r['commit']} |")
    streamed = [r for r in ordered if r["stream"] and r["kind"] == "rtn"]
    sizes = ", ".join(r["size"].upper() for r in streamed)
    float32 = ", ".join(f"{r['parameters'] * 4 / 2**30:.1f}" for r in streamed)
    rss = ", ".join(f"{r['peak_rss_mb'] / 1024:.1f}" for r in streamed)
    plot = ["```mermaid", "xychart-beta", '    title "RTN W4 g128 with --stream: peak RSS against model size"',
            f"    x-axis [{sizes}]", '    y-axis "GiB"', f"    bar [{float32}]", f"    line [{rss}]", "```",
            "Bars: the model in float32 (what loading it whole takes); line: peak RSS of the streamed run."]
    section = "\n".join(["## Models larger than memory", "", MEASURED.format(date=ordered[-1]["date"]), "",
                         *table, "", *plot, "", READING, "", *COMMANDS]) + "\n"
    text = RESULTS.read_text()
    start = text.find("## Models larger than memory")
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text)


MEASURED = ("Synthetic random Llama-architecture models in bfloat16 (eval/scale.py: Qwen2.5-0.5B's widths, a 2B of "
            "Llama-3 widths, Llama-3-8B's shapes), compressed in float32 (the recipes' default dtype) by `compress run "
            "--stream --no-eval` on the 2-core AMD EPYC machine with 24 GiB, {date}. Peak RSS and command wall from "
            "`/usr/bin/time -v`; compress wall as `compress run` reports it (loading, calibration, passes, writing). "
            "Load: each run had a 1-thread compression job beside it on the other core (the 2B GPTQ run also short "
            "1-thread test runs for about 15 of its 40 minutes).")
READING = ("Peak RSS is the embeddings and head in float32, about 0.4 GB of runtime, and, for the 2B and 8B "
           "models, four to five times one float32 decoder layer (the layer as read, the float weights the "
           "quantization pass keeps for the passes after it on the layer, the codes and temporaries of the linear "
           "being rounded): it follows the widest layer and the vocabulary, not the number of layers. The 8B "
           "model, 29.9 GiB in float32, compresses on this 24 GiB machine at 7.9 GB. A whole-model run of the same "
           "0.5B recipe takes 2.4x the memory of the streamed one for the same checkpoint (the tests check that "
           "the two checkpoints are equal tensor for tensor).")
COMMANDS = ["Commands: `python eval/scale.py make SIZE DIR`, then `python eval/scale.py run SIZE DIR rtn|gptq "
            "[--whole]`, then `python eval/scale.py write`; GPTQ calibrates on 8 windows of 512 tokens.", "",
            "Without `--stream`, `compress run` refuses the 8B model before loading it (exit code 2): "
            "`out/scale/llama-8b takes 29.9 GiB in float32, more than the 16.7 GiB of memory available: run with "
            "--stream (compress run), which reads one decoder layer at a time and writes it out when done`."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("size", choices=SIZES)
    p.add_argument("folder", type=Path)
    p = sub.add_parser("run")
    p.add_argument("size", choices=SIZES)
    p.add_argument("folder", type=Path)
    p.add_argument("kind", choices=PASSES)
    p.add_argument("--whole", action="store_true", help="load the whole model instead of streaming it")
    p.add_argument("--threads", type=int, default=1)
    sub.add_parser("write")
    args = parser.parse_args()
    if args.command == "make":
        make(args.size, args.folder)
    elif args.command == "run":
        run(args.size, args.folder, args.kind, not args.whole, args.threads)
    else:
        write()


if __name__ == "__main__":
    main()
