import pytest
import torch
from conftest import recipe_dict
from torch import nn

import compressor
from compressor.nn import LowRankLinear
from compressor.passes.base import LayerState
from compressor.passes.lowrank import LowRank

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def correlated_inputs(n=500, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, 8, generator=g) @ torch.randn(8, width, generator=g)  # 8 directions
    return signal + 0.05 * torch.randn(n, width, generator=g)


def factorize(method, linear, x, **rank):
    p = LowRank(method=method, **rank)
    p.validate()
    return p.apply("layer", linear, x.T @ x if method == "activation" else None, LayerState())


def test_activation_aware_beats_plain_svd_on_output_error():
    torch.manual_seed(0)
    linear, x = nn.Linear(48, 40, bias=True), correlated_inputs()
    errors = {}
    for method in ("activation", "svd"):
        module, record = factorize(method, linear, x, rank=8)  # the inputs span ~8 directions
        assert isinstance(module, LowRankLinear) and record["factorized"] and record["rank"] == 8
        errors[method] = (module(x) - linear(x)).norm()
    assert errors["activation"] < 0.3 * errors["svd"]


def test_rank_choices():
    linear, x = nn.Linear(48, 40), correlated_inputs()
    assert factorize("svd", linear, x, param_ratio=0.5)[1]["rank"] == int(0.5 * 48 * 40 / 88)
    assert factorize("svd", linear, x, rank_ratio=0.25)[1]["rank"] == 10
    module, record = factorize("activation", linear, x, energy=0.99)
    assert record["energy_kept"] >= 0.99 and record["rank"] <= 12  # the inputs span ~8 directions


def test_a_rank_that_saves_nothing_leaves_the_linear_dense():
    linear, x = nn.Linear(48, 40), correlated_inputs()
    module, record = factorize("svd", linear, x, rank=22)  # 22 * 88 >= 48 * 40
    assert module is linear and record["factorized"] is False


def test_lowrank_checkpoint_round_trip_and_counts(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    model = compressor.compress(recipe_dict(llama_dir, corpus, [{"lowrank": {"param_ratio": 0.6}}], out),
                                progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LowRankLinear) and up.rank == int(0.6 * 64 * 128 / 192)
    parameters = model.compression_config["parameters"]
    dense, compressed = parameters["dense"], parameters["compressed"]
    kept = compressed["parameters_without_embeddings"] / dense["parameters_without_embeddings"]
    assert kept == pytest.approx(0.6, abs=0.03)
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out)(input_ids=IDS).logits, model(input_ids=IDS).logits,
                                   rtol=0, atol=0)


def test_plain_svd_needs_no_calibration_data(llama_dir):
    recipe = {"model": str(llama_dir), "passes": [{"lowrank": {"rank": 8, "method": "svd"}}],
              "calibration": {"dataset": "/no/such/file.txt"}}
    model = compressor.compress(recipe, progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)


def test_lowrank_then_gptq_and_lrec_work_on_both_factors_or_the_linear_left_dense(llama_dir, corpus, tmp_path):
    from compressor.nn import QuantLinear

    out = tmp_path / "ckpt"
    # rank 30 saves parameters on the 64 -> 128 MLP linears but not on the 64 -> 32 k_proj
    passes = [{"lowrank": {"rank": 30}}, {"gptq": {"bits": 4, "group_size": 16}}, {"lrec": {"rank": 4}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    layer = model.model.layers[1]
    assert isinstance(layer.mlp.up_proj, LowRankLinear)
    assert isinstance(layer.mlp.up_proj.down, QuantLinear) and isinstance(layer.mlp.up_proj.up, QuantLinear)
    assert isinstance(layer.self_attn.k_proj, QuantLinear)
    records = model.compression_config["modules"]
    assert [r["pass"] for r in records["model.layers.1.mlp.up_proj"]] == ["lowrank"]
    assert [r["pass"] for r in records["model.layers.1.mlp.up_proj.down"]] == ["gptq", "lrec"]
    assert [r["pass"] for r in records["model.layers.1.self_attn.k_proj"]] == ["lowrank", "gptq", "lrec"]
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out, keep_packed=True)(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits, rtol=0, atol=0)
