import json

import pytest
import torch
from conftest import recipe_dict
from torch import nn

import compressor
from compressor.errors import CompressorError
from compressor.nn import QuantLinear
from compressor.passes.base import LayerState
from compressor.passes.prune import Magnitude
from compressor.passes.quantize import GPTQ, RTN, gptq, grid, rtn, to_codes


def correlated_inputs(n=512, d=96, seed=0):
    """Inputs near a 12-dimensional subspace, as LLM activations are: GPTQ has much to gain."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g) @ torch.randn(12, d, generator=g) + 0.2 * torch.randn(n, d, generator=g)


def linear_with_zeros() -> nn.Linear:
    """A dense [48, 96] linear with 10% exact zeros, as a model dequantized from GGUF has (not pruned)."""
    linear = nn.Linear(96, 48, bias=False)
    linear.weight.data[torch.rand(48, 96, generator=torch.Generator().manual_seed(1)) < 0.1] = 0
    return linear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_are_in_range_and_error_is_within_half_a_step(bits, symmetric):
    w = torch.randn(16, 100)
    codes, scales, zeros = rtn(w, bits, 32, symmetric)
    assert scales.shape == (16, 4)  # 3 groups of 32 and a short last group of 4
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    if symmetric:
        assert (zeros == 2 ** (bits - 1)).all()
    g = torch.arange(100) // 32
    w_hat = (codes - zeros[:, g]) * scales[:, g]
    inside = (codes > 0) & (codes < 2**bits - 1)  # not clipped
    assert ((w_hat - w).abs()[inside] <= scales[:, g][inside] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_raises_a_rows_rounding_error_and_lowers_the_total(bits, symmetric):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128))  # heavy tails: clipping the few large weights pays
    g = torch.arange(128) // 32

    def row_errors(codes, scales, zeros):
        return ((codes - zeros[:, g]) * scales[:, g] - w).pow(2).sum(1)

    plain, searched = row_errors(*rtn(w, bits, 32, symmetric)), row_errors(*rtn(w, bits, 32, symmetric, True))
    assert (searched <= plain * (1 + 1e-6)).all() and searched.sum() < (0.8 if bits == 2 else 0.97) * plain.sum()


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(8, 64)
    a = rtn(w, 4, 32, True)
    b = gptq(w, torch.eye(64), 4, 32, True, damp=0.0)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 32, False), (4, 32, True), (2, None, False)])
def test_gptq_output_error_is_below_rtn(bits, group_size, act_order):
    x = correlated_inputs()
    w = torch.randn(48, 96)
    gs = group_size or 96
    H = x.T @ x

    def output_error(codes, scales, zeros):
        g = torch.arange(96) // gs
        return ((x @ ((codes - zeros[:, g]) * scales[:, g]).T) - x @ w.T).norm()

    e_rtn = output_error(*rtn(w, bits, gs, True))
    e_gptq = output_error(*gptq(w, H, bits, gs, True, act_order=act_order))
    assert e_gptq < 0.5 * e_rtn


def test_gptq_matches_sequential_obq_reference():
    """Column by column: quantize, then move the remaining columns by the exact least-squares update
    +e H[i, rest] H[rest, rest]^-1. GPTQ (lazy blocks of 16, one group) must give the same codes."""
    d = 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, d, generator=g) @ (torch.eye(d) + torch.randn(d, d, generator=g) / 4)  # well conditioned
    w = torch.randn(6, d, generator=g)
    H = x.T @ x
    codes = gptq(w, H, 4, d, True, damp=0.01, block_size=16)[0]
    Hd = H + 0.01 * H.diag().mean() * torch.eye(d)
    scale, zero = grid(w, 4, True)
    W, expected = w.clone(), torch.zeros_like(w)
    for i in range(d):
        expected[:, i] = to_codes(W[:, i], scale, zero, 4)
        e = W[:, i] - (expected[:, i] - zero) * scale
        rest = torch.arange(i + 1, d)
        if len(rest):
            W[:, rest] += e[:, None] * (Hd[i, rest] @ torch.linalg.inv(Hd[rest][:, rest]))[None, :]
    assert (codes != expected).float().mean() < 0.01  # float rounding may flip a rare tie


def test_quantized_checkpoint_round_trip_and_size(model_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    passes = [{"gptq": {"bits": 4, "group_size": 48}}]  # 48 does not divide 128: a short last group
    model = compressor.compress(recipe_dict(model_dir, corpus, passes, out), progress=False)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and layer.mlp.down_proj.scales.shape[1] == 3
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = compressor.load(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    cc = json.loads((out / "config.json").read_text())["compression_config"]
    record = cc["modules"]["model.layers.0.mlp.down_proj"][0]
    assert record["bits"] == 4 and record["runtime"]["class"] == "QuantLinear"
    assert 4 < record["bits_per_weight"] < 5 and 0 < record["relative_weight_error"] < 0.2


def test_quantizing_twice_or_pruning_after_quantizing_fails_up_front(llama_dir, corpus, tmp_path):
    for passes, message in [([{"rtn": {"bits": 4}}, {"gptq": {"bits": 4}}], "made quantized by rtn"),
                            ([{"rtn": {"bits": 4}}, {"magnitude": {"sparsity": 0.5}}], "reorder the passes")]:
        with pytest.raises(CompressorError, match=message):
            compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()


def test_prune_then_quantize_is_allowed(llama_dir, corpus):
    passes = [{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 8, "group_size": 32}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)


def test_gptq_updates_zero_weights_it_was_not_told_are_pruned():
    # A model dequantized from GGUF has many exact zeros (6% of Gemma-3-270m's q_proj); they are weights,
    # and freezing them at zero costs GPTQ output error. Only pruned ones must stay zero.
    x = correlated_inputs()
    w = torch.randn(48, 96)
    w[torch.rand(48, 96, generator=torch.Generator().manual_seed(1)) < 0.1] = 0
    zero, H = w == 0, x.T @ x

    def quantized(pruned):
        codes, scales, zeros = gptq(w, H, 4, 32, True, act_order=True, pruned=pruned)
        g = torch.arange(96) // 32
        return (codes - zeros[:, g]) * scales[:, g]

    free, frozen = quantized(None), quantized(zero)
    assert (frozen[zero] == 0).all() and (free[zero] != 0).any()
    assert (x @ (free - w).T).norm() < 0.95 * (x @ (frozen - w).T).norm()


def test_magnitude_at_sparsity_zero_freezes_a_dense_linears_exact_zeros_for_gptq():
    # nothing pruned, but the linear counts as pruned: GPTQ keeps its exact zeros
    x = correlated_inputs()
    linear = linear_with_zeros()
    zero, before = linear.weight == 0, linear.weight.detach().clone()
    state = LayerState()
    linear, record = Magnitude(sparsity=0.0).apply("up_proj", linear, None, state)
    assert torch.equal(linear.weight, before) and record["sparsity"] == pytest.approx(zero.double().mean().item())
    assert state.pruned == {"up_proj"}
    q, _ = GPTQ(bits=4, group_size=32).apply("up_proj", linear, x.T @ x, state)
    assert (q.weight_dequantized()[zero] == 0).all()


def test_gptq_keep_zeros_freezes_a_dense_linears_exact_zeros():
    x = correlated_inputs()
    linear = linear_with_zeros()
    zero = linear.weight == 0
    free, free_record = GPTQ(bits=2, group_size=32).apply("up_proj", linear, x.T @ x, LayerState())
    kept, kept_record = GPTQ(bits=2, group_size=32, keep_zeros=True).apply("up_proj", linear, x.T @ x, LayerState())
    assert (kept.weight_dequantized()[zero] == 0).all() and (free.weight_dequantized()[zero] != 0).any()
    assert kept_record["frozen_zeros"] == zero.sum().item() and free_record["frozen_zeros"] == 0


@pytest.mark.parametrize("pruner", ["magnitude", "wanda"])
def test_prune_then_gptq_keeps_the_pruned_zeros(pruner, llama_dir, corpus):
    passes = [{pruner: {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 32, "ignore": ["re:.*down_proj"]}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    w = model.model.layers[1].mlp.up_proj.weight_dequantized()
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_bad_quantization_parameters():
    with pytest.raises(CompressorError, match="allowed: 2, 3, 4, 8"):
        compressor.load_recipe({"model": "m", "passes": [{"rtn": {"bits": 5}}]})
    with pytest.raises(CompressorError, match="group_size"):
        compressor.load_recipe({"model": "m", "passes": [{"gptq": {"group_size": 0}}]})
    linear = nn.Linear(8, 4)
    linear.weight.data[1, 2] = float("nan")
    with pytest.raises(CompressorError, match="layers.3.mlp.up_proj has NaN"):
        RTN(bits=4).apply("layers.3.mlp.up_proj", linear, None, LayerState())
    assert GPTQ.stats == "hessian"


def test_bits_per_weight_summary_weights_by_size_and_tolerates_records_without_sizes():
    from compressor.checkpoint import linear_bits_per_weight

    modules = {"a": [{"pass": "gptq", "bits_per_weight": 4.0, "weights": 300}],
               "b": [{"pass": "gptq", "bits_per_weight": 2.0, "weights": 100},
                     {"pass": "lrec", "bits_per_weight": 6.0, "weights": 100}],
               "c": [{"pass": "magnitude", "sparsity": 0.5}]}
    assert linear_bits_per_weight({"modules": modules}) == pytest.approx((4.0 * 300 + 6.0 * 100) / 400)
    assert linear_bits_per_weight({"modules": {"a": [{"pass": "gptq", "bits_per_weight": 4.0}]}}) is None
    assert linear_bits_per_weight({"modules": {"c": modules["c"]}}) is None
