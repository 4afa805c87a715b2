"""llama.cpp runs GGUF files: protocol v1 perplexity, greedy text and tokens/s, beside compressor's; and
llama.cpp's own quantizer, the baseline a GGUF export is compared with.

llama.cpp is llama-cpp-python 0.3.36 built from its PyPI source package (15-30 minutes on 2 cores) in its own
virtual environment, .venv-llama; the built wheel is kept under ~/.cache/compressor/wheels, so a second setup
takes seconds.

    python eval/llama_cpp_check.py setup
    python eval/llama_cpp_check.py check FILE.gguf --checkpoint CKPT [--windows 16] [--json out.json]
    python eval/llama_cpp_check.py check FILE.gguf --model bundled:smollm2-135m [--windows 16]
    python eval/llama_cpp_check.py dense bundled:smollm2-135m OUT-F32.gguf
    python eval/llama_cpp_check.py imatrix bundled:smollm2-135m IMATRIX.npz
    python eval/llama_cpp_check.py quantize Q4_K_M IN-F32.gguf OUT.gguf [--imatrix IMATRIX.npz]

`check` tokenizes the evaluation split (protocol v1's windows) with the checkpoint's or model's tokenizer,
hands the token ids to llama.cpp (per-token logits, one window at a time, nothing carried over) and reports its
perplexity; with `--checkpoint`, next to `compress eval`'s of the checkpoint on the same windows (its embeddings
and head replaced by the file's, which the export rounded), and both generate 32 tokens greedily from a few
prompts. It also times llama.cpp: prompt processing of 512 tokens and
generation of 128 tokens, one at a time (as llama-bench's pp512 and tg128).
`dense` writes the uncompressed model (float32 weights) in the source GGUF's layout: what llama.cpp quantizes.
`imatrix` computes an importance matrix as llama.cpp's imatrix tool defines it (per linear, the mean of each
input's square) on the calibration windows our recipes use (wikileads-calib-v1, 64 x 2048, seed 0);
`quantize` runs llama.cpp's quantizer (llama_model_quantize) on the dense file, with that matrix if given.
llama.cpp runs with OMP_WAIT_POLICY=passive: on a shared machine spinning threads slow it many times over.
"""

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-llama"
VERSION = "0.3.36"
WHEELS = Path.home() / ".cache" / "compressor" / "wheels"
PROMPTS = ["The capital of France is", "Water boils at", "The first person to walk on the Moon was"]
FILE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S",
              "Q5_K_M", "Q6_K")


def setup() -> None:
    """Build the wheel once (cached), then make .venv-llama with it."""
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    if not list(WHEELS.glob(f"llama_cpp_python-{VERSION}-*.whl")):
        print(f"building llama-cpp-python {VERSION} from source (15-30 minutes); the wheel goes to {WHEELS}")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", f"llama-cpp-python=={VERSION}",
                        "-w", str(WHEELS)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--find-links", str(WHEELS),
                    f"llama-cpp-python=={VERSION}"], check=True, env=env)


def in_venv(job: dict) -> dict:
    """Run `job` in .venv-llama (this file's worker) and return its result."""
    python = VENV / "bin" / "python"
    if not python.is_file():
        print(f"llama-cpp-python is not installed; run: python {Path(__file__).relative_to(ROOT)} setup",
              file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "result": f"{tmp}/result.json"}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
        subprocess.run([str(python), __file__, "worker", f"{tmp}/job.json"], check=True, env=env)
        return json.loads((Path(tmp) / "result.json").read_text())


# --- in .venv-llama -------------------------------------------------------------------------------------------


