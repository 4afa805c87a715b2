"""A streamed run (one decoder layer in memory at a time) writes the checkpoint that a run on the whole model does."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import CONFIGS, byte_tokenizer, recipe_dict
from test_architectures import moe_dir
from test_resume import assert_same_checkpoint, interrupted
from transformers import AutoModelForCausalLM

import compressor
from compressor import models
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.models.sources import load_pretrained
from compressor.models.streamed import open_streamed

RECIPES = {
    "rtn": [{"rtn": {"bits": 4, "group_size": 32}}],
    "gptq": [{"gptq": {"bits": 4, "group_size": 32}}],
    "wanda-2of4": [{"wanda": {"pattern": "2:4"}}],  # stored sparse, layer by layer
    "rotate-gptq": [{"rotate": {}}, {"gptq": {"bits": 4, "group_size": 32}}],  # rotates embeddings at the end
    "gptq-lrec-refine": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 4, "factor_bits": 8}},
                         {"lrec_refine": {"steps": 3, "reference": "model"}}],
}


def sharded_dir(tmp_path, arch: str):
    """A tiny model saved as save_pretrained saves large ones: bfloat16, in several shards with an index."""
    torch.manual_seed(0)
    path = tmp_path / arch
    AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: scaled embeddings, two rotary tables
def test_a_streamed_model_computes_what_the_loaded_one_does(arch, tmp_path):
    path = sharded_dir(tmp_path, arch)
    model, _ = load_pretrained(path, torch.float32)
    streamed, _, adapter, layers = open_streamed(path, torch.float32)
    assert all(p.is_meta for p in adapter.decoder_layers(streamed).parameters())
    for i in range(len(adapter.decoder_layers(streamed))):
        layers.load(i)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    layers.release(0)
    assert all(p.is_meta for p in adapter.decoder_layers(streamed)[0].parameters())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_streamed_run_writes_the_same_checkpoint(name, corpus, tmp_path):
    path = sharded_dir(tmp_path, "llama")
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    compressor.compress(recipe_dict(path, corpus, RECIPES[name], whole), progress=False)
    model = compressor.compress(recipe_dict(path, corpus, RECIPES[name], streamed), progress=False, stream=True)
    assert all(p.is_meta for p in model.model.layers.parameters())  # never held whole
    assert_same_checkpoint(whole, streamed)
    config_whole, config_streamed = (json.loads((p / "config.json").read_text()) for p in (whole, streamed))
    for config in (config_whole, config_streamed):
        config["compression_config"].pop("recipe")  # names the output folder
        config["compression_config"]["recipe_as_written"].pop("output")
    assert config_streamed == config_whole
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1  # one shard per decoder layer, one for the rest
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(streamed)(input_ids=ids).logits,
                                   compressor.load(whole)(input_ids=ids).logits, rtol=0, atol=0)


def test_a_streamed_run_resumes_to_the_same_checkpoint(corpus, tmp_path, monkeypatch):
    path = sharded_dir(tmp_path, "llama")
    passes = RECIPES["gptq-lrec-refine"]
    compressor.compress(recipe_dict(path, corpus, passes, tmp_path / "whole"), progress=False)
    with monkeypatch.context() as m:
        interrupted(m, after_layer=1)
        with pytest.raises(KeyboardInterrupt):
            compressor.compress(recipe_dict(path, corpus, passes, tmp_path / "resumed"), progress=False, stream=True)
    compressor.compress(recipe_dict(path, corpus, passes, tmp_path / "resumed"), progress=False, stream=True,
                        resume=True)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "resumed")


def test_streaming_refuses_what_it_cannot_do(corpus, tmp_path, monkeypatch):
    path = sharded_dir(tmp_path, "llama")
    with pytest.raises(CompressorError, match="writes each compressed layer to the recipe's `output`"):
        compressor.compress(recipe_dict(path, corpus, RECIPES["rtn"]), stream=True)
    with pytest.raises(CompressorError, match="is a hub id: download it first"):
        compressor.compress(recipe_dict("org/model", corpus, RECIPES["rtn"], tmp_path / "out"), stream=True)
    with pytest.raises(CompressorError, match="transformers converts this family's files while loading"):
        compressor.compress(recipe_dict(moe_dir(tmp_path, "mixtral"), corpus, RECIPES["rtn"], tmp_path / "out"),
                            stream=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(recipe_dict(path, corpus, RECIPES["rtn"], tmp_path / "out",
                                             evaluate={"perplexity": {"dataset": str(corpus), "seqlen": 32}})))
    result = CliRunner().invoke(main, ["run", str(recipe), "--stream"])
    assert result.exit_code == 2 and "add --no-eval" in result.output
    monkeypatch.setattr(models, "available_memory", lambda: 1000)  # a model larger than memory, not streamed
    result = CliRunner().invoke(main, ["run", str(recipe), "--no-eval"])
    assert result.exit_code == 2 and "run with --stream" in result.output
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_writing_the_checkpoint_leaves_nothing_and_resumes(corpus, tmp_path, monkeypatch):
    from compressor import checkpoint

    path = sharded_dir(tmp_path, "llama")
    recipe = recipe_dict(path, corpus, RECIPES["rtn"], tmp_path / "streamed")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", full)
        with pytest.raises(CompressorError, match=r"could not write .*streamed \(.*No space left on device\); nothing "
                                                  "was written there"):
            compressor.compress(recipe, progress=False, stream=True)
    assert not (tmp_path / "streamed").exists() and not list(tmp_path.glob(".streamed.tmp-*"))
    compressor.compress(recipe, progress=False, stream=True, resume=True)  # all layers kept: it only writes
    compressor.compress(recipe_dict(path, corpus, RECIPES["rtn"], tmp_path / "whole"), progress=False)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
