import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_model_dir, recipe_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

import compressor
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.nn import QuantLinear, RMSNormOverWidth
from compressor.passes.slice import sliced_width

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_width_deletes_a_multiple_of_8():
    assert [sliced_width(576, f) for f in (0.1, 0.2, 0.25, 0.3)] == [520, 464, 432, 400]
    assert sliced_width(64, 0.01) == 64


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("slice_embeddings", [None, True])
def test_rotation_without_deleting_anything_keeps_the_logits(arch, slice_embeddings, corpus, tmp_path):
    """Folding the norms, rotating and the per-layer change of basis are exact; only deletion changes the model."""
    folder = make_model_dir(tmp_path / arch, arch)
    dense = logits(AutoModelForCausalLM.from_pretrained(folder))
    passes = [{"slice": {"fraction": 0.01, "slice_embeddings": slice_embeddings}}]  # 0.64 dims: rounds to none
    model = compressor.compress(recipe_dict(folder, corpus, passes), progress=False)
    # tiny llama ties its embeddings, which then stay unrotated, and a layer kept whole that reads them stays dense
    rotated = slice_embeddings or arch != "llama"
    assert isinstance(model.model.layers[0].input_layernorm, RMSNormOverWidth) == rotated
    torch.testing.assert_close(logits(model), dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slice_embeddings", [None, True])
def test_the_outputs_slice_hands_the_engine_are_the_sliced_layers_outputs(slice_embeddings, llama_dir, corpus):
    """Slice computes each layer's outputs in the new basis from its own forward pass, in place of the engine's
    forward of the sliced layer; the two must agree."""
    from compressor.engine import run_layer
    from compressor.passes.slice import Slice

    compared = []

    def checked(self, ctx, run):
        hidden, records, outputs = original(self, ctx, run)
        if outputs is not None:
            for h, out in zip(hidden, outputs, strict=True):
                torch.testing.assert_close(out, run_layer(ctx.layer, h, ctx.kwargs, ctx.device), atol=1e-5, rtol=1e-4)
            compared.append(ctx.index)
        return hidden, records, outputs

    original = Slice.apply_layer
    passes = [{"slice": {"fraction": 0.25, "slice_embeddings": slice_embeddings}}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Slice, "apply_layer", checked)
        compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)
    n_layers = AutoModelForCausalLM.from_pretrained(llama_dir).config.num_hidden_layers
    # the last layer's outputs are needed (and computed) only when the head is sliced too
    assert compared == list(range(n_layers if slice_embeddings else n_layers - 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sliced_checkpoint_reloads_with_its_new_shapes(arch, corpus, tmp_path):
    folder, out = make_model_dir(tmp_path / arch, arch), tmp_path / "sliced"
    model = compressor.compress(recipe_dict(folder, corpus, [{"slice": {"fraction": 0.25}}], out), progress=False)
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape == (64, 48) and layer.mlp.down_proj.weight.shape == (48, 128)
    assert layer.attn_shortcut.weight.shape == layer.mlp_shortcut.weight.shape == (48, 48)
    tied = arch == "llama"  # tiny llama ties its embeddings: they stay full width and tied
    assert model.model.embed_tokens.weight.shape == ((260, 64) if tied else (260, 48))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    last = model.model.layers[2]
    assert last.mlp.down_proj.weight.shape == ((64, 128) if tied else (48, 128))  # full-width head connection
    parameters = model.compression_config["parameters"]
    # a tiny model: the two 48 x 48 shortcuts per layer eat much of the saving
    assert parameters["compressed"]["parameters_without_embeddings"] < \
        0.95 * parameters["dense"]["parameters_without_embeddings"]
    torch.testing.assert_close(logits(compressor.load(out)), logits(model), rtol=0, atol=0)

    result = CliRunner().invoke(main, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "residual stream width per decoder layer: layers 0-2 48" in result.output  # where the MLP reads
    assert "parameters without embeddings and head" in result.output


def test_sliced_model_generates_the_same_with_and_without_the_kv_cache(llama_dir, corpus, recwarn):
    """The sliced layer forward hands the KV cache on to attention under the name transformers uses."""
    model = compressor.compress(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.25}}]), progress=False)
    with torch.no_grad():
        cached = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_layer_fractions_set_each_layers_width(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    passes = [{"slice": {"fraction": 0.25, "layer_fractions": {0: 0.0, "1": 0.5}}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    widths = [layer.mlp.gate_proj.in_features for layer in model.model.layers]
    assert widths == [64, 32, 48]
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    # layer 0, kept whole and reading the unrotated embeddings, stays the dense layer: no shortcut matrices
    assert not hasattr(model.model.layers[0], "attn_shortcut")
    for (name, p), (dense_name, dense_p) in zip(model.model.layers[0].named_parameters(),
                                                dense.model.layers[0].named_parameters(), strict=True):
        assert name == dense_name and torch.equal(p, dense_p), name
    torch.testing.assert_close(logits(compressor.load(out)), logits(model), rtol=0, atol=0)
    result = CliRunner().invoke(main, ["info", str(out)])
    assert "residual stream width per decoder layer: layer 0 64, layer 1 32, layer 2 48" in result.output, \
        result.output


def test_slicing_that_adds_parameters_warns(llama_dir, corpus):
    """Two k x k shortcut matrices per layer outweigh a small cut of a narrow model's linears."""
    with pytest.warns(UserWarning, match=r"3 of 3 decoder layers .* get more parameters than they lose: at width 56"):
        model = compressor.compress(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.1}}]), progress=False)
    parameters = model.compression_config["parameters"]
    assert parameters["compressed"]["parameters_without_embeddings"] > \
        parameters["dense"]["parameters_without_embeddings"]


