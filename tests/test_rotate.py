"""Rotations: the rotated float model computes what the original does, its checkpoint reloads, it composes with the
passes after it, and what it cannot rotate is refused with the reason."""

import pytest
import torch
from conftest import COMMON, byte_tokenizer, recipe_dict
from transformers import AutoModelForCausalLM, LlamaConfig, OlmoConfig

import compressor
from compressor.errors import CompressorError
from compressor.export import export_compressed_tensors
from compressor.formats import dequantize, pack
from compressor.models import load_model
from compressor.nn.hadamard import Hadamard
from compressor.passes.quantize import rtn


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("width", [64, 576, 1536, 640, 12])
def test_the_hadamard_transform_is_the_orthogonal_matrix_it_folds(width):
    rotation = Hadamard.random(width, torch.Generator().manual_seed(0))
    Q = rotation.matrix()
    torch.testing.assert_close(Q @ Q.T, torch.eye(width, dtype=torch.float64))
    x = torch.randn(3, width, dtype=torch.float64)
    torch.testing.assert_close(rotation(x.float()).double(), x @ Q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotation.inverse(x.float()).double(), x @ Q.T, rtol=1e-5, atol=1e-5)


def with_random_norms(model_dir, tmp_path):
    """The tiny model with norm scales that are not all one, so folding them matters."""
    model = load_model(str(model_dir)).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


@pytest.mark.parametrize("fold_norms", [None, True, False])  # None: the adapter's choice
def test_the_rotated_float_model_computes_the_same_logits(model_dir, fold_norms, corpus, tmp_path):
    """Every family the tests build: tied (llama) and untied heads, Gemma's norms on block outputs and 1 + w scales."""
    path, dense = with_random_norms(model_dir, tmp_path)
    model = compressor.compress(recipe_dict(path, corpus, [{"rotate": {"fold_norms": fold_norms}}]), progress=False)
    layer, dense_layer = model.model.layers[1], dense.model.layers[1]
    assert not torch.allclose(layer.self_attn.q_proj.weight, dense_layer.self_attn.q_proj.weight)
    assert type(layer.mlp.down_proj).__name__ == "RotatedInput"
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture", ["llama_dir", "gemma_dir"])
def test_rotate_then_gptq_and_lrec_saves_a_checkpoint_that_reloads(fixture, corpus, tmp_path, request):
    path = request.getfixturevalue(fixture)
    passes = [{"rotate": {"seed": 1}}, {"gptq": {"bits": 3, "group_size": 16}}, {"lrec": {"rank": 4}},
              {"lrec_refine": {"steps": 3}}]
    model = compressor.compress(recipe_dict(path, corpus, passes, tmp_path / "out"), progress=False)
    records = model.compression_config["modules"]
    down = "model.layers.1.mlp.down_proj"
    assert records[down][0]["runtime"]["class"] == "RotatedInput"
    assert [r["pass"] for r in records[f"{down}.linear"]][:2] == ["gptq", "lrec"]  # the linear inside the transform
    assert records["model.norm"][0]["runtime"]["class"] == "RotatedNorm"
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(logits(compressor.load(tmp_path / "out"), ids), logits(model, ids),
                               rtol=1e-5, atol=1e-5)


