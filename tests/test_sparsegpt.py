import pytest
import torch
from conftest import recipe_dict

import compressor
from compressor.passes.prune import nm_keep_mask, row_keep_mask, sparsegpt


def inputs(n=512, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)


def test_unstructured_prunes_the_exact_count_per_block():
    x, w = inputs(d=200), torch.randn(24, 200)
    pruned = sparsegpt(w, x.T @ x, 0.6, None, block_size=128)
    assert (pruned[:, :128] == 0).sum() == int(24 * 128 * 0.6)
    assert (pruned[:, 128:] == 0).sum() == int(24 * 72 * 0.6)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_is_exact(n, m):
    x, w = inputs(), torch.randn(16, 128)
    pruned = sparsegpt(w, x.T @ x, 0.0, (n, m), block_size=32)
    assert ((pruned != 0).reshape(16, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_beats_magnitude_and_wanda(pattern):
    x, w = inputs(), torch.randn(32, 128)
    H = x.T @ x
    nm = None if pattern == "unstructured" else (2, 4)

    def error(pruned):
        return (x @ (pruned - w).T).norm()

    def masked(score):
        keep = row_keep_mask(score, 0.5) if nm is None else nm_keep_mask(score, *nm)
        return w * keep

    magnitude = error(masked(w.abs()))
    wanda = error(masked(w.abs() * x.norm(dim=0)[None, :]))
    ours = error(sparsegpt(w, H, 0.5, nm))
    assert ours < 0.8 * min(magnitude, wanda)


def test_prune_then_gptq_keeps_the_zeros(llama_dir, corpus):
    passes = [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 32}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    w = model.model.layers[1].mlp.gate_proj.weight_dequantized()
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    records = model.compression_config["modules"]["model.layers.1.mlp.gate_proj"]
    assert [r["pass"] for r in records] == ["sparsegpt", "gptq"] and records[0]["sparsity"] == 0.5

