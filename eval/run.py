"""Benchmark suites on the bundled models, protocol v1 (wikileads-ppl-v1, L = 2048).

Each job runs as its own `compress` subprocess, so peak memory is per job: `compress run` (no
evaluation: wall time and peak RSS of the compression alone), then `compress eval` on the saved
checkpoint (so the perplexity is that of the re-loaded checkpoint).

    python eval/run.py foundation                  # full eval split (headline numbers)
    python eval/run.py foundation --windows 16     # quick sweep, labelled windows=16
    python eval/run.py quantization --models bundled:smollm2-135m --methods "GPTQ W4 g64"

Writes eval/results/SUITE[-windowsN].json and .md after every job; two runs of one suite (two queues,
one per core) may share the file, as each re-reads it before adding a row. A row records the commit that
compressed it (`commit`, "+modified" when compressor/ had uncommitted changes) and the machine's load
while it ran. `kill` of a queue (SIGTERM) also stops the job it is running; the work
folder is kept, as after a failure.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["bundled:smollm2-135m", "bundled:gemma-3-270m"]
# Calibration, the same for the peer's runs (eval/peer.py): 64 windows of 2048 tokens, seed 0.
CALIBRATION = {"dataset": "bundled:wikileads", "samples": 64, "seqlen": 2048, "seed": 0}
GROUP = "group size of the model"
GROUP_SIZE = {"bundled:smollm2-135m": 64, "bundled:gemma-3-270m": 128}  # 576 = 9 x 64, 640 = 5 x 128
FAMILY = {"bundled:smollm2-135m": "llama", "bundled:gemma-3-270m": "gemma"}  # each model's adapter
# as many parameters as slice 25% (a few fewer), but layer 0, where the embeddings enter, kept whole
SLICE_25_LAYER_0_KEPT = {"slice": {"fraction": 0.26, "layer_fractions": {0: 0.0}}}
SPARSITIES = [("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"}),
              ("60%", {"sparsity": 0.6}), ("70%", {"sparsity": 0.7})]
SUITES = {
    "foundation": {
        "dense": None,
        "magnitude 50%": [{"magnitude": {"sparsity": 0.5}}],
        "magnitude 2:4": [{"magnitude": {"pattern": "2:4"}}],
    },
    "quantization": {
        "dense": None,
        "RTN W4 g64": [{"rtn": {"bits": 4, "group_size": 64}}],
        "GPTQ W4 g64": [{"gptq": {"bits": 4, "group_size": 64, "act_order": False}}],
        "GPTQ W4 g64 act-order": [{"gptq": {"bits": 4, "group_size": 64, "act_order": True}}],
        "GPTQ W4 g128": [{"gptq": {"bits": 4, "group_size": 128}}],
        "GPTQ W3 g64": [{"gptq": {"bits": 3, "group_size": 64}}],
        "GPTQ W2 g64": [{"gptq": {"bits": 2, "group_size": 64}}],
        "GPTQ W2 g64 + LREC r32": [{"gptq": {"bits": 2, "group_size": 64}}, {"lrec": {"rank": 32}}],
        # GPTQ's sink_weight and clip_search set explicitly (eval/results/gptq-sink-weight.md,
        # eval/results/clip-search-windows4.md)
        "GPTQ W4 g64, sink weight 1, no clip search": [
            {"gptq": {"bits": 4, "group_size": 64, "act_order": False, "sink_weight": 1, "clip_search": False}}],
        "GPTQ W4 g64 act-order, sink weight 1, no clip search": [
            {"gptq": {"bits": 4, "group_size": 64, "sink_weight": 1, "clip_search": False}}],
        "GPTQ W4 g64 act-order, sink weight 64, no clip search": [
            {"gptq": {"bits": 4, "group_size": 64, "sink_weight": 64, "clip_search": False}}],
        "GPTQ W4 g64 act-order, sink weight 64, clip search": [  # the W4 recipe
            {"gptq": {"bits": 4, "group_size": 64, "sink_weight": 64, "clip_search": True}}],
        # llm-compressor's GPTQModifier default job (static act-order, min-max grid) at Gemma's group size
        "GPTQ W4 g128 act-order, sink weight 1, no clip search": [
            {"gptq": {"bits": 4, "group_size": 128, "sink_weight": 1, "clip_search": False}}],
    },
    # Issue 3's grid; GROUP stands for the model's group size (GROUP_SIZE below).
    "quantization-grid": {"dense": None} | {
        f"{method.upper()} W{bits}": [{method: {"bits": bits, "group_size": GROUP}}]
        for method in ("rtn", "gptq") for bits in (4, 3, 2)
    } | {
        f"GPTQ W{bits} + LREC r{rank}{' refined' if refine else ''}": [
            {"gptq": {"bits": bits, "group_size": GROUP}}, {"lrec": {"rank": rank}}]
        + ([{"lrec_refine": {"steps": 100}}] if refine else [])
        for bits in (2, 3) for rank in (8, 16, 32, 64) for refine in (False, True)
    } | {  # Gemma-3's rank sweep refined: `loss: total` fits only its few huge residual channels and breaks it
        # (eval/results/gemma-w2-diagnosis.md), so its refined cells use the next-norm loss. Fitted layer by layer
        # this still failed at r16 (294.359, windows=16); fitted to the dense model's hidden states it worked (62.377)
        f"GPTQ W{bits} + LREC r{rank} refined{against}, next-norm loss": [
            {"gptq": {"bits": bits, "group_size": GROUP}}, {"lrec": {"rank": rank}},
            {"lrec_refine": {"steps": 100, "reference": reference, "loss": "next_norm"}}]
        for bits in (2, 3) for rank in (8, 16, 32, 64)
        for against, reference in (("", "layer"), (" against the dense model", "model"))
    } | {  # the sink weight without clip search (eval/results/gptq-sink-weight.md)
        f"GPTQ W{bits}, sink weight {weight}, no clip search": [
            {"gptq": {"bits": bits, "group_size": GROUP, "sink_weight": weight, "clip_search": False}}]
        for bits in (3, 2) for weight in (1, 64)
    } | {  # the SmolLM2 W4 recipe's sink weight at the model's own group size
        "GPTQ W4, sink weight 64": [{"gptq": {"bits": 4, "group_size": GROUP, "sink_weight": 64}}],
    } | {
        f"GPTQ W{bits}, clip search": [{"gptq": {"bits": bits, "group_size": GROUP, "clip_search": True}}]
        for bits in (3, 2)
    } | {  # W2 + LREC at W3's bits per weight: 2.375 + 1.0 = 3.375
        f"GPTQ W2 + LREC 1.0 extra bits{' refined' if refine else ''}": [
            {"gptq": {"bits": 2, "group_size": GROUP}}, {"lrec": {"extra_bits": 1.0}}]
        + ([{"lrec_refine": {"steps": 100}}] if refine else [])
        for refine in (False, True)
    } | {  # asymmetric grids, and LoftQ-style alternation for LREC (eval/results/w2-lrec-windows4.md)
        "GPTQ W3 asymmetric": [{"gptq": {"bits": 3, "group_size": GROUP, "symmetric": False}}],
    } | {
        f"GPTQ W2 asymmetric + LREC 1.0 extra bits, alternate 4{' refined' if refine else ''}": [
            {"gptq": {"bits": 2, "group_size": GROUP, "symmetric": False}},
            {"lrec": {"extra_bits": 1.0, "alternate": 4}}]
        + ([{"lrec_refine": {"steps": 100}}] if refine else [])
        for refine in (False, True)
    } | {  # the refinement against the dense model's hidden states rather than the dense layer's (OmniQuant-style)
        "GPTQ W2 + LREC r16 refined against the dense model": [
            {"gptq": {"bits": 2, "group_size": GROUP}}, {"lrec": {"rank": 16}},
            {"lrec_refine": {"steps": 100, "reference": "model"}}],
    } | {  # each residual channel's error relative to its scale (lrec_refine's `loss: channel`); `reference: layer`
        # spelled out here and below, where it is not Gemma's default
        "GPTQ W2 + LREC r16 refined, channel loss": [
            {"gptq": {"bits": 2, "group_size": GROUP}}, {"lrec": {"rank": 16}},
            {"lrec_refine": {"steps": 100, "reference": "layer", "loss": "channel"}}],
        "GPTQ W2 asymmetric + LREC 1.0 extra bits, alternate 4 refined, channel loss": [  # Gemma's W2, unbroken
            {"gptq": {"bits": 2, "group_size": GROUP, "symmetric": False}},
            {"lrec": {"extra_bits": 1.0, "alternate": 4}},
            {"lrec_refine": {"steps": 100, "reference": "layer", "loss": "channel"}}],
    } | {  # int8 factors: about twice the rank for the same bits (eval/results/lrec-int8-factors.md)
        f"GPTQ W2 asymmetric + LREC 1.0 extra bits int8, alternate 4{' refined' if refine else ''}": [
            {"gptq": {"bits": 2, "group_size": GROUP, "symmetric": False}},
            {"lrec": {"extra_bits": 1.0, "alternate": 4, "factor_bits": 8}}]
        + ([{"lrec_refine": {"steps": 100}}] if refine else [])
        for refine in (False, True)
    } | {  # Gemma's W2 passes (symmetric, no alternation) with int8 factors; refined on the error as the next
        # layer's input norm reads it, the Gemma W2 recipe (eval/results/gemma-w2-diagnosis.md)
        f"GPTQ W2 + LREC 1.0 extra bits int8{' refined, next-norm loss' if refine else ''}": [
            {"gptq": {"bits": 2, "group_size": GROUP}}, {"lrec": {"extra_bits": 1.0, "factor_bits": 8}}]
        + ([{"lrec_refine": {"steps": 100, "reference": "layer", "loss": "next_norm"}}] if refine else [])
        for refine in (False, True)
    } | {  # the same fitted to the dense model's hidden states (OmniQuant-style), in float32 and autocast to bfloat16
        f"GPTQ W2 + LREC 1.0 extra bits int8 refined against the dense model, next-norm loss{label}": [
            {"gptq": {"bits": 2, "group_size": GROUP}}, {"lrec": {"extra_bits": 1.0, "factor_bits": 8}},
            {"lrec_refine": {"steps": 100, "loss": "next_norm", "reference": "model", "autocast": autocast}}]
        for label, autocast in (("", "none"), (", bfloat16", "bfloat16"))
    } | {  # a pruning pass that prunes nothing marks the linears, so GPTQ keeps their exact zeros (a GGUF's) at
        # zero, as `keep_zeros: true` does (eval/results/gptq-w4-rounding-spread.md)
        f"GPTQ W{bits}, exact zeros frozen": [
            {"magnitude": {"sparsity": 0.0}}, {"gptq": {"bits": bits, "group_size": GROUP}}]
        for bits in (3, 2)
    } | {  # the refinement also training the group scales (eval/results/w2-lrec-windows4.md)
        "GPTQ W2 asymmetric + LREC 1.0 extra bits, alternate 4 refined with scales": [
            {"gptq": {"bits": 2, "group_size": GROUP, "symmetric": False}},
            {"lrec": {"extra_bits": 1.0, "alternate": 4}}, {"lrec_refine": {"steps": 100, "scales": True}}],
    },
    "pruning": {"dense": None} | {
        f"magnitude {label}": [{"magnitude": setting}] for label, setting in SPARSITIES
    } | {  # the input norms summed over every token in float64 (`norms: sum`)
        f"wanda {label}": [{"wanda": {**setting, "norms": "sum"}}] for label, setting in SPARSITIES
    } | {  # the first token of each calibration window counted 64 times (the default) or once
        f"sparsegpt {label}, sink weight {weight}": [{"sparsegpt": {**setting, "sink_weight": weight}}]
        for weight in (1, 64) for label, setting in SPARSITIES
    } | {  # the input norms summed as llm-compressor sums them, the default (docs/design-decisions.md)
        f"wanda {label}, running mean": [{"wanda": setting}] for label, setting in SPARSITIES
    },
    "slicing": {"dense": None} | {f"slice {pct}%": [{"slice": {"fraction": pct / 100}}] for pct in (10, 20, 25, 30)} | {
        "slice 26%, layer 0 unsliced": [SLICE_25_LAYER_0_KEPT],
        "slice 26%, layer 0 unsliced + GPTQ W4 g64": [SLICE_25_LAYER_0_KEPT, {"gptq": {"bits": 4, "group_size": 64}}],
        "slice 26%, layer 0 unsliced + GPTQ W4 g64, sink weight 64": [  # the slice + GPTQ recipe
            SLICE_25_LAYER_0_KEPT, {"gptq": {"bits": 4, "group_size": 64, "sink_weight": 64}}],
    },
    "lowrank": {"dense": None} | {
        f"lowrank {method} -{cut}%": [{"lowrank": {"param_ratio": 1 - cut / 100, "method": method}}]
        for cut in (10, 20, 30, 40) for method in ("activation", "svd")
    },
}


def calibration_ids(tokenizer, samples: int = CALIBRATION["samples"], reverse: bool = False,
                    shuffle: int | None = None):
    """The benchmark's calibration windows, [samples, seqlen] token ids (for the scripts that run a pass
    themselves instead of through a recipe). `reverse`: the same windows last first; `shuffle`: in this
    seed's random order (further draws of a result that float sums in window order round differently)."""
    import torch

    from compressor.data import calibration_windows, load_documents

    ids = calibration_windows(tokenizer, load_documents(CALIBRATION["dataset"], "calibration"), samples,
                              CALIBRATION["seqlen"], CALIBRATION["seed"])
    if reverse:
        ids = ids.flip(0)
    if shuffle is not None:
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(shuffle))]
    return ids