def worker(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    result = quantize_worker(job) if job["task"] == "quantize" else evaluate_worker(job)
    Path(job["result"]).write_text(json.dumps(result))


def evaluate_worker(job: dict) -> dict:
    """llama.cpp's NLL over the windows, greedy continuations of the prompts, and its speed."""
    import numpy as np
    from llama_cpp import Llama

    windows = np.load(job["windows"])
    llm = Llama(job["gguf"], n_ctx=windows.shape[1], n_batch=512, logits_all=True, verbose=False,
                n_threads=job["threads"])
    nll, count, start = 0.0, 0, time.perf_counter()
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)  # row i predicts token i + 1
        top = logits.max(1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    seconds = time.perf_counter() - start
    greedy = []
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(job["new_tokens"]):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        greedy.append(tokens)
    del llm
    return {"nll": nll, "tokens": count, "seconds": seconds, "greedy": greedy,
            **speed(job["gguf"], windows[0].tolist(), job["threads"])}


def speed(gguf: str, ids: list[int], threads: int) -> dict:
    """Tokens/s of prompt processing (512 tokens at once) and generation (128 tokens, one at a time): the
    best of three runs each, only the last position's logits computed."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=1024, n_batch=512, verbose=False, n_threads=threads)
    prompt, generate = [], []
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:512])
        prompt.append(512 / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(128):  # without logits_all, llama.cpp's buffer holds the last position's logits
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        generate.append(128 / (time.perf_counter() - start))
    return {"prompt_tokens_per_s": max(prompt), "generate_tokens_per_s": max(generate)}


def quantize_worker(job: dict) -> dict:
    """llama_model_quantize(job's input, output, file type), with the importance matrix when given."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['file_type']}")
    params.nthread = job["threads"]
    keep = []  # the arrays the C structs point into must outlive the call
    if job.get("imatrix"):
        matrix = np.load(job["imatrix"])
        entries = (llama_cpp.llama_model_imatrix_data * (len(matrix.files) + 1))()  # ends with an empty entry
        for i, name in enumerate(matrix.files):
            values = np.ascontiguousarray(matrix[name], dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        params.imatrix = entries
    start = time.perf_counter()
    failed = llama_cpp.llama_model_quantize(job["input"].encode(), job["output"].encode(), ctypes.byref(params))
    if failed:
        raise SystemExit(f"llama_model_quantize failed ({failed})")
    return {"seconds": time.perf_counter() - start}


# --- in this environment ---------------------------------------------------------------------------------------


def tensor_types(gguf_path: str) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(gguf_path).tensors).most_common())


def check(gguf_file: str, checkpoint: str | None, model_source: str | None, windows: int | None, threads: int,
          out_json: str | None) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    import compressor
    from compressor.models import load_model
    from compressor.perplexity import perplexity, protocol_windows

    torch.set_num_threads(threads)
    if checkpoint:
        model, tokenizer = compressor.load(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
        ends_as_in(model, gguf_file)
    else:
        loaded = load_model(model_source)
        model, tokenizer = loaded.model, loaded.tokenizer
    ids = protocol_windows(tokenizer)
    split = len(ids)
    ids = ids[:windows] if windows else ids  # [windows, L]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]  # with BOS where the tokenizer adds one
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/windows.npy", ids.numpy())
        llama = in_venv({"task": "evaluate", "gguf": str(Path(gguf_file).resolve()), "windows": f"{tmp}/windows.npy",
                         "prompts": prompts, "new_tokens": 32, "threads": threads})
    report = {"gguf": gguf_file, "checkpoint": checkpoint, "model": model_source, "windows": len(ids),
              "split_windows": split, "window_length": ids.shape[1], "file_bytes": Path(gguf_file).stat().st_size,
              "tensor_types": tensor_types(gguf_file), "threads": threads,
              "llama_cpp_perplexity": math.exp(llama["nll"] / llama["tokens"]),
              "llama_cpp_seconds": llama["seconds"], "prompt_tokens_per_s": llama["prompt_tokens_per_s"],
              "generate_tokens_per_s": llama["generate_tokens_per_s"]}
    if checkpoint:
        ours = perplexity(model, tokenizer, windows=len(ids), progress=False)["ppl"]
        report |= {"compressor_perplexity": ours, "relative_difference": report["llama_cpp_perplexity"] / ours - 1,
                   "greedy": compare_greedy(model, tokenizer, prompts, llama["greedy"])}
    print(json.dumps(report, indent=2))
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def ends_as_in(model, gguf_file: str) -> None:
    """Give `model` the embeddings and head of the GGUF file: the export rounds them (the checkpoint keeps them in
    float), and the comparison is of two engines computing with the same weights."""
    import gguf
    import torch

    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    ends = {"token_embd.weight": model.get_input_embeddings(), "output.weight": model.get_output_embeddings()}
    for name, module in ends.items():
        if name in tensors:
            weight = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
            module.weight.data = torch.from_numpy(weight.reshape(module.weight.shape).copy()).to(module.weight.dtype)


def compare_greedy(model, tokenizer, prompts: list[list[int]], theirs_all: list[list[int]]) -> list[dict]:
    import torch

    greedy = []
    for prompt, theirs in zip(prompts, theirs_all, strict=True):
        with torch.no_grad():
            mine = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
        pairs = list(zip(mine.tolist(), theirs, strict=False))  # generate stops early at an end-of-text token
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        greedy.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                       "llama_cpp": tokenizer.decode(theirs), "compressor": tokenizer.decode(mine),
                       "same_tokens": same})
    return greedy


