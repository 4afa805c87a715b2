import math

import pytest
import torch
import torch.nn.functional as F

from compressor.models import load_model
from compressor.perplexity import perplexity, window_nll


def test_perplexity_runs_the_model_without_autograd(llama_dir, corpus):
    """Parameters of a loaded model require grad; with autograd on, each window's graph is kept alive
    (on Gemma-3 that doubled the eval's peak memory)."""
    loaded = load_model(str(llama_dir))
    assert any(p.requires_grad for p in loaded.model.parameters())
    grad_enabled = []
    loaded.model.get_decoder().register_forward_hook(
        lambda module, args, output: grad_enabled.append(torch.is_grad_enabled()))
    result = perplexity(loaded.model, loaded.tokenizer, dataset=str(corpus), seqlen=64, windows=2, progress=False)
    assert grad_enabled == [False, False]
    assert result["windows"] == 2 and math.isfinite(result["ppl"])


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_window_nll_in_head_chunks_equals_the_whole_window_logits(model_dir, softcap):
    """The decoder once, the head a few positions at a time (and Gemma-2 style logit capping where the
    config asks for it), against the model's own forward and one cross-entropy over the whole window."""
    loaded = load_model(str(model_dir))
    if softcap is not None and not hasattr(loaded.model.config, "final_logit_softcapping"):
        pytest.skip("the architecture has no logit capping")
    loaded.model.config.final_logit_softcapping = softcap
    ids = torch.randint(0, loaded.model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    whole = F.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
    assert window_nll(loaded.model, ids, chunk=16) == pytest.approx(whole, rel=1e-5)  # chunks of 16, 16, 7