def resolved(passes: list | None, model: str) -> list | None:
    """The suite's passes with GROUP replaced by the model's group size and the model family's defaults
    spelled out (lrec_refine's reference and loss, from the adapter), one pass per step."""
    from compressor.models.adapters import adapter_named

    if passes is None:
        return None
    adapter = adapter_named(FAMILY[model])
    family = {"lrec_refine": {"reference": adapter.refine_reference, "loss": adapter.refine_loss}}
    return [{p: family.get(p, {}) | {k: GROUP_SIZE[model] if v == GROUP else v for k, v in params.items()}}
            for step in passes for p, params in step.items()]


def same_passes(a: list | None, b: list | None) -> bool:
    """Equal as passes, defaults filled in: {bits: 3} equals {bits: 3, clip_search: true} where that is the default."""
    from compressor.passes import PASSES

    def built(steps: list | None) -> list | None:
        return None if steps is None else [PASSES[p](**params) for step in steps for p, params in step.items()]
    return built(a) == built(b)


def measured_elsewhere(suite: str, model: str, method: str, suffix: str) -> dict | None:
    """The row of the same job (same model, same passes, same window count) under another name or in another
    suite's results, so that the same job is not measured twice."""
    passes = resolved(SUITES[suite][method], model)
    for other, methods in SUITES.items():
        path = ROOT / "eval" / "results" / f"{other}{suffix}.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row["model"] != model or row["method"] not in methods or (other, row["method"]) == (suite, method):
                continue
            if same_passes(resolved(methods[row["method"]], model), passes) and not row.get("note"):
                same = f"'{row['method']}'" + ("" if other == suite else f" in the {other} suite")
                return {**row, "method": method, "note": f"the same passes as {same} ({path.name})"}
    return None


