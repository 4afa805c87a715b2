import pytest
import torch
import torch.nn.functional as F
from conftest import recipe_dict
from torch import nn
from transformers import AutoModelForCausalLM

import compressor
from compressor.errors import CompressorError, CompressorWarning
from compressor.models import adapter_for
from compressor.nn import QuantLinear
from compressor.passes import lrec_refine
from compressor.passes.base import LayerState
from compressor.passes.factors import round_factors, store_factors
from compressor.passes.hessian import inverse_hessian_cholesky, output_error
from compressor.passes.lrec import LREC, fit_integer_factors, round_with_feedback
from compressor.passes.quantize import RTN
from compressor.passes.svd import split_factors, whitened_svd


def test_w2_with_lrec_checkpoint_round_trip(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    q = model.model.layers[0].self_attn.o_proj
    assert isinstance(q, QuantLinear) and q.rank == 8 and q.lora_a.dtype == torch.float16
    record = model.compression_config["modules"]["model.layers.0.self_attn.o_proj"]
    assert [r["pass"] for r in record] == ["gptq", "lrec"]
    assert record[1]["output_error_kept"] < 1
    assert record[1]["bits_per_weight"] == pytest.approx(record[0]["bits_per_weight"] + 8 * 128 * 16 / 64**2, rel=1e-3)
    report = compressor.evaluate(str(out), dataset=str(corpus), seqlen=64, windows=1, progress=False)
    # per linear: 2-bit codes, a 16-bit scale and an 8-bit zero per 32 weights, rank-8 float16 factors
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, QuantLinear)]
    bits = sum(o * i * 2 + o * (i // 32) * 24 + 8 * (i + o) * 16 for i, o in shapes)
    assert report["linear_bits_per_weight"] == pytest.approx(bits / sum(i * o for i, o in shapes), rel=1e-3)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    loaded = compressor.load(out, keep_packed=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_lrec_needs_a_quantized_linear_and_a_sane_rank(llama_dir, corpus):
    with pytest.raises(CompressorError, match="lrec cannot run on .* it was made dense by the model"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"lrec": {"rank": 4}}]), progress=False)
    with pytest.raises(CompressorError, match="rank 100 is larger"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 4}}, {"lrec": {"rank": 100}}]),
                            progress=False)


def test_extra_bits_budget_sets_each_linears_rank(llama_dir, corpus):
    passes = [{"rtn": {"bits": 2, "group_size": 32}}, {"lrec": {"extra_bits": 1.0}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    modules = model.compression_config["modules"]
    # one rank costs 16 (in + out) / (in out) bits per weight: 0.5 for q [64 -> 64], 0.75 for k [64 -> 32],
    # 0.375 for up [64 -> 128]; the budget buys floor(1.0 / that)
    ranks = {name: modules[f"model.layers.0.{name}"][1]["rank"] for name in ("self_attn.q_proj", "self_attn.k_proj",
                                                                            "mlp.up_proj", "mlp.down_proj")}
    assert ranks == {"self_attn.q_proj": 2, "self_attn.k_proj": 1, "mlp.up_proj": 2, "mlp.down_proj": 2}
    for records in modules.values():
        added = records[1]["bits_per_weight"] - records[0]["bits_per_weight"]
        assert 0 < added <= 1.0 + 1e-6


@pytest.mark.parametrize("lrec, message", [
    ({"rank": 4, "extra_bits": 1.0}, "give rank or extra_bits, not both"),
    ({"extra_bits": 0.2}, "extra_bits 0.2 buys no rank for model.layers.0.self_attn.q_proj: one rank costs 0.500"),
    ({"alternate": -1}, r"alternate: got -1; use 0 \(no re-quantization\)"),
])
def test_lrec_parameter_errors(llama_dir, corpus, lrec, message):
    with pytest.raises(CompressorError, match=message):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 2, "group_size": 32}}, {"lrec": lrec}]),
                            progress=False)


