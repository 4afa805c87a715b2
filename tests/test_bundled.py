"""Smoke tests on the real bundled models (GGUF -> float cache -> compress -> save -> load -> eval).

Kept short: two decoder layers compressed, a few short windows. The first run dequantizes each
GGUF once (about 30 s for SmolLM2, 60 s for Gemma-3) into the cache."""

import math

import pytest
import torch

import compressor
from compressor.nn import SparseLinear

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["bundled:smollm2-135m", "bundled:gemma-3-270m"])
def test_bundled_model_compresses_saves_and_reloads(model, tmp_path):
    out = tmp_path / "ckpt"
    recipe = {
        "model": model,
        "calibration": {"dataset": "bundled:wikileads", "samples": 2, "seqlen": 128},
        "passes": [{"wanda": {"pattern": "2:4", "targets": [r"re:model\.layers\.[01]\..*"]}}],
        "output": str(out),
    }
    dense = compressor.evaluate(model, seqlen=256, windows=2, progress=False)
    assert 2 < dense["ppl"] < 60, dense  # a working language model on English Wikipedia text

    compressed = compressor.compress(recipe, progress=False)
    layer0 = compressed.model.layers[0]
    for linear in (layer0.self_attn.q_proj, layer0.mlp.down_proj):
        assert isinstance(linear, SparseLinear)  # stored as values + 2-bit indices
        groups = (linear.weight_dense() != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert (groups <= 2).all()
    assert compressed.model.layers[2].mlp.up_proj.weight.count_nonzero() > 0.9 * \
        compressed.model.layers[2].mlp.up_proj.weight.numel()

    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975]])
    loaded = compressor.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, compressed(input_ids=ids).logits, rtol=0, atol=0)
    after = compressor.evaluate(str(out), seqlen=256, windows=2, progress=False)
    assert math.isfinite(after["ppl"]) and after["ppl"] > dense["ppl"]
    assert after["nonzero_parameters"] < dense["nonzero_parameters"]
    assert after["bytes_on_disk"] < dense["bytes_on_disk"]
