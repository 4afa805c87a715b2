import json
import re
import warnings

import pytest
import torch
from conftest import recipe_dict

import compressor
from compressor.errors import CompressorError, CompressorWarning


def test_saved_checkpoint_reloads_with_identical_logits_and_generates(model_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    recipe = recipe_dict(model_dir, corpus, [{"wanda": {"pattern": "2:4"}}], out)
    model = compressor.compress(recipe, progress=False)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = compressor.load(out)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        # min_new_tokens: a random model may pick its eos token, and on another CPU's float rounding it did
        generated = loaded.generate(ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


@pytest.mark.filterwarnings("ignore:the model is in bfloat16")  # on CPUs without bfloat16: tested below
def test_bfloat16_checkpoint_reloads_with_identical_logits(gemma_dir, corpus, tmp_path):
    """load builds the model in the recipe's dtype as transformers does, RoPE's inverse frequencies in float32."""
    out = tmp_path / "ckpt"
    recipe = recipe_dict(gemma_dir, corpus, [{"gptq": {"bits": 4, "group_size": 32}}], out, dtype="bfloat16")
    model = compressor.compress(recipe, progress=False)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(out)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_a_dtype_this_cpu_runs_slowly_is_warned_about(llama_dir, corpus, monkeypatch):
    from compressor import runtime

    assert runtime.matmul_slowdown(torch.float32, "cpu") == 1.0
    assert runtime.matmul_slowdown(torch.bfloat16, "cpu") > 0  # measured on this machine
    assert runtime.matmul_slowdown(torch.bfloat16, "cuda") == 1.0
    monkeypatch.setattr(runtime, "matmul_slowdown", lambda dtype, device: 90.0 if dtype == torch.bfloat16 else 1.0)
    recipe = recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 4, "group_size": 32}}], dtype="bfloat16")
    with pytest.warns(CompressorWarning, match="bfloat16 matmuls 90x slower than float32 ones"):
        compressor.compress(recipe, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressorWarning)
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 4, "group_size": 32}}]), progress=False)


def test_compression_config_records_recipe_modules_and_versions(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    compressor.compress(recipe_dict(llama_dir, corpus, [{"magnitude": {"sparsity": 0.25}}], out), progress=False)
    cc = json.loads((out / "config.json").read_text())["compression_config"]
    assert cc["recipe"]["passes"] == [{"magnitude": {"targets": ["Linear"], "ignore": [], "sparsity": 0.25,
                                                     "pattern": "unstructured"}}]
    assert cc["recipe"]["calibration"]["samples"] == 4
    assert len(cc["modules"]) == 21
    assert cc["modules"]["model.layers.0.mlp.down_proj"] == [{
        "pass": "magnitude", "pattern": "unstructured", "sparsity": 0.25,
        # 25% zeros in float32: a bitmask + 75% of the values is smaller than the dense weight
        "runtime": {"class": "SparseLinear", "pattern": "unstructured", "nnz": 64 * 128 * 3 // 4, "bias": False}}]
    assert {"compressor", "torch", "transformers"} <= set(cc["versions"])
    assert (out / "tokenizer.json").is_file()


def test_existing_output_is_refused_unless_overwrite(llama_dir, corpus, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = recipe_dict(llama_dir, corpus, [{"magnitude": {"sparsity": 0.5}}], out)
    with pytest.raises(CompressorError, match="already exists"):
        compressor.compress(recipe, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    compressor.compress(recipe, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_compress_in_memory_model(llama_dir, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    recipe = recipe_dict(llama_dir, corpus, [{"magnitude": {"pattern": "4:8"}}])
    out = compressor.compress(recipe, model=model, tokenizer=tokenizer, progress=False)
    assert out is model
    w = model.model.layers[2].self_attn.o_proj.weight_dense()
    assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) == 4).all()


def test_load_refuses_a_plain_model_folder(llama_dir):
    with pytest.raises(CompressorError, match="not a compressor checkpoint"):
        compressor.load(llama_dir)


def test_compressing_a_compressed_checkpoint_is_refused_with_its_source_and_passes(llama_dir, corpus, tmp_path):
    # loaded as a plain model, its packed linears would come back as random weights
    pruned = tmp_path / "pruned"
    compressor.compress(recipe_dict(llama_dir, corpus, [{"magnitude": {"pattern": "2:4"}}], pruned), progress=False)
    again = recipe_dict(pruned, corpus, [{"rtn": {"bits": 4, "group_size": 32}}], tmp_path / "q")
    expected = re.escape(f"compressor checkpoint (magnitude of {llama_dir})") + r".*passes: \[magnitude"
    with pytest.raises(CompressorError, match=expected):
        compressor.compress(again, progress=False)
    assert not (tmp_path / "q").exists()


def test_evaluate_reports_protocol_fields(llama_dir, corpus):
    report = compressor.evaluate(str(llama_dir), dataset=str(corpus), seqlen=64, windows=3, progress=False)
    assert report["windows"] == 3 and report["windows_in_split"] > 3
    assert report["tokens_predicted"] == 3 * 63
    assert 1 < report["ppl"] < 400  # a random byte-level model: about the vocabulary size
    assert report["bytes_on_disk"] > 0 and report["parameters"] > 0
