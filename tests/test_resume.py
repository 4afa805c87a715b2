"""A run interrupted after a decoder layer resumes from the layers it finished and writes the same checkpoint."""

import json

import pytest
import torch
from conftest import recipe_dict
from safetensors.torch import load_file
from test_architectures import moe_dir

import compressor
from compressor.errors import CompressorError
from compressor.resume import Progress

RECIPES = {
    "gptq-lrec-refine": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 4, "factor_bits": 8}},
                         {"lrec_refine": {"steps": 3, "reference": "model"}}],  # carries the dense hidden states
    "slice": [{"slice": {"fraction": 0.25}}],  # carries the basis
    "slice-embeddings": [{"slice": {"fraction": 0.25, "slice_embeddings": True}}],  # embeddings sliced at the end
    "rotate-gptq": [{"rotate": {}}, {"gptq": {"bits": 4, "group_size": 32}}],  # rotates embeddings at the end
}


def interrupted(monkeypatch, after_layer: int):
    """Make the next run stop (as Ctrl-C would) right after it has kept layer `after_layer`."""
    keep = Progress.save_layer

    def save_then_stop(self, index, *args):
        keep(self, index, *args)
        if index == after_layer:
            raise KeyboardInterrupt
    monkeypatch.setattr(Progress, "save_layer", save_then_stop)


def checkpoint_state(path) -> tuple[dict, dict]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors, json.loads((path / "config.json").read_text())["compression_config"]["modules"]


def assert_same_checkpoint(a, b):
    (ta, ra), (tb, rb) = checkpoint_state(a), checkpoint_state(b)
    assert ra == rb
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_run_stopped_after_a_layer_resumes_to_the_same_checkpoint(name, llama_dir, corpus, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES[name], whole), progress=False)
    assert not (tmp_path / ".whole.partial").exists()  # removed once the checkpoint is saved
    with monkeypatch.context() as m:
        interrupted(m, after_layer=0)
        with pytest.raises(KeyboardInterrupt):
            compressor.compress(recipe_dict(llama_dir, corpus, RECIPES[name], resumed), progress=False)
    assert json.loads((tmp_path / ".resumed.partial" / "progress.json").read_text())["layers_done"] == 1
    assert not resumed.exists()  # nothing half-written is taken for a checkpoint
    compressor.compress(recipe_dict(llama_dir, corpus, RECIPES[name], resumed), progress=False, resume=True)
    assert_same_checkpoint(whole, resumed)
    assert not (tmp_path / ".resumed.partial").exists()


def test_a_mixture_of_experts_run_resumes_to_the_same_checkpoint(corpus, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    model = moe_dir(tmp_path, "mixtral")
    passes = [{"gptq": {"bits": 4, "group_size": 32}}]
    compressor.compress(recipe_dict(model, corpus, passes, tmp_path / "whole"), progress=False)
    with monkeypatch.context() as m:
        interrupted(m, after_layer=1)
        with pytest.raises(KeyboardInterrupt):
            compressor.compress(recipe_dict(model, corpus, passes, tmp_path / "resumed"), progress=False)
    kept = []
    keep = Progress.save_layer
    monkeypatch.setattr(Progress, "save_layer", lambda self, i, *args: kept.append(i) or keep(self, i, *args))
    compressor.compress(recipe_dict(model, corpus, passes, tmp_path / "resumed"), progress=False, resume=True)
    assert kept == [2]  # layers 0 and 1 came from disk
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "resumed")


def test_resume_refuses_another_recipe_and_a_missing_run(llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with pytest.raises(CompressorError, match="no interrupted run of this output to resume"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 4}}], out), progress=False,
                            resume=True)
    with monkeypatch.context() as m:
        interrupted(m, after_layer=0)
        with pytest.raises(KeyboardInterrupt):
            compressor.compress(recipe_dict(llama_dir, corpus, [{"gptq": {"bits": 4}}], out), progress=False)
    with pytest.raises(CompressorError, match="made with another passes; run with --overwrite instead of --resume"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"gptq": {"bits": 3}}], out), progress=False,
                            resume=True)
    with pytest.raises(CompressorError, match=r"an interrupted run of this output is kept in .*\.ckpt\.partial: "
                                              r"--resume goes on from it, --overwrite starts over"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"gptq": {"bits": 3}}], out), progress=False)
    compressor.compress(recipe_dict(llama_dir, corpus, [{"gptq": {"bits": 3}}], out), progress=False, overwrite=True)
    assert out.is_dir() and not (tmp_path / ".ckpt.partial").exists()


def test_resume_needs_an_output(llama_dir, corpus):
    with pytest.raises(CompressorError, match="resume needs the recipe's `output`"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"bits": 4}}]), progress=False, resume=True)



def test_a_run_killed_with_sigkill_resumes_to_the_same_checkpoint(llama_dir, corpus, tmp_path):
    """A real SIGKILL (no Python cleanup runs) while the run sits after its first layer."""
    import signal
    import subprocess
    import sys

    torch.set_num_threads(1)
    passes = [{"gptq": {"bits": 4, "group_size": 32}}, {"lrec": {"rank": 4}}]
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "whole"), progress=False)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(recipe_dict(llama_dir, corpus, passes, tmp_path / "killed")))
    script = ("import json, sys, time, torch, compressor\n"
              "from compressor.resume import Progress\n"
              "torch.set_num_threads(1)\n"
              "keep = Progress.save_layer\n"
              "def slow(self, i, *args):\n"
              "    keep(self, i, *args)\n"
              "    if i == 0:\n"
              "        print('kept', flush=True)\n"
              "        time.sleep(120)\n"
              "Progress.save_layer = slow\n"
              f"compressor.compress(json.loads(open({str(recipe)!r}).read()), progress=False)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "kept"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    compressor.compress(json.loads(recipe.read_text()), progress=False, resume=True)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "killed")


def test_a_full_disk_stops_the_run_with_a_message_and_keeps_the_finished_layers(llama_dir, corpus, tmp_path,
                                                                                 monkeypatch):
    from compressor import resume

    passes = [{"gptq": {"bits": 4, "group_size": 32}}]
    write = resume.save_file

    def full_at_layer_1(tensors, path):
        if "layer-1" in str(path):
            raise OSError(28, "No space left on device")
        write(tensors, path)
    with monkeypatch.context() as m:
        m.setattr(resume, "save_file", full_at_layer_1)
        with pytest.raises(CompressorError, match=r"could not keep decoder layer 1 .*No space left on device.*the "
                                                  r"layers before it are kept: free space and run again with --resume"):
            compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "resumed"), progress=False)
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "resumed"), progress=False, resume=True)
    compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "whole"), progress=False)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "resumed")