def saved_results(stem: Path) -> dict:
    path = stem.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def in_suite_order(rows: list[dict], methods: dict) -> list[dict]:
    """Rows by model, then by the method's place in the suite (queues finish jobs in any order)."""
    models = list(dict.fromkeys([*MODELS, *(r["model"] for r in rows)]))
    order = list(methods)
    return sorted(rows, key=lambda r: (models.index(r["model"]),
                                       order.index(r["method"]) if r["method"] in order else len(order)))


def compress_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", *args]


def code_version() -> str | None:
    """The commit the library runs from, with "+modified" when compressor/ differs from it; None outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--short=12", "HEAD")
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+modified" if git("diff", "--quiet", "HEAD", "--", "compressor").returncode else "")


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), or the architecture where that is not readable."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.machine()


class LoadSampler:
    """The machine's mean 1-minute load average while a job runs, sampled every `every` seconds: about the
    job's own thread count when it ran alone, more when other work shared the cores."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples, self.stop = every, [], threading.Event()

    def __enter__(self) -> "LoadSampler":
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 2) if self.samples else None


def run_job(model: str, method: str, passes: list | None, windows: int | None, work: Path) -> dict:
    import torch  # its thread count (OMP_NUM_THREADS) is what the job's subprocesses run with

    with LoadSampler() as load:
        row = _run_job(model, method, passes, windows, work)
    return {**row, "threads": torch.get_num_threads(), "load_mean": load.mean()}