def test_refinement_lowers_the_layer_output_error_and_round_trips(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}}, {"lrec_refine": {"steps": 40}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    record = model.compression_config["modules"]["model.layers.1.mlp.up_proj"]
    assert [r["pass"] for r in record] == ["gptq", "lrec", "lrec_refine"]
    assert record[2]["relative_error_last"] < 0.9 * record[2]["relative_error_first"]
    assert record[2]["relative_error_after"] < 0.9 * record[2]["relative_error_before"]
    assert record[2]["error_windows"] == lrec_refine.CHECK_WINDOWS == 4  # of the recipe's 4 windows
    q = model.model.layers[1].mlp.up_proj
    assert q.lora_a.dtype == torch.float16 and "forward" not in q.__dict__
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out, keep_packed=True)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)


def test_refinement_that_moves_nothing_records_the_same_error_before_and_after(llama_dir, corpus):
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}},
              {"lrec_refine": {"steps": 1, "lr": 1e-12}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    record = model.compression_config["modules"]["model.layers.1.mlp.up_proj"][-1]
    assert record["relative_error_before"] > 1e-3  # W2 leaves an error to measure
    assert record["relative_error_after"] == pytest.approx(record["relative_error_before"], rel=1e-3)


def test_refining_against_the_model_matches_the_dense_models_hidden_states(llama_dir, corpus, monkeypatch):
    calls = []  # (inputs, outputs) of each layer's dense run

    def spy(layer, hidden, kwargs, device, dense):
        calls.append((hidden, dense_outputs(layer, hidden, kwargs, device, dense)))
        return calls[-1][1]

    dense_outputs = lrec_refine.dense_outputs
    monkeypatch.setattr(lrec_refine, "dense_outputs", spy)
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}},
              {"lrec_refine": {"steps": 5, "reference": "model"}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    assert model.compression_config["modules"]["model.layers.2.mlp.up_proj"][-1]["reference"] == "model"
    assert len(calls) == 3
    embeddings = torch.cat(calls[0][0])  # [windows, L, d]: the inputs of layer 0
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(llama_dir)(inputs_embeds=embeddings, output_hidden_states=True)
        compressed = model(inputs_embeds=embeddings, output_hidden_states=True)
    for i in (0, 1):  # hidden_states[i + 1]: the output of layer i (the last one's is normed)
        torch.testing.assert_close(torch.cat(calls[i][1]), dense.hidden_states[i + 1])
    assert not torch.allclose(dense.hidden_states[2], compressed.hidden_states[2], atol=1e-3)


@pytest.mark.parametrize("refine, message", [
    ({"steps": 0}, "steps: got 0"), ({"lr": -1.0}, "lr: got -1.0"),
    ({"reference": "dense"}, "reference: got 'dense'; allowed: layer .* or model"),
    ({"loss": "mse"}, "loss: got 'mse'; allowed: total .*, channel .* or next_norm"),
    ({"autocast": "float16"}, "autocast: got 'float16'; allowed: none .* or bfloat16"),
])
def test_refinement_parameter_errors(llama_dir, corpus, refine, message):
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}}, {"lrec_refine": refine}]
    with pytest.raises(CompressorError, match=message):
        compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)


def test_channel_loss_counts_each_channel_relative_to_its_scale():
    target = torch.tensor([[[1000.0, 1.0], [-1000.0, -1.0]]])  # [1 window, 2 tokens, 2 channels]
    weight = lrec_refine.channel_weights([target])
    torch.testing.assert_close(weight * torch.tensor([1e6, 1.0]), torch.full((2,), weight[1].item()))
    big_off, small_off = target + torch.tensor([10.0, 0.0]), target + torch.tensor([0.0, 0.01])
    # the same 1% error: under `total` only the large channel's counts, under `channel` both alike
    assert lrec_refine.relative_error(big_off, target, None) > 1e5 * lrec_refine.relative_error(small_off, target, None)
    torch.testing.assert_close(lrec_refine.relative_error(big_off, target, weight),
                               lrec_refine.relative_error(small_off, target, weight))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_next_norm_is_a_frozen_copy_of_the_norm_that_reads_the_layer(arch, llama_dir, gemma_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir if arch == "llama" else gemma_dir)
    adapter = adapter_for(model)
    layers = model.model.layers
    for index, reader in [(0, layers[1].input_layernorm), (len(layers) - 1, model.model.norm)]:
        with torch.no_grad():
            reader.weight.uniform_(0.5, 2.0)  # distinct gains, so a wrong module would not match
        norm = lrec_refine.next_norm(model, adapter, index)
        assert norm is not reader and not any(p.requires_grad for p in norm.parameters())
        h = torch.randn(2, 5, model.config.hidden_size)
        torch.testing.assert_close(norm(h), reader(h))


