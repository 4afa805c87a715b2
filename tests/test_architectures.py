"""Families found, not listed: tiny random models of each, compressed by every pass kind, saved and reloaded."""

import pytest
import torch
import transformers as T
from conftest import COMMON, byte_tokenizer, recipe_dict

import compressor
from compressor.errors import CompressorError
from compressor.models import adapter_for
from compressor.nn import unfuse_experts

IDS = dict(pad_token_id=0, bos_token_id=256, eos_token_id=256)
MOE = dict(num_experts_per_tok=2, head_dim=16)
FAMILIES = {
    "llama": lambda: T.LlamaConfig(**COMMON, **IDS),
    "mistral": lambda: T.MistralConfig(**COMMON, **IDS),
    "qwen2": lambda: T.Qwen2Config(**COMMON, **IDS),
    "qwen3": lambda: T.Qwen3Config(**COMMON, **IDS, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**COMMON, **IDS, head_dim=16, sliding_window=8),
    "gemma3": lambda: T.Gemma3TextConfig(**COMMON, **IDS, head_dim=16, sliding_window=8),
    "phi3": lambda: T.Phi3Config(**COMMON, **IDS),
    "olmo2": lambda: T.Olmo2Config(**COMMON, **IDS),
    "granite": lambda: T.GraniteConfig(**COMMON, **IDS, embedding_multiplier=2.0, residual_multiplier=0.5),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, **IDS, **MOE, num_experts=4, moe_intermediate_size=32),
    "mixtral": lambda: T.MixtralConfig(**COMMON, **IDS, **MOE, num_local_experts=4),
}
PASSES = {
    "rtn": [{"rtn": {"bits": 4, "group_size": 32}}],
    "gptq": [{"gptq": {"bits": 4, "group_size": 32}}],
    "wanda": [{"wanda": {"sparsity": 0.5}}],
    "sparsegpt": [{"sparsegpt": {"pattern": "2:4"}}],
    "lrec": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 4}}],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param) / "model"
    T.AutoModelForCausalLM.from_config(FAMILIES[request.param]()).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", sorted(PASSES))
def test_every_family_compresses_saves_and_reloads_with_equal_logits(family_dir, method, corpus, tmp_path):
    out = tmp_path / "ckpt"
    model = compressor.compress(recipe_dict(family_dir, corpus, PASSES[method], out), progress=False)
    last = next(iter(PASSES[method][-1]))
    assert any(r["pass"] == last for rs in model.compression_config["modules"].values() for r in rs)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_discovered_adapter_finds_the_parts(family_dir):
    model = T.AutoModelForCausalLM.from_pretrained(family_dir)
    adapter = adapter_for(model)
    assert len(adapter.decoder_layers(model)) == COMMON["num_hidden_layers"]
    assert model.get_submodule(adapter.embeddings) is model.get_input_embeddings()
    assert model.get_submodule(adapter.head) is model.get_output_embeddings()
    assert adapter.final_norm is None or "norm" in type(model.get_submodule(adapter.final_norm)).__name__.lower()


def moe_dir(tmp_path, family: str):
    torch.manual_seed(0)
    path = tmp_path / family
    T.AutoModelForCausalLM.from_config(FAMILIES[family]()).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_what_the_fused_ones_do(family):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert unfuse_experts(model) == [f"model.layers.{i}.mlp.experts" for i in range(COMMON["num_hidden_layers"])]
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_each_expert_is_compressed_on_the_tokens_routed_to_it(corpus, tmp_path):
    model = compressor.compress(recipe_dict(moe_dir(tmp_path, "mixtral"), corpus, PASSES["gptq"]), progress=False)
    records = model.compression_config["modules"]
    assert records["model.layers.0.mlp.experts"][0] == {"pass": "unfuse_experts", "experts": 4,
                                                        "runtime": {"class": "UnfusedExperts"}}
    experts = [records[f"model.layers.0.mlp.experts.{e}.gate_up_proj"][0] for e in range(4)]
    total = 4 * 32  # the calibration windows' tokens; top-2 routing: each token goes to two of the four experts
    assert all(r["pass"] == "gptq" and 0 <= r["calibration_tokens"] < total for r in experts)
    assert sum(r["calibration_tokens"] for r in experts) == 2 * total
    assert "calibration_tokens" not in records["model.layers.0.self_attn.q_proj"][0]


