"""How a loaded checkpoint runs: quantized and pruned linears unpacked once by default, packed on request."""

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import recipe_dict

import compressor
from compressor.cli import main
from compressor.errors import CompressorWarning
from compressor.nn import PackedLinear, QuantLinear, SparseLinear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
RECIPES = {
    "rtn": [{"rtn": {"bits": 4, "group_size": 32}}],
    "wanda-2of4": [{"wanda": {"pattern": "2:4"}}],
    "magnitude-50": [{"magnitude": {"sparsity": 0.5}}],
    "gptq-lrec": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8, "factor_bits": 8}}],
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def checkpoints(llama_dir, corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    for name, passes in RECIPES.items():
        compressor.compress(recipe_dict(llama_dir, corpus, passes, folder / name), progress=False)
    return folder


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_unpacked_runs_what_packed_runs(name, checkpoints):
    packed = compressor.load(checkpoints / name, keep_packed=True)
    unpacked = compressor.load(checkpoints / name)
    modules = [m for m in unpacked.modules() if isinstance(m, PackedLinear)]
    assert modules and all(m.unpacked for m in modules)
    assert not any(m.unpacked for m in packed.modules() if isinstance(m, PackedLinear))
    if name == "gptq-lrec":  # the factors folded into the weight: the same to float rounding
        torch.testing.assert_close(logits(unpacked), logits(packed), rtol=1e-4, atol=1e-5)
    else:  # the same weight, rebuilt once instead of on every call
        torch.testing.assert_close(logits(unpacked), logits(packed), rtol=0, atol=0)


def test_the_unpacked_weight_is_not_saved_and_follows_the_module(checkpoints):
    model = compressor.load(checkpoints / "rtn")
    q = model.model.layers[0].mlp.up_proj
    assert isinstance(q, QuantLinear)
    assert not any("unpacked" in key for key in model.state_dict())
    assert q.__dict__["_unpacked_weight"].dtype == torch.float32
    before = logits(model)
    model.to(torch.float64)  # moved or cast: the kept weight is dropped, the next call builds it again
    assert "_unpacked_weight" not in q.__dict__
    after = logits(model)
    assert q.__dict__["_unpacked_weight"].dtype == torch.float64
    torch.testing.assert_close(after.float(), before, rtol=1e-5, atol=1e-5)


def test_sparse_linear_unpacks_too(checkpoints):
    model = compressor.load(checkpoints / "wanda-2of4")
    s = model.model.layers[1].self_attn.q_proj
    assert isinstance(s, SparseLinear) and s.unpacked
    torch.testing.assert_close(s.__dict__["_unpacked_weight"], s.weight_dense(), rtol=0, atol=0)


def test_keep_packed_on_a_checkpoint_with_nothing_packed_says_so_once(llama_dir, corpus, tmp_path):
    out = tmp_path / "lowrank"
    compressor.compress(recipe_dict(llama_dir, corpus, [{"lowrank": {"rank": 8, "method": "svd"}}], out),
                        progress=False)
    with pytest.warns(CompressorWarning, match="no packed weights"):
        compressor.load(out, keep_packed=True)


def test_unpacking_that_does_not_fit_names_the_packed_mode(checkpoints, monkeypatch):
    def no_memory(self, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(QuantLinear, "runtime_weight", no_memory)
    with pytest.raises(compressor.CompressorError, match="keep_packed=True"):
        compressor.load(checkpoints / "rtn")
    result = CliRunner().invoke(main, ["eval", str(checkpoints / "rtn"), "--windows", "1"])
    assert result.exit_code == 2 and "--keep-packed" in result.output and "Traceback" not in result.output
    compressor.load(checkpoints / "rtn", keep_packed=True)  # the packed mode needs no unpacked weight


def test_info_and_eval_report_memory(checkpoints, corpus):
    result = CliRunner().invoke(main, ["info", str(checkpoints / "rtn")])
    assert result.exit_code == 0, result.output
    assert "weights in memory when loaded:" in result.output and "with keep_packed" in result.output
    result = CliRunner().invoke(main, ["eval", str(checkpoints / "rtn"), "--windows", "1", "--seqlen", "64",
                                       "--dataset", str(corpus), "--keep-packed"])
    assert result.exit_code == 0, result.output
    assert "peak RSS" in result.output and "kept packed" in result.output and "weights on disk" in result.output


def test_memory_estimate_matches_the_loaded_model(checkpoints):
    from compressor.checkpoint import memory_bytes

    estimate = memory_bytes(checkpoints / "gptq-lrec")
    model = compressor.load(checkpoints / "gptq-lrec")
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    packed = sum(t.numel() * t.element_size() for t in tensors)
    kept = sum(m.__dict__["_unpacked_weight"].numel() * 4 for m in model.modules() if isinstance(m, PackedLinear))
    assert estimate == {"packed": packed, "unpacked": packed + kept}


def test_run_ends_by_saying_how_to_load_the_result(llama_dir, corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(llama_dir, corpus, RECIPES["rtn"], tmp_path / "out")))
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"compressor.load('{tmp_path / 'out'}')" in result.output
