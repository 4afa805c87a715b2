import pytest
import torch
from conftest import recipe_dict
from torch import nn

import compressor
from compressor.passes.base import LayerState
from compressor.passes.prune import Magnitude, Wanda, nm_keep_mask, parse_pattern, row_keep_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.99])
def test_row_mask_drops_exact_count_per_row(sparsity):
    score = torch.rand(16, 96)
    keep = row_keep_mask(score, sparsity)
    assert (keep.sum(1) == 96 - int(96 * sparsity)).all()
    # every dropped score is no larger than every kept one, row by row
    for row, k in zip(score, keep, strict=True):
        if (~k).any():
            assert row[~k].max() <= row[k].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_top_n_of_every_group(n, m):
    score = torch.rand(8, 64)
    keep = nm_keep_mask(score, n, m)
    groups = keep.reshape(8, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    s = score.reshape(8, 64 // m, m)
    kept_min = torch.where(groups, s, torch.inf).min(-1).values
    dropped_max = torch.where(groups, -torch.inf, s).max(-1).values
    assert (dropped_max <= kept_min).all()


@pytest.mark.parametrize("bad", ["4:4", "0:4", "5:4", "2-4", "two:four", "", "2:"])
def test_impossible_patterns_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_magnitude_apply_zeroes_smallest_and_keeps_the_rest_unchanged():
    torch.manual_seed(0)
    linear = nn.Linear(32, 8, bias=False)
    before = linear.weight.detach().clone()
    _, record = Magnitude(sparsity=0.5).apply("x", linear, None, LayerState())
    w = linear.weight.detach()
    assert record["sparsity"] == 0.5
    assert ((w == 0).sum(1) == 16).all()
    kept = w != 0
    assert torch.equal(w[kept], before[kept])
    for b, k in zip(before.abs(), kept, strict=True):
        assert b[~k].max() <= b[k].min()


def test_wanda_score_uses_input_norms():
    # Equal weights; the input norms alone decide: the low-norm half of the columns is pruned.
    linear = nn.Linear(8, 2, bias=False)
    nn.init.constant_(linear.weight, 1.0)
    norms = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0], dtype=torch.float64)
    Wanda(sparsity=0.5).apply("x", linear, norms, LayerState())
    assert torch.equal(linear.weight[0] != 0, torch.tensor([False, True, False, True, False, True, False, True]))


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_sink_weight_reaches_the_statistics(pruner, llama_dir, corpus):
    def pruned(sink_weight: float) -> torch.Tensor:
        passes = [{pruner: {"pattern": "2:4", "sink_weight": sink_weight}}]
        model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
        return model.model.layers[1].mlp.down_proj.weight_dense()

    assert not torch.equal(pruned(1.0), pruned(64.0))


def test_wanda_running_mean_norms_reach_the_statistics(llama_dir, corpus, monkeypatch):
    from compressor import engine

    kinds = []
    collect = engine.collect_stats
    monkeypatch.setattr(engine, "collect_stats", lambda *args: kinds.append(args[4]) or collect(*args))

    def pruned(norms: str) -> torch.Tensor:
        passes = [{"wanda": {"pattern": "2:4", "norms": norms}}]
        model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
        return model.model.layers[1].mlp.down_proj.weight_dense() != 0

    differ = (pruned("sum") != pruned("running_mean")).float().mean()
    assert set(kinds) == {"input_sq_norms", "input_sq_norms_running_mean"}
    assert differ < 0.01  # the same norms up to rounding: near-ties at most