def test_rotate_then_sparsegpt_prunes_the_rotated_weights_and_reloads(llama_dir, corpus, tmp_path):
    """Pruning after a rotation: the linear inside the online transform is pruned like the others (2:4), and the
    checkpoint rebuilds both."""
    passes = [{"rotate": {}}, {"sparsegpt": {"pattern": "2:4"}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "out"), progress=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "RotatedInput"
    records = model.compression_config["modules"]["model.layers.0.mlp.down_proj.linear"]
    assert [r["pass"] for r in records] == ["sparsegpt"] and records[0]["sparsity"] == 0.5
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(logits(compressor.load(tmp_path / "out"), ids), logits(model, ids),
                               rtol=1e-5, atol=1e-5)


def test_the_rotation_lowers_the_rounding_error_of_weights_with_outliers():
    """Heavy-tailed weights (Student t, 3 degrees of freedom, as trained weights have a few large entries) round with
    less error on a W3 g64 grid once rotated: ||RTN(W Q) Q^T - W|| < ||RTN(W) - W||."""
    torch.manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((256, 512))
    generator = torch.Generator().manual_seed(0)
    Q = Hadamard.random(512, generator).matrix().float()

    def rounding_error(weight: torch.Tensor) -> torch.Tensor:
        codes, scales, zeros = rtn(weight, 3, 64, symmetric=True)
        return dequantize(pack(codes, 3), scales, zeros, 3, 64, weight.shape[1]) - weight

    plain, rotated = rounding_error(W).norm(), rounding_error(W @ Q).norm()
    assert rotated < 0.8 * plain, (rotated, plain)


@pytest.mark.parametrize("passes, match", [
    ([{"gptq": {"bits": 4}}, {"rotate": {}}], "rotate must come first"),
    ([{"rotate": {}}, {"slice": {"fraction": 0.2}}], "residual: false"),
    ([{"rotate": {}}, {"awq": {}}, {"gptq": {"bits": 4}}], "use one of awq and rotate"),
    ([{"rotate": {"residual": False, "heads": False, "online": False}}], "nothing to rotate"),
    ([{"rotate": {"targets": ["re:.*q_proj"]}}], "takes no targets"),
])
def test_recipes_rotate_cannot_run_are_refused_before_any_work(passes, match, llama_dir, corpus):
    with pytest.raises(CompressorError, match=match):
        compressor.compress(recipe_dict(llama_dir, corpus, passes), progress=False)


def test_a_model_with_layer_norms_keeps_its_residual_stream_and_rotates_the_rest(corpus, tmp_path):
    """OLMo's LayerNorms subtract the mean, which a rotation does not preserve: residual rotation is refused with the
    reason; the head and online rotations, which do not touch the stream, still apply exactly."""
    torch.manual_seed(0)
    config = OlmoConfig(**COMMON, pad_token_id=0, bos_token_id=256, eos_token_id=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "olmo")
    byte_tokenizer().save_pretrained(tmp_path / "olmo")
    with pytest.raises(CompressorError, match="not an RMS norm"):
        compressor.compress(recipe_dict(tmp_path / "olmo", corpus, [{"rotate": {}}]), progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "olmo")
    model = compressor.compress(recipe_dict(tmp_path / "olmo", corpus, [{"rotate": {"residual": False}}]),
                                progress=False)
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_rotated_checkpoints_are_not_exported(llama_dir, corpus, tmp_path):
    compressor.compress(recipe_dict(llama_dir, corpus, [{"rotate": {}}, {"rtn": {"bits": 4, "group_size": 32}}],
                                    tmp_path / "ckpt"), progress=False)
    with pytest.raises(CompressorError, match="Hadamard"):
        export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    recipe = recipe_dict(llama_dir, corpus, [{"rotate": {}}, {"rtn": {"bits": 4, "group_size": 32}}],
                         tmp_path / "ckpt2", export={"format": "compressed-tensors", "output": str(tmp_path / "ct")})
    with pytest.raises(CompressorError, match="leave `rotate` out"):
        compressor.compress(recipe, progress=False)
    assert not (tmp_path / "ckpt2").exists()


def test_a_width_the_transform_cannot_mix_is_refused(corpus, tmp_path):
    """An intermediate width of 8 x 13 = 104: blocks of 8 coordinates spread nothing; refused, with the way out."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "intermediate_size": 104}, pad_token_id=0, bos_token_id=256, eos_token_id=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    with pytest.raises(CompressorError, match="down_proj's input is 104"):
        compressor.compress(recipe_dict(tmp_path / "model", corpus, [{"rotate": {}}]), progress=False)
    compressor.compress(recipe_dict(tmp_path / "model", corpus, [{"rotate": {"online": False}}]), progress=False)
