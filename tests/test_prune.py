import pytest
import torch
from torch import nn

from compressor.passes.base import ParamError
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
    _, record = Magnitude(sparsity=0.5).apply("x", linear, None)
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
    sq_norms = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0], dtype=torch.float64)
    Wanda(sparsity=0.5).apply("x", linear, torch.stack([torch.zeros(8, dtype=torch.float64), sq_norms]))
    assert torch.equal(linear.weight[0] != 0, torch.tensor([False, True, False, True, False, True, False, True]))


def _wanda_stats(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return torch.stack([x.sum(0), (x * x).sum(0)])


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None), ("4:8", None)])
def test_dsnot_keeps_the_pattern_and_shrinks_the_mean_output_error(pattern, sparsity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) + torch.randn(64, generator=g) * 2  # inputs with nonzero means
    weight = torch.randn(32, 64, generator=g)
    stats = _wanda_stats(x)
    plain = Wanda(sparsity=sparsity, pattern=pattern).keep_mask(weight, stats)
    refined = Wanda(sparsity=sparsity, pattern=pattern, dsnot_cycles=50).keep_mask(weight, stats)
    assert torch.equal(refined.sum(1), plain.sum(1))
    nm = parse_pattern(pattern)
    if nm:
        assert (refined.reshape(32, -1, nm[1]).sum(2) == nm[0]).all()
    assert not torch.equal(refined, plain)

    def mean_output_error(keep):  # [out]: |mean over tokens of the output the pruned weights took away|
        return ((x @ (weight * ~keep).T).mean(0)).abs()

    before, after = mean_output_error(plain), mean_output_error(refined)
    assert (after <= before + 1e-5).all()
    assert after.mean() < 0.5 * before.mean()


def test_dsnot_cycles_must_be_a_non_negative_integer():
    with pytest.raises(ParamError, match="integer >= 0") as error:
        Wanda(sparsity=0.5, dsnot_cycles=-1).validate()
    assert error.value.key == "dsnot_cycles"