def test_next_norm_loss_counts_each_token_relative_to_its_scale():
    norm = nn.RMSNorm(2)
    target = torch.tensor([[[1000.0, 1000.0], [1.0, 1.0]]])  # [1 window, 2 tokens, 2 channels]
    big_off, small_off = target * torch.tensor([[[1.01], [1.0]]]), target * torch.tensor([[[1.0], [1.01]]])
    big_off[..., 1], small_off[..., 1] = target[..., 1], target[..., 1]  # 1% off in channel 0 of one token
    assert lrec_refine.relative_error(big_off, target, None) > 1e5 * lrec_refine.relative_error(small_off, target, None)
    torch.testing.assert_close(lrec_refine.relative_error(norm(big_off), norm(target), None),
                               lrec_refine.relative_error(norm(small_off), norm(target), None))


def test_balanced_factors_keep_their_product_and_share_one_size_per_rank():
    a, b = torch.randn(64, 4) * 1e-3, torch.randn(4, 32)  # A tiny, as the whitened start leaves it on Gemma-3
    a[:, 3] = 0  # a rank component that is zero stays as it is
    a2, b2 = lrec_refine.balanced(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b)
    rms_a, rms_b = a2.pow(2).mean(0).sqrt(), b2.pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms_a[:3], rms_b[:3])
    torch.testing.assert_close(b2[3], b[3])
    codes = round_factors(a, b, 8)  # int8 factors are rounded per rank component: the same after rescaling
    rounded = round_factors(a2, b2, 8)
    torch.testing.assert_close(rounded[0] @ rounded[1], codes[0] @ codes[1])


@pytest.mark.parametrize("arch, setting, layer", [
    ("llama", {"loss": "channel"}, 1),
    ("gemma", {"loss": "next_norm"}, -1),  # the last layer: read through the final norm
    ("llama", {"autocast": "bfloat16"}, 1),
])
def test_refinement_setting_lowers_its_error_and_stores_factors_as_usual(arch, setting, layer, llama_dir, gemma_dir,
                                                                          corpus, monkeypatch):
    monkeypatch.setattr(lrec_refine, "matmul_slowdown", lambda dtype, device: 1.0)  # bfloat16 even on a CPU without it
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}},
              {"lrec_refine": {"steps": 40, **setting}}]
    model = compressor.compress(recipe_dict(llama_dir if arch == "llama" else gemma_dir, corpus, passes),
                                progress=False)
    index = layer % len(model.model.layers)
    record = model.compression_config["modules"][f"model.layers.{index}.mlp.up_proj"][-1]
    assert {key: record[key] for key in setting} == setting
    assert record["relative_error_last"] < 0.9 * record["relative_error_first"]
    assert model.model.layers[index].mlp.up_proj.lora_a.dtype == torch.float16  # float16 factors, as lrec stored


def test_bfloat16_refinement_falls_back_to_float32_where_bfloat16_matmuls_are_slow(llama_dir, corpus, monkeypatch):
    monkeypatch.setattr(lrec_refine, "matmul_slowdown", lambda dtype, device: 190.0)
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}},
              {"lrec_refine": {"steps": 20, "autocast": "bfloat16"}}]
    with pytest.warns(CompressorWarning, match="bfloat16 matmuls 190x slower than float32 ones"):
        model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    record = model.compression_config["modules"]["model.layers.1.mlp.up_proj"][-1]
    assert record["autocast"] == "none"  # what ran
    assert record["relative_error_last"] < record["relative_error_first"]


@pytest.mark.parametrize("arch, defaults", [
    ("llama", {"reference": "layer", "loss": "total"}),
    ("gemma", {"reference": "model", "loss": "next_norm"}),  # `total` breaks Gemma-3 (the adapter says why)
])
def test_refinement_takes_its_defaults_from_the_model_family(arch, defaults, llama_dir, gemma_dir, corpus):
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}}, {"lrec_refine": {"steps": 5}}]
    model = compressor.compress(recipe_dict(llama_dir if arch == "llama" else gemma_dir, corpus, passes),
                                progress=False)
    record = model.compression_config["modules"]["model.layers.1.mlp.up_proj"][-1]
    assert {key: record[key] for key in defaults} == defaults