def _run_job(model: str, method: str, passes: list | None, windows: int | None, work: Path) -> dict:
    row = {"model": model, "method": method}
    target = model
    if passes is not None:
        passes = resolved(passes, model)
        name = f"{model.removeprefix('bundled:')}-{method.replace(' ', '-').replace('%', 'pct').replace(':', 'of')}"
        recipe = {"model": model, "passes": passes, "output": str(work / name), "calibration": CALIBRATION}
        recipe_path = work / f"{name}.yaml"
        report_path = work / f"{name}.run.json"
        text = yaml.safe_dump(recipe)
        # a kept folder's checkpoint is reused when its compression finished (report written) on the same recipe
        if not (report_path.exists() and recipe_path.exists() and recipe_path.read_text() == text):
            recipe_path.write_text(text)
            report_path.unlink(missing_ok=True)
            commit = code_version()
            subprocess.run(compress_cmd("run", str(recipe_path), "--json", str(report_path)), check=True, cwd=ROOT)
            report_path.write_text(json.dumps({**json.loads(report_path.read_text()), "commit": commit}, indent=2))
        report = json.loads(report_path.read_text())
        row.update(compress_wall_s=report["compress_wall_s"],
                   compress_peak_rss_mb=report["compress_memory"]["peak_rss_mb"])
        if report.get("commit"):  # the code that compressed (older reports have none)
            row["commit"] = report["commit"]
        target = recipe["output"]
    eval_path = work / "eval.json"
    args = ["eval", target, "--json", str(eval_path)] + (["--windows", str(windows)] if windows else [])
    subprocess.run(compress_cmd(*args), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {**json.loads(eval_path.read_text()), **row}  # row's model: the source, not the checkpoint path


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _bits(bits: float | None) -> str:
    return "-" if bits is None else f"{bits:.3f}"


def write(rows: list[dict], stem: Path, command: str, conditions: str = "") -> None:
    """Write SUITE.json and SUITE.md; `conditions` says what else ran on the machine meanwhile."""
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine_line(rows),
                                                     "conditions": conditions, "rows": rows}, indent=2) + "\n")
    lines = [f"# {stem.name}", "", f"Reproduce: `{command}` (each run adds the jobs not yet in the file)", "",
             f"Machine: {machine_line(rows)}. Calibration where a method uses it: wikileads-calib-v1, "
             f"{CALIBRATION['samples']} x {CALIBRATION['seqlen']}, seed {CALIBRATION['seed']}. {conditions}", "",
             "Load: the machine's mean 1-minute load average during the job (compress and eval), sampled every "
             "15 s; a job alone reads about its thread count, more means other work shared the cores and the "
             "wall times are inflated (- : not recorded); in brackets the job's thread count, where recorded.", "",
             "| model | method | PPL | x dense | protocol | L | windows | params | nonzero params | "
             "params without embeddings and head | weights on disk | "
             "bits/weight (quantized linears) | compress wall | compress peak RSS | eval wall | eval peak RSS | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r["ppl"] for r in rows if r["method"] == "dense"}
    notes = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
    for r in rows:
        mark = f" [{notes.index(r['note']) + 1}]" if r.get("note") else ""
        ratio = f"{r['ppl'] / dense[r['model']]:.2f}" if r["model"] in dense else "-"
        lines.append(f"| {r['model']} | {r['method']}{mark} | {r['ppl']:.3f} | {ratio} | {r['protocol']} | "
                     f"{r['seqlen']} | "
                     f"{r['windows']} of {r['windows_in_split']} | {r['parameters']:,} | {r['nonzero_parameters']:,} | "
                     f"{_count(r.get('parameters_without_embeddings'))} | "
                     f"{r['bytes_on_disk'] / 1e6:.1f} MB | {_bits(r.get('linear_bits_per_weight'))} | "
                     f"{r.get('compress_wall_s', '-')} s | "
                     f"{r.get('compress_peak_rss_mb', '-')} MB | {r['eval_wall_s']} s | {r['peak_rss_mb']} MB | "
                     f"{_load(r)} |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _load(row: dict) -> str:
    threads = row.get("threads")
    return f"{row.get('load_mean') or '-'}" + (f" ({threads} thread{'s' * (threads > 1)})" if threads else "")


def machine_line(rows: list[dict]) -> str:
    """The CPU, and the torch and transformers versions of the rows (each row records its own)."""
    def versions(key: str) -> str:
        return " / ".join(sorted({r[key] for r in rows if key in r})) or "-"

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {versions('torch')}, "
            f"transformers {versions('transformers')}, float32, CPU")


def conditions_text(saved: dict, args: argparse.Namespace) -> str:
    """The file's conditions: the saved text (or --conditions), with --add-conditions added once."""
    text = saved.get("conditions", "") if args.conditions is None else args.conditions
    if args.add_conditions and args.add_conditions not in text:
        text = f"{text} {args.add_conditions}".strip()
    return text


class Stopped(SystemExit):
    """This queue got SIGTERM (`kill`); between jobs it exits with this message."""


def _stop(signum, frame) -> None:
    # raised inside subprocess.run, which then kills the running job: a killed queue leaves no orphan behind
    raise Stopped("eval/run.py stopped (SIGTERM)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=list(SUITES))
    parser.add_argument("--windows", type=int, help="first N eval windows only (quick sweep)")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", help="a subset of the suite's methods")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--conditions", help="what else ran on the machine meanwhile (replaces the file's text)")
    parser.add_argument("--add-conditions", help="a sentence added once to the file's text (queues running side "
                                                 "by side each add theirs without overwriting the other's)")
    parser.add_argument("--work", help="the folder a failed or interrupted run kept: its finished compressions "
                                       "are evaluated, not redone (their compress wall time and memory are kept)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    methods = SUITES[args.suite]
    for method in args.methods or []:
        if method not in methods:
            parser.error(f"unknown method {method!r} for {args.suite}; choose from {list(methods)}")
    suffix = f"-windows{args.windows}" if args.windows else ""
    stem = ROOT / "eval" / "results" / f"{args.suite}{suffix}"
    # the whole file's command: a run with --models or --methods adds some of its jobs
    command = " ".join(["python eval/run.py", args.suite] + (["--windows", str(args.windows)] if args.windows else []))
    saved = saved_results(stem)
    rows = saved.get("rows", [])
    if args.render:
        write(in_suite_order(rows, methods), stem, command, conditions_text(saved, args))
        return
    done = {(r["model"], r["method"]) for r in rows}
    # Checkpoints go to a temporary folder, deleted after a clean run and kept (and named) after a failure;
    # --work reuses such a folder: jobs whose compression finished there are only evaluated.
    tmp = str(Path(args.work).resolve()) if args.work else tempfile.mkdtemp(dir=ROOT / "eval")
    Path(tmp).mkdir(parents=True, exist_ok=True)  # a --work folder named for a first run need not exist yet
    for model in args.models:
        for method in args.methods or methods:
            if (model, method) in done:  # results accumulate across runs; delete the file to redo
                continue
            start = time.perf_counter()
            if not (row := measured_elsewhere(args.suite, model, method, suffix)):
                try:
                    row = run_job(model, method, methods[method], args.windows, Path(tmp))
                except (subprocess.CalledProcessError, Stopped) as error:
                    how = "was stopped" if isinstance(error, Stopped) else "failed"
                    sys.exit(f"{model} {method} {how}; its files are kept in {tmp} (--work {tmp} reuses them)")
                print(f"{model} {method}: ppl {row['ppl']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            # re-read: another run of this suite (a second queue) may have added rows or conditions meanwhile
            saved = saved_results(stem)
            rows = in_suite_order(saved.get("rows", []) + [row], methods)
            write(rows, stem, command, conditions_text(saved, args))
    if not args.work:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
