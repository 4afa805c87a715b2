"""AWQ: the scales fold into the model without changing what it computes, and never make the rounded blocks worse
on the tokens searched."""

import pytest
import torch
from conftest import recipe_dict

import compressor
from compressor.errors import CompressorError
from compressor.models import load_model


@pytest.mark.parametrize("fixture", ["llama_dir", "gemma_dir"])  # gemma: norms scale by 1 + w
def test_the_folded_scales_leave_the_float_model_unchanged(fixture, corpus, request):
    path = request.getfixturevalue(fixture)
    dense = load_model(str(path)).model
    model = compressor.compress(recipe_dict(path, corpus, [{"awq": {"bits": 3, "group_size": 32}}]), progress=False)
    records = model.compression_config["modules"]
    assert any(r[0].get("ratio") is not None for r in records.values())  # some scales were folded in
    changed = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(changed, dense.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_search_never_rounds_worse_than_no_scaling_and_the_checkpoint_reloads(llama_dir, corpus, tmp_path):
    passes = [{"awq": {"bits": 3, "group_size": 32}}, {"gptq": {"bits": 3, "group_size": 32}}]
    model = compressor.compress(recipe_dict(llama_dir, corpus, passes, tmp_path / "out"), progress=False)
    records = model.compression_config["modules"]
    awq = {name: r[0] for name, r in records.items() if r[0]["pass"] == "awq"}
    assert len(awq) == 3 * 8  # per layer: norm -> q/k/v, norm -> gate/up, up -> down
    assert awq["model.layers.0.mlp.up_proj"]["output_divided_for"] == "mlp.down_proj"  # and its inputs scaled
    assert all(r["loss"] <= r["loss_unscaled"] for r in awq.values() if "loss" in r)
    assert records["model.layers.1.mlp.down_proj"][1]["pass"] == "gptq"
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(tmp_path / "out")(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_awq_refuses_bad_settings(llama_dir, corpus):
    with pytest.raises(CompressorError, match="bits"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"awq": {"bits": 5}}]))
    with pytest.raises(CompressorError, match="grid_points"):
        compressor.compress(recipe_dict(llama_dir, corpus, [{"awq": {"grid_points": 1}}]))