def test_refinement_without_lrec_is_refused(llama_dir, corpus):
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec_refine": {"steps": 5}}]
    with pytest.raises(CompressorError, match="put lrec_refine right after lrec"):
        compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)


@pytest.mark.parametrize("lrec", [True, False])
def test_refining_scales_keeps_codes_and_zeros_and_round_trips(llama_dir, corpus, tmp_path, lrec):
    out = tmp_path / "ckpt"
    gptq = [{"gptq": {"bits": 2, "group_size": 32}}] + ([{"lrec": {"rank": 8}}] if lrec else [])
    quantized = compressor.compress(recipe_dict(llama_dir, corpus, gptq), progress=False)
    refine = [{"lrec_refine": {"steps": 40, "scales": True, "targets": [r"re:model\.layers\.0\..*"]}}]
    refined = compressor.compress(recipe_dict(llama_dir, corpus, gptq + refine, out), progress=False)
    before, after = quantized.model.layers[0].mlp.up_proj, refined.model.layers[0].mlp.up_proj
    assert torch.equal(before.qweight, after.qweight) and torch.equal(before.zeros, after.zeros)
    assert not torch.equal(before.scales, after.scales) and after.scales.dtype == torch.float16
    assert after.rank == (8 if lrec else 0)
    modules = refined.compression_config["modules"]
    assert modules["model.layers.1.mlp.up_proj"][-1]["pass"] != "lrec_refine"  # a layer the targets leave out
    record = modules["model.layers.0.mlp.up_proj"][-1]
    assert record["scales"] and record["relative_error_last"] < 0.9 * record["relative_error_first"]
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out, keep_packed=True)(input_ids=ids).logits,
                                   refined(input_ids=ids).logits, rtol=0, atol=0)


def test_alternation_moves_an_outlier_direction_into_the_factors():
    # W = small noise + one large rank-1 direction: the 2-bit grid of W spends its range on the outlier;
    # after a round the factors carry it and the grid is re-fitted to the rest
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 64, generator=g)
    linear = nn.Linear(64, 64, bias=False)
    linear.weight.data = 0.02 * torch.randn(64, 64, generator=g) + 0.5 * u @ v
    X = torch.randn(512, 64, generator=g)
    kept, codes = [], []
    for alternate in (0, 3):
        state = LayerState()
        q, _ = RTN(bits=2, group_size=32).apply("w", linear, None, state)
        q, record = LREC(rank=1, alternate=alternate).apply("w", q, X.T @ X, state)
        kept.append(record["output_error_kept"])
        codes.append(q.qweight.clone())
    assert kept[1] < 0.5 * kept[0]
    assert not torch.equal(codes[0], codes[1])


def test_alternating_round_trips_and_never_does_worse(llama_dir, corpus, tmp_path):
    def compress(alternate, out=None):
        passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8, "alternate": alternate}}]
        return compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)

    plain, out = compress(0), tmp_path / "ckpt"
    alternated = compress(3, out)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        name = f"model.layers.0.{name}"  # layer 0: both runs see the same inputs
        kept = [m.compression_config["modules"][name][1]["output_error_kept"] for m in (plain, alternated)]
        assert kept[1] <= kept[0] + 1e-9  # the best round is kept, and round 0 is the plain fit
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out, keep_packed=True)(input_ids=ids).logits,
                                   alternated(input_ids=ids).logits, rtol=0, atol=0)