def test_an_expert_with_too_few_tokens_gets_the_identity_statistic(corpus, tmp_path, monkeypatch):
    from compressor import engine

    monkeypatch.setattr(engine, "MIN_ROUTED_TOKENS", 10**9)
    path = moe_dir(tmp_path, "qwen3_moe")
    model = compressor.compress(recipe_dict(path, corpus, PASSES["wanda"]), progress=False)
    record = model.compression_config["modules"]["model.layers.1.mlp.experts.2.down_proj"][0]
    assert record["statistic"] == "identity (fewer than 1000000000 calibration tokens)"
    assert record["pass"] == "wanda" and record["calibration_tokens"] > 0


def test_experts_in_a_layout_that_is_not_split_are_reported_as_left_in_float():
    from compressor.engine import warn_fused_experts

    layer = torch.nn.Module()
    layer.experts = torch.nn.Module()
    layer.experts.weights = torch.nn.Parameter(torch.zeros(4, 8, 8))
    with pytest.warns(UserWarning, match=r"model.layers.0.experts \(Module\) hold the experts as fused 3-D tensors"):
        warn_fused_experts(layer, "model.layers.0")


def test_a_model_without_one_list_of_decoder_blocks_is_refused_with_what_was_found():
    model = T.AutoModelForCausalLM.from_config(FAMILIES["olmo2"]())
    model.config.num_hidden_layers = 5  # no list of 5 blocks
    with pytest.raises(CompressorError, match=r"cannot find the decoder layers of Olmo2ForCausalLM: expected one list "
                                              r"of 5 blocks .* found model.layers \(3 x Olmo2DecoderLayer\)"):
        adapter_for(model)


def test_next_norm_loss_is_refused_before_work_where_the_norms_are_not_known(corpus, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model"
    T.AutoModelForCausalLM.from_config(FAMILIES["olmo2"]()).save_pretrained(path)  # norms after each block only
    byte_tokenizer().save_pretrained(path)
    passes = [*PASSES["lrec"], {"lrec_refine": {"steps": 1, "loss": "next_norm"}}]
    with pytest.raises(CompressorError, match="loss next_norm needs the norm .* not known for olmo2 models"):
        compressor.compress(recipe_dict(path, corpus, passes), progress=False)


def test_decoder_layers_are_found_when_a_layer_has_as_many_experts():
    config = FAMILIES["mixtral"]()
    config.num_local_experts = config.num_hidden_layers  # a list of experts as long as the list of layers
    model = T.AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    assert adapter_for(model).layers == "model.layers"


def test_exports_refuse_a_mixture_of_experts_checkpoint(corpus, tmp_path):
    from compressor.export import export_compressed_tensors
    from compressor.export_gguf import export_gguf

    out = tmp_path / "ckpt"
    compressor.compress(recipe_dict(moe_dir(tmp_path, "qwen3_moe"), corpus, PASSES["rtn"], out), progress=False)
    with pytest.raises(CompressorError, match="mixture-of-experts model's experts as one linear each"):
        export_compressed_tensors(out, tmp_path / "ct")
    with pytest.raises(CompressorError, match="mixture-of-experts model's experts as one linear each"):
        export_gguf(out, tmp_path / "model.gguf")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "model.gguf").exists()


ROTATION_REFUSED = {"phi3": "Llama layout", "olmo2": "Llama layout", "qwen3_moe": "Llama layout",
                    "mixtral": "Llama layout"}  # fused q/k/v, norms after the blocks only, experts


def test_every_family_is_rotated_exactly_or_refused_with_the_reason(family_dir, corpus, request):
    family = request.node.callspec.params["family_dir"]
    recipe = recipe_dict(family_dir, corpus, [{"rotate": {}}])
    if family in ROTATION_REFUSED:
        with pytest.raises(CompressorError, match=ROTATION_REFUSED[family]):
            compressor.compress(recipe, progress=False)
        return
    dense = T.AutoModelForCausalLM.from_pretrained(family_dir)
    model = compressor.compress(recipe, progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
