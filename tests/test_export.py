"""compress export --format compressed-tensors: checked with the compressed-tensors library's own decompressor
and with transformers' loader, against the weights and logits of compressor.load."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_model_dir, recipe_dict
from safetensors.torch import load_file

import compressor
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.export import export_compressed_tensors
from compressor.nn import QuantLinear

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
RECIPES = {
    "gptq-w4g32": [{"gptq": {"bits": 4, "group_size": 32}}],
    "rtn-w4g32-asym": [{"rtn": {"bits": 4, "group_size": 32, "symmetric": False}}],
    "rtn-w8-channel-asym": [{"rtn": {"bits": 8, "group_size": None, "symmetric": False}}],
}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def family_dir(request, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_library_decompresses_the_weights_compressor_computes_with(recipe, family_dir, corpus, tmp_path):
    compressor.compress(recipe_dict(family_dir, corpus, RECIPES[recipe], tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = load_file(out / "model.safetensors")
    model = compressor.load(tmp_path / "ckpt")
    checked = 0
    for scheme in config.config_groups.values():
        for name in scheme.targets:
            local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
            weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            q = model.get_submodule(name)
            assert isinstance(q, QuantLinear)
            torch.testing.assert_close(weight, q.runtime_weight(torch.float32), rtol=0, atol=0)
            checked += 1
    assert checked == 7 * 3


def test_transformers_loads_the_export_with_the_same_logits(family_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    compressor.compress(recipe_dict(family_dir, corpus, RECIPES["rtn-w4g32-asym"], tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
        ours = compressor.load(tmp_path / "ckpt")(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_what_vllm_cannot_run_is_refused_or_written_dense(llama_dir, corpus, tmp_path):
    passes = [{"wanda": {"pattern": "2:4", "targets": ["re:.*mlp.*"]}},
              {"rtn": {"bits": 2, "group_size": 32, "targets": ["re:.*self_attn.*"]}}]
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "ckpt"), progress=False)
    with pytest.raises(CompressorError, match="cannot be exported .* --dense-fallback"):
        export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(CompressorError, match="nothing to export"):  # dense fallback of everything: no point
        export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct", dense_fallback=True)


def test_dense_fallback_writes_the_weights_compressor_computes_with(llama_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    passes = [{"wanda": {"pattern": "2:4", "targets": ["re:.*mlp.*"]}},
              {"rtn": {"bits": 4, "group_size": 32, "targets": ["re:.*self_attn.*"]}}]
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct", dense_fallback=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in config["ignore"]  # the pruned linears, written dense
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
        ours = compressor.load(tmp_path / "ckpt")(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_command_and_its_errors(llama_dir, corpus, tmp_path):
    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES["gptq-w4g32"], tmp_path / "ckpt"), progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path / "ckpt"), str(tmp_path / "ct"),
                                  "--format", "compressed-tensors", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "bfloat16"
    result = runner.invoke(main, ["export", str(tmp_path / "ckpt"), str(tmp_path / "ct"), "--format",
                                  "compressed-tensors"])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(main, ["export", str(llama_dir), str(tmp_path / "x"), "--format", "compressed-tensors"])
    assert result.exit_code == 2 and "not a compressor checkpoint" in result.output
    sliced = tmp_path / "sliced"
    compressor.compress(recipe_dict(llama_dir, corpus, [{"slice": {"fraction": 0.25}},
                                                        {"rtn": {"bits": 4, "group_size": 16}}], sliced),
                        progress=False)
    result = runner.invoke(main, ["export", str(sliced), str(tmp_path / "y"), "--format", "compressed-tensors"])
    assert result.exit_code == 2 and "sliced" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lrec_factors_become_a_lora_adapter_that_peft_applies(llama_dir, corpus, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    passes = [{"rtn": {"bits": 4, "group_size": 32}}, {"lrec": {"extra_bits": 1.0, "factor_bits": 8}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "ckpt"), progress=False)
    ranks = {r[-1]["rank"] for r in model.compression_config["modules"].values()}
    assert len(ranks) > 1  # padded to one rank in the adapter
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    adapter = json.loads((out / "lrec-adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == max(ranks)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(out)
        base(input_ids=IDS[:, :1])  # transformers decompresses the weights at the first forward; peft needs them
        corrected = peft.PeftModel.from_pretrained(base, out / "lrec-adapter")(input_ids=IDS).logits
        ours = compressor.load(tmp_path / "ckpt", keep_packed=True)(input_ids=IDS).logits
    torch.testing.assert_close(corrected, ours, rtol=1e-4, atol=1e-4)


def test_eval_and_load_read_a_compressed_tensors_folder(llama_dir, corpus, tmp_path, monkeypatch):
    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES["rtn-w4g32-asym"], tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    theirs, ours = (compressor.evaluate(str(path), dataset=str(corpus), seqlen=64, windows=2, progress=False)
                    for path in (out, tmp_path / "ckpt"))
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)
    from compressor.models import sources

    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "compressed_tensors" else real(name, *a))
    result = CliRunner().invoke(main, ["eval", str(out), "--windows", "1"])
    assert result.exit_code == 2 and "pip install compressed-tensors" in result.output


def test_a_recipe_can_ask_for_the_export(llama_dir, corpus, tmp_path):
    passes = RECIPES["gptq-w4g32"]
    export = {"format": "compressed-tensors", "output": str(tmp_path / "ct")}
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "ckpt", export=export), progress=False)
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ct" / "model.safetensors").is_file()
    refused = {  # before any work starts: nothing written
        "2-bit": ([{"rtn": {"bits": 2}}], export, "2 bits"),
        "pruned only": ([{"magnitude": {"sparsity": 0.5}}], export, "dense_fallback: true"),
        "sliced": ([{"slice": {"fraction": 0.25}}, *passes], {**export, "dense_fallback": True}, "sliced"),
        "no checkpoint": (passes, export, "give the recipe an `output`"),
    }
    for name, (passes, spec, message) in refused.items():
        output = None if name == "no checkpoint" else tmp_path / name
        spec = {**spec, "output": str(tmp_path / f"{name}-ct")}
        with pytest.raises(CompressorError, match=message):
            compressor.compress(recipe_dict(llama_dir, corpus, passes, output, export=spec), progress=False)
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}-ct").exists()


def test_the_int8_activation_variant_holds_the_same_weights(llama_dir, corpus, tmp_path):
    from compressed_tensors.compressors import IntQuantizationCompressor

    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES["gptq-w4g32"], tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct", int8_activations=True)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert config.format == "int-quantized"
    tensors = load_file(out / "model.safetensors")
    model = compressor.load(tmp_path / "ckpt")
    for scheme in config.config_groups.values():
        assert scheme.input_activations.num_bits == 8 and scheme.input_activations.dynamic
        for name in scheme.targets:
            local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
            weight = IntQuantizationCompressor.decompress(local, scheme)["weight"]
            torch.testing.assert_close(weight, model.get_submodule(name).runtime_weight(torch.float32), rtol=0, atol=0)
    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES["rtn-w4g32-asym"], tmp_path / "asym"), progress=False)
    with pytest.raises(CompressorError, match="asymmetric codes"):
        export_compressed_tensors(tmp_path / "asym", tmp_path / "ct2", int8_activations=True)


def test_dense_fallback_multiplies_out_quantized_low_rank_factors(llama_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    passes = [{"lowrank": {"rank": 8, "method": "svd", "targets": ["re:.*mlp.*"]}},
              {"rtn": {"bits": 4, "group_size": 8}}]
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "ckpt"), progress=False)
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct", dense_fallback=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in config["ignore"]
    assert not any(t.startswith("model.layers.0.mlp.") for g in config["config_groups"].values() for t in g["targets"])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
        ours = compressor.load(tmp_path / "ckpt")(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