def test_alternating_keeps_pruned_weights_zero(llama_dir, corpus):
    passes = [{"magnitude": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 32}},
              {"lrec": {"rank": 4, "alternate": 2}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    w = model.model.layers[0].mlp.up_proj.weight_dequantized()
    assert (w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min() >= 2


@pytest.mark.parametrize("factor_bits, q_rank, up_rank, dtype", [(8, 3, 5, torch.int8), (4, 7, 9, torch.int32)])
def test_integer_factors_buy_more_rank_and_round_trip(llama_dir, corpus, tmp_path, factor_bits, q_rank, up_rank,
                                                      dtype):
    out = tmp_path / "ckpt"
    passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"extra_bits": 1.0, "factor_bits": factor_bits}},
              {"lrec_refine": {"steps": 5}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    modules = model.compression_config["modules"]
    # one rank of b-bit factors costs (b (in + out) + 64) / (in out) bits per weight: int8 0.266, int4 0.141
    # for q [64 -> 64] (float16: 0.5, rank 2); int8 0.383, int4 0.102 for up [64 -> 128] (float16: 0.375, rank 2)
    assert modules["model.layers.0.self_attn.q_proj"][1]["rank"] == q_rank
    assert modules["model.layers.0.mlp.up_proj"][1]["rank"] == up_rank
    for records in modules.values():
        added = records[1]["bits_per_weight"] - records[0]["bits_per_weight"]
        assert 0 < added <= 1.0 + 1e-6
    q = model.model.layers[0].mlp.up_proj
    assert q.lora_a.dtype == q.lora_b.dtype == dtype and q.lora_a_scale.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out, keep_packed=True)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)


def test_int8_factors_cost_almost_nothing_over_float16_at_the_same_rank(llama_dir, corpus):
    kept = {}
    for factor_bits in (16, 8):
        passes = [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8, "factor_bits": factor_bits}}]
        model = compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
        modules = model.compression_config["modules"]  # layer 0's q, k, v: the same inputs in both runs
        kept[factor_bits] = [modules[f"model.layers.0.self_attn.{n}_proj"][1]["output_error_kept"] for n in "qkv"]
    for fp16, int8 in zip(kept[16], kept[8], strict=True):
        assert int8 < fp16 * 1.02  # (B refitted to the rounded A can even do a little better)
    with pytest.raises(CompressorError, match=r"factor_bits: got 3; use 16 .*, 8 .* or 4 \(int4\)"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 2}}, {"lrec": {"factor_bits": 3}}]),
                            progress=False)


