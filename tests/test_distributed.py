"""Calibration across two CPU processes (torchrun, gloo): the checkpoint process 0 writes against one process's."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import recipe_dict
from safetensors.torch import load_file

import compressor
from compressor.cli import main


def two_processes(recipe: dict, tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(path), "--nproc", "2", "--threads", "1", "--no-eval"])
    assert result.exit_code == 0, result.output


def tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(path.glob("*.safetensors")) for k, v in load_file(shard).items()}


def records(path) -> dict:
    return json.loads((path / "config.json").read_text())["compression_config"]["modules"]


def test_rtn_across_two_processes_is_bit_identical(llama_dir, corpus, tmp_path):
    passes = [{"rtn": {"bits": 4, "group_size": 32}}]
    two_processes(recipe_dict(llama_dir, corpus, passes, tmp_path / "two"), tmp_path)
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "one"), progress=False)
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert records(tmp_path / "one") == records(tmp_path / "two")


def test_gptq_across_two_processes_sums_the_hessians(llama_dir, corpus, tmp_path):
    """The two processes add the windows' Hessians in another order: equal to float rounding, so a code at a
    near-tie may round the other way; the weights and the logits agree to that."""
    passes = [{"gptq": {"bits": 4, "group_size": 32}}]
    two_processes(recipe_dict(llama_dir, corpus, passes, tmp_path / "two"), tmp_path)
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "one"), progress=False)
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    codes = [k for k in one if k.endswith("qweight")]
    differing = sum((one[k] != two[k]).sum().item() for k in codes) / sum(one[k].numel() for k in codes)
    assert differing < 0.01
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(tmp_path / "two")(input_ids=ids).logits,
                                   compressor.load(tmp_path / "one")(input_ids=ids).logits, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("passes, message", [
    ([{"gptq": {"bits": 2}}, {"lrec": {"rank": 4}}, {"lrec_refine": {"steps": 2}}], "lrec_refine run in one process"),
    ([{"slice": {"fraction": 0.2}}], "slice run in one process"),
])
def test_whole_layer_passes_are_refused_across_processes(passes, message, llama_dir, corpus, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(llama_dir, corpus, passes, tmp_path / "out")))
    result = CliRunner().invoke(main, ["run", str(path), "--nproc", "2", "--no-eval"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