def dense(source: str, out: str) -> None:
    """The uncompressed model as a GGUF file: float32 linears, embeddings and norms, the source's layout."""
    from compressor.export_gguf import write_gguf
    from compressor.models import load_model
    from compressor.models.sources import source_gguf

    loaded = load_model(source)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_gguf(loaded.model, loaded.adapter, source_gguf(source), Path(out), "F32", "F32", False, "ALL_F32", "F32")
    print(f"wrote {out}: {tensor_types(out)}")


def importance_matrix(source: str, out: str, threads: int) -> None:
    """llama.cpp's importance matrix for every decoder linear of `source` (GGUF name -> mean of x_j^2 over the
    calibration tokens [in]), from the float model's activations on wikileads-calib-v1 (64 x 2048, seed 0)."""
    import gguf
    import numpy as np
    import torch
    from torch import nn

    from compressor.data import calibration_windows, load_documents
    from compressor.export_gguf import gguf_names
    from compressor.models import load_model
    from compressor.models.sources import source_gguf

    torch.set_num_threads(threads)
    loaded = load_model(source)
    model = loaded.model
    arch = gguf.GGUFReader(source_gguf(source)).fields["general.architecture"].contents()
    module_to_gguf = {module: name for name, (module, kind) in gguf_names(model, arch).items() if kind == "weight"}
    sums, counts = {}, {}

    def accumulate(name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    layers = loaded.adapter.decoder_layers(model)
    for module_name, module in layers.named_modules(prefix=loaded.adapter.layers):
        if isinstance(module, nn.Linear) and module_name in module_to_gguf:
            module.register_forward_pre_hook(accumulate(module_to_gguf[module_name]))
    docs = load_documents("bundled:wikileads", "calibration")
    windows = calibration_windows(loaded.tokenizer, docs, 64, 2048, 0)
    with torch.no_grad():
        for window in windows:
            model.base_model(window[None])  # the decoder: the output head's logits are not needed
    np.savez(out, **{name: (sums[name] / counts[name]).float().numpy() for name in sums})


def quantize(file_type: str, source_file: str, out: str, imatrix: str | None, threads: int) -> None:
    if not Path(source_file).is_file():
        print(f"{source_file} does not exist; write the float model with: python {Path(__file__).relative_to(ROOT)} "
              "dense MODEL FILE.gguf", file=sys.stderr)
        sys.exit(2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    job = {"task": "quantize", "file_type": file_type, "input": str(Path(source_file).resolve()),
           "output": str(Path(out).resolve()), "threads": threads}
    if imatrix:
        job["imatrix"] = str(Path(imatrix).resolve())
    result = in_venv(job)
    print(json.dumps({"output": out, "file_type": file_type, "imatrix": imatrix, "quantize_seconds": result["seconds"],
                      "file_bytes": Path(out).stat().st_size, "tensor_types": tensor_types(out)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="build llama-cpp-python into .venv-llama")
    p = commands.add_parser("check", help="llama.cpp's perplexity, greedy text and speed on a GGUF file")
    p.add_argument("gguf")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="the compressor checkpoint the GGUF was exported from")
    which.add_argument("--model", help="the model source whose tokenizer to use (no comparison)")
    p.add_argument("--windows", type=int, help="the first N windows of the split (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the report here")
    p = commands.add_parser("dense", help="write the uncompressed model as a float32 GGUF")
    p.add_argument("model")
    p.add_argument("out")
    p = commands.add_parser("quantize", help="llama.cpp's quantizer on a float GGUF")
    p.add_argument("file_type", choices=FILE_TYPES)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--imatrix", metavar="FILE.npz", help="an importance matrix (the imatrix command)")
    p.add_argument("--threads", type=int, default=2)
    p = commands.add_parser("imatrix", help="llama.cpp's importance matrix of a model on our calibration windows")
    p.add_argument("model")
    p.add_argument("out", help="FILE.npz")
    p.add_argument("--threads", type=int, default=2)
    p = commands.add_parser("worker")
    p.add_argument("job")
    args = parser.parse_args()
    if args.command == "worker":
        worker(Path(args.job))
    elif args.command == "setup":
        setup()
    elif args.command == "check":
        check(args.gguf, args.checkpoint, args.model, args.windows, args.threads, args.json)
    elif args.command == "dense":
        dense(args.model, args.out)
    elif args.command == "imatrix":
        start = time.perf_counter()
        importance_matrix(args.model, args.out, args.threads)
        print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    else:
        quantize(args.file_type, args.input, args.out, args.imatrix, args.threads)


if __name__ == "__main__":
    main()