def test_int8_factor_layout():
    q = QuantLinear(6, 4, bits=2, group_size=6)
    a = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # [in 6, rank 2]
    b = torch.tensor([[8.0, -4.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # [rank 2, out 4]
    store_factors(q, a, b, factor_bits=8)
    # rank 0 balanced to max |a| = max |b| = 4 (a x 2, b / 2), both codes then scaled by 4 / 127
    assert q.lora_a[:, 0].tolist() == [64, -127, 32, 0, 0, 0] and q.lora_b[0].tolist() == [127, -64, 32, 0]
    assert q.lora_a_scale[0].item() == pytest.approx(4 / 127) and q.lora_b_scale[0].item() == pytest.approx(4 / 127)
    assert q.lora_a[:, 1].abs().sum() == 0 and q.lora_a_scale[1] == 1  # an all-zero rank stays zero
    fa, fb = q.low_rank_factors()
    torch.testing.assert_close(fa @ fb, a @ b, rtol=0.02, atol=0)  # codes 64 and 32 stand for 2.016, 1.008
    # per row one int32 word of codes and a 16-bit scale + 8-bit zero; per rank 10 int8 codes + two float32 scales
    assert q.bits_per_weight() == pytest.approx((4 * 32 + 4 * 24 + 2 * (10 * 8 + 64)) / 24)


def test_int4_factor_layout():
    q = QuantLinear(6, 4, bits=2, group_size=6)
    a = torch.tensor([[1.2, 0.0], [-2.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # [in 6, rank 2]
    b = torch.tensor([[8.0, -5.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # [rank 2, out 4]
    store_factors(q, a, b, factor_bits=4)
    # rank 0 balanced to max |a| = max |b| = 4 (a x 2, b / 2), then codes in [-7, 7] of scale 4 / 7:
    # A's column 2.4, -4, 1 -> 4, -7, 2; B's row 4, -2.5, 1 -> 7, -4, 2; stored as code + 8, 4 bits each, code j at
    # bit 4 j of one int32 word per rank (A^T's row: 6 codes, B's row: 4 codes; padding bits zero)
    assert q.lora_a.dtype == torch.int32 and q.lora_a.shape == (2, 1) and q.lora_b.shape == (2, 1)
    assert q.lora_a[0, 0].item() == 12 | 1 << 4 | 10 << 8 | 8 << 12 | 8 << 16 | 8 << 20
    assert q.lora_b[0, 0].item() == 15 | 4 << 4 | 10 << 8 | 8 << 12
    assert q.lora_a[1, 0].item() == 0x888888 and q.lora_a_scale[1] == 1  # an all-zero rank stays zero
    assert q.lora_a_scale[0].item() == pytest.approx(4 / 7) and q.lora_b_scale[0].item() == pytest.approx(4 / 7)
    fa, fb = q.low_rank_factors()
    torch.testing.assert_close(fa[:, 0] * 7 / 4, torch.tensor([4.0, -7, 2, 0, 0, 0]))
    torch.testing.assert_close(fb[0] * 7 / 4, torch.tensor([7.0, -4, 2, 0]))
    # per rank: one whole int32 word for A^T's row and one for B's (10 int4 codes, 24 padding bits) + two
    # float32 scales
    assert q.bits_per_weight() == pytest.approx((4 * 32 + 4 * 24 + 2 * (2 * 32 + 64)) / 24)
    assert "int4 factors" in repr(q)


def test_rounding_with_feedback_beats_rounding_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    hessian = x.T @ x
    w = torch.randn(6, 32, generator=g)
    scale = w.abs().amax(1, keepdim=True) / 7
    rounded = round_with_feedback(w, inverse_hessian_cholesky(hessian, 0.01), scale, 7)
    codes = rounded / scale
    torch.testing.assert_close(codes, codes.round())  # on the grid
    assert codes.abs().max() <= 7

    def error(v):
        return output_error(w - v, hessian)
    assert error(rounded) < 0.8 * error((w / scale).round() * scale)


def test_integer_factors_are_fitted_to_their_rounding():
    g = torch.Generator().manual_seed(0)
    error = torch.randn(48, 64, generator=g)  # [out, in]
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)  # uneven input scales
    hessian = x.T @ x
    a, b = split_factors(*whitened_svd(error.T, hessian), 8)
    fit_a, fit_b = fit_integer_factors(a, b, error, hessian, 4)
    stored_a, stored_b = round_factors(fit_a, fit_b, 4)  # A c and B / c, a balancing c per rank
    torch.testing.assert_close(stored_a @ stored_b, fit_a @ fit_b)  # storing keeps the fitted factors
    rounded_a, rounded_b = round_factors(a, b, 4)
    rounded = output_error(error - (rounded_a @ rounded_b).T, hessian)
    fitted = output_error(error - (fit_a @ fit_b).T, hessian)
    unrounded = output_error(error - (a @ b).T, hessian)
    assert unrounded < fitted < rounded - 0.15 * (rounded - unrounded)  # wins back 15% of what rounding lost (22% here)


def test_refinement_trains_integer_factors_as_they_are_stored():
    q = QuantLinear(64, 32, bits=2, group_size=32, rank=4, factor_bits=4)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4, generator=g).requires_grad_()
    b = torch.randn(4, 32, generator=g).requires_grad_()
    x = torch.randn(3, 64, generator=g)
    trained = lrec_refine._quantized_forward(q, (a, b), None)(x)
    trained.pow(2).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0  # straight through the rounding
    store_factors(q, a.detach(), b.detach())
    with torch.no_grad():
        torch.testing.assert_close(trained.detach(), q(x), rtol=0, atol=1e-5)
        assert not torch.allclose(trained, F.linear(x, q.weight_dequantized()) + x @ a @ b, atol=1e-3)


def test_long_steps_show_their_progress(llama_dir, corpus, monkeypatch):
    shown = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def set_postfix_str(self, text):
            shown.append(text)

        def set_description(self, text):
            pass

        def update(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr("compressor.engine.tqdm", Bar)
    passes = [{"rtn": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 4}}, {"lrec_refine": {"steps": 3}}]
    compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    assert "7/7 down_proj" in shown  # each linear of a linear pass
    assert any(text.startswith("step 3/3, loss ") for text in shown)  # each refinement step
