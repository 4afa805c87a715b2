import math

import torch

from compressor.evaluate import perplexity
from compressor.models import load_model


def test_perplexity_runs_the_model_without_autograd(llama_dir, corpus):
    """Parameters of a loaded model require grad; with autograd on, each window's graph is kept alive
    (on Gemma-3 that doubled the eval's peak memory)."""
    loaded = load_model(str(llama_dir))
    assert any(p.requires_grad for p in loaded.model.parameters())
    grad_enabled = []
    loaded.model.register_forward_hook(lambda module, args, output: grad_enabled.append(torch.is_grad_enabled()))
    result = perplexity(loaded.model, loaded.tokenizer, dataset=str(corpus), seqlen=64, windows=2, progress=False)
    assert grad_enabled == [False, False]
    assert result["windows"] == 2 and math.isfinite(result["ppl"])
