"""Perplexity per protocol v1 (`wikileads-ppl-v1`, docs/protocol.md), with size and cost.

Windows of L tokens (`[bos] + L-1 text tokens`, or L text tokens without a BOS), whole windows
only; loss = mean NLL in float32 over every predicted position of every window; PPL = exp(loss).
"""

import math
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from compressor.data import eval_windows, load_documents
from compressor.runtime import count_parameters, peak_memory


def protocol_name(dataset: str) -> str:
    return "wikileads-ppl-v1" if dataset == "bundled:wikileads" else f"text-ppl-v1[{dataset}]"


@torch.no_grad()
def protocol_windows(tokenizer: PreTrainedTokenizerBase, dataset: str = "bundled:wikileads", seqlen: int = 2048,
                     text_field: str = "text") -> torch.Tensor:
    """The eval split's documents joined by blank lines and cut into windows of `seqlen` tokens, [N, seqlen]."""
    text = "\n\n".join(load_documents(dataset, "eval", text_field))
    return eval_windows(tokenizer, text, seqlen)


# Positions per head matmul in `window_nll`: Gemma-3's 262,144-word vocabulary makes a whole window's
# float32 logits 2 GB (2047 x 262144 x 4 bytes); 256 positions at a time, 256 MB.
HEAD_CHUNK = 256


@torch.no_grad()
def window_nll(model: PreTrainedModel, ids: torch.Tensor, chunk: int = HEAD_CHUNK) -> float:
    """Summed NLL of ids[1:] [L-1] given their prefixes, for one window ids [L]. The decoder runs once and
    the head `chunk` positions at a time, so the [L, vocab] logits never exist at once."""
    hidden = model.get_decoder()(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]  # [L-1, d]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 style tanh capping
    nll = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start:start + chunk]).float()  # [chunk, vocab]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        nll += F.cross_entropy(logits, ids[start + 1:start + 1 + chunk], reduction="sum").item()
    return nll


@torch.no_grad()  # without it a model whose parameters require grad keeps each window's graph
def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: str = "bundled:wikileads",
               seqlen: int = 2048, windows: int | None = None, text_field: str = "text",
               progress: bool = True) -> dict:
    """Evaluate on the eval split of `dataset`; `windows` limits to the first N windows (quick runs)."""
    start = time.perf_counter()
    max_len = getattr(model.config, "max_position_embeddings", None) or seqlen
    seqlen = min(seqlen, max_len)
    all_windows = protocol_windows(tokenizer, dataset, seqlen, text_field)
    chosen = all_windows if windows is None else all_windows[:windows]
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for ids in tqdm(chosen, desc="perplexity", disable=not progress, unit="window"):
        nll_sum += window_nll(model, ids.to(device))
        count += ids.shape[0] - 1
    nll = nll_sum / count
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "protocol": protocol_name(dataset),
        "seqlen": seqlen,
        "windows": len(chosen),
        "windows_in_split": len(all_windows),
        "tokens_predicted": count,
        **count_parameters(model),
        "eval_wall_s": round(time.perf_counter() - start, 1),
        **peak_memory(device),
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