def test_cli_prints_the_warning_as_one_line(llama_dir, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.1}}], tmp_path / "out")))
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "warning: slice: 3 of 3 decoder layers" in result.output
    assert "UserWarning: slice" not in result.output


def test_slicing_that_saves_parameters_does_not_warn(llama_dir, corpus, recwarn):
    compressor.compress(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.25}}]), progress=False)
    assert not [w for w in recwarn if "more parameters" in str(w.message)]


@pytest.mark.parametrize("layer_fractions, match", [({3: 0.1}, "model has 3 decoder layers"),
                                                    ({0: 1.0}, "fraction in"), ({"x": 0.1}, "mapping")])
def test_bad_layer_fractions_are_refused(layer_fractions, match, llama_dir, corpus, tmp_path):
    passes = [{"slice": {"fraction": 0.25, "layer_fractions": layer_fractions}}]
    with pytest.raises(CompressorError, match=match):
        compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_untying_slices_embeddings_and_head_separately(llama_dir, corpus):
    model = compressor.compress(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.25,
                                                                          "slice_embeddings": True}}]),
                                progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == model.model.embed_tokens.weight.shape == (260, 48)
    assert model.config.tie_word_embeddings is False
    assert model.compression_config["modules"]["lm_head"][-1]["untied"] is True


def test_a_residual_stream_in_a_subspace_is_sliced_exactly(llama_dir, corpus, tmp_path):
    """When every write to the residual stream lies in a 48-dim subspace, slicing to 48 dims along the
    principal axes loses nothing; deleting 16 dims of a random basis does."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    U = torch.linalg.qr(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ U @ U.T)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(U @ U.T @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(U @ U.T @ layer.mlp.down_proj.weight)
    folder = tmp_path / "subspace"
    model.save_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(llama_dir)(corpus.read_text()[:300], return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    recipe = recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.25}}])
    recipe["calibration"]["samples"] = 16
    sliced = compressor.compress(recipe, model=model, tokenizer=AutoTokenizer.from_pretrained(llama_dir),
                                 progress=False)
    with torch.no_grad():
        torch.testing.assert_close(sliced(input_ids=ids).logits, dense, atol=1e-4, rtol=1e-4)

    def random_axes(*args, **kwargs):
        return torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compressor.passes.slice, "principal_axes", random_axes)
        model = AutoModelForCausalLM.from_pretrained(folder)
        random = compressor.compress(recipe, model=model, tokenizer=AutoTokenizer.from_pretrained(llama_dir),
                                     progress=False)
    with torch.no_grad():
        assert (random(input_ids=ids).logits - dense).abs().max() > 0.01


def test_slice_then_gptq_quantizes_the_smaller_matrices(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    passes = [{"slice": {"fraction": 0.25}}, {"gptq": {"bits": 4, "group_size": 16}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
    q = model.model.layers[2].mlp.gate_proj
    assert isinstance(q, QuantLinear) and (q.in_features, q.out_features) == (48, 128)
    records = model.compression_config["modules"]["model.layers.2.mlp.gate_proj"]
    assert [r["pass"] for r in records] == ["slice", "gptq"]
    torch.testing.assert_close(logits(compressor.load(out)), logits(model), rtol=0, atol=0)


def test_gemma3_sandwich_norms_are_refused_with_the_reason(gemma_dir, corpus, tmp_path):
    with pytest.raises(CompressorError, match="normalise each attention output .* before adding it"):
        compressor.compress(recipe_dict(gemma_dir, corpus, [{"slice": {"fraction": 0.25}}], tmp_path / "out"),
                            progress=False)
    assert not (tmp_path / "out").exists()
