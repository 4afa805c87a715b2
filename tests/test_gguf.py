"""GGUF block grids and the GGUF export, checked with the `gguf` package's own dequantizers."""

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import COMMON, recipe_dict
from transformers import AutoModelForCausalLM, LlamaConfig

import compressor
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.export_gguf import check_exportable, export_gguf
from compressor.gguf_blocks import BLOCK_TYPES, BlockGrid, decode, encode, weight
from compressor.models.sources import bundled_gguf
from compressor.nn import GGUFLinear
from compressor.passes.gguf_grid import tensor_type
from compressor.recipe import load_recipe


def random_grid(name: str, rows: int, blocks: int, g: torch.Generator) -> tuple[BlockGrid, torch.Tensor]:
    t = BLOCK_TYPES[name]
    ns = t.block // t.sub
    lo, hi = t.scale_range if t.scales else (1, 1)
    grid = BlockGrid(
        torch.randn(rows, blocks, generator=g).half() * 0.01,
        torch.rand(rows, blocks, generator=g).half() * 0.01 if t.affine else torch.zeros(rows, blocks).half(),
        torch.randint(lo, hi + 1, (rows, blocks, ns), generator=g),
        torch.randint(0, 2**t.scale_bits, (rows, blocks, ns), generator=g) if t.mins else
        torch.zeros(rows, blocks, ns, dtype=torch.int64))
    return grid, torch.randint(t.lo, t.hi + 1, (rows, blocks * t.block), generator=g)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_blocks_decode_with_the_gguf_package_to_our_weights(name):
    t = BLOCK_TYPES[name]
    grid, codes = random_grid(name, 3, 2, torch.Generator().manual_seed(0))
    data = encode(t, grid, codes)
    assert data.shape == (3, 2 * t.type_size)
    theirs = gguf.quants.dequantize(data.numpy(), t.ggml_type).reshape(3, -1)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(theirs)), weight(t, grid, codes))
    back, back_codes = decode(t, data)
    assert torch.equal(back_codes, codes) and torch.equal(back.sc, grid.sc) and torch.equal(back.mn, grid.mn)


def test_llama_file_types_choose_per_tensor_and_fall_back_on_width():
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    name = "model.layers.{}.{}"
    assert tensor_type("llama:Q4_K_M", name.format(0, "mlp.down_proj"), 1536, config).name == "Q6_K"
    assert tensor_type("llama:Q4_K_M", name.format(4, "mlp.down_proj"), 1536, config).name == "Q4_K"
    assert tensor_type("llama:Q4_K_M", name.format(4, "mlp.up_proj"), 576, config).name == "Q5_0"  # 576 % 256
    assert tensor_type("llama:Q2_K", name.format(4, "self_attn.v_proj"), 512, config).name == "Q3_K"  # 3 kv groups
    assert tensor_type("Q4_0", name.format(4, "mlp.up_proj"), 48, config) is None  # no block fits: stays float


def test_bad_gguf_types_are_refused_with_the_choices():
    with pytest.raises(CompressorError, match="Q4_K"):
        load_recipe({"model": "x", "passes": [{"gptq": {"gguf": "Q4_X"}}], "output": "o"})


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny llama whose widths K-quants take (256, 512)."""
    from conftest import byte_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "model"
    AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512})
                                     ).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("spec", ["Q4_K", "Q2_K", "Q6_K", "llama:Q3_K_M"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gguf_grids_reload_to_the_weights_the_pass_measured(spec, method, wide_llama, corpus, tmp_path):
    compressor.compress(recipe_dict(wide_llama, corpus, [{method: {"gguf": spec}}], tmp_path / "ckpt"),
                        progress=False)
    model = compressor.load(tmp_path / "ckpt", keep_packed=True)
    linears = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == 7 * 3
    records = model.compression_config["modules"]
    for name, records_of in records.items():
        module = model.get_submodule(name)
        assert records_of[-1]["gguf_type"] == module.block_type.name
        assert records_of[-1]["relative_weight_error"] < 0.5


def test_gptq_on_the_grid_has_less_output_error_than_rtn(wide_llama, corpus, tmp_path):
    from compressor.passes.quantize import gptq_blocks, rtn_blocks

    torch.manual_seed(0)
    x = torch.randn(512, 256) @ torch.randn(256, 256)  # correlated inputs
    w = torch.randn(64, 256) * 0.02
    H = x.T @ x
    t = BLOCK_TYPES["Q4_K"]
    errors = {}
    for method, (grid, codes) in {"rtn": rtn_blocks(t, w, None),
                                  "gptq": gptq_blocks(t, w, H, 0.01, 128, True, None)}.items():
        errors[method] = ((x @ (weight(t, grid, codes) - w).T) ** 2).sum().item()
    assert errors["gptq"] < 0.8 * errors["rtn"]


@pytest.fixture(scope="module")
def smollm2_q4_k_m(tmp_path_factory):
    """SmolLM2 (from its GGUF) with RTN on llama.cpp's Q4_K_M choice of types, no evaluation."""
    path = tmp_path_factory.mktemp("smollm2") / "ckpt"
    compressor.compress({"model": "bundled:smollm2-135m", "passes": [{"rtn": {"gguf": "llama:Q4_K_M"}}],
                         "output": str(path), "evaluate": None}, progress=False)
    return path


@pytest.mark.slow
def test_the_exported_blocks_are_the_checkpoints_bit_for_bit(smollm2_q4_k_m, tmp_path):
    out = export_gguf(smollm2_q4_k_m, tmp_path / "model.gguf", embedding_type="F32")
    model = compressor.load(smollm2_q4_k_m, keep_packed=True)
    reader = gguf.GGUFReader(out)
    source = gguf.GGUFReader(bundled_gguf("smollm2-135m"))
    assert [t.name for t in reader.tensors] == [t.name for t in source.tensors]
    assert reader.fields["tokenizer.ggml.tokens"].contents() == source.fields["tokenizer.ggml.tokens"].contents()
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": 9, "attn_k": 3}
    for i in range(model.config.num_hidden_layers):
        for gguf_name, hf_name in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                   ("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj")):
            tensor = tensors[f"blk.{i}.{gguf_name}.weight"]
            ours = model.get_submodule(f"model.layers.{i}.{hf_name}").runtime_weight(torch.float32)
            theirs = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
            if gguf_name in heads:  # llama.cpp's rotary row order: undo it
                n = heads[gguf_name]
                theirs = theirs.reshape(n, -1, 2, theirs.shape[1]).transpose(1, 2).reshape(theirs.shape)
            assert torch.equal(theirs, ours), f"blk.{i}.{gguf_name}"
    norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
    assert torch.equal(norm, model.model.layers[0].input_layernorm.weight.detach())


@pytest.mark.slow
def test_export_refuses_what_gguf_cannot_hold_and_writes_nothing(smollm2_q4_k_m, llama_dir, corpus, tmp_path):
    runner = CliRunner()
    existing = tmp_path / "there.gguf"
    existing.write_text("keep")
    result = runner.invoke(main, ["export", str(smollm2_q4_k_m), str(existing), "--format", "gguf"])
    assert result.exit_code == 2 and "--overwrite" in result.output and existing.read_text() == "keep"
    compressor.compress(recipe_dict(llama_dir, corpus, [{"rtn": {"gguf": "Q4_0"}}], tmp_path / "hf"), progress=False)
    result = runner.invoke(main, ["export", str(tmp_path / "hf"), str(tmp_path / "hf.gguf"), "--format", "gguf"])
    assert result.exit_code == 2 and "convert_hf_to_gguf" in result.output
    assert not list(tmp_path.glob("*hf.gguf*"))
    config = json.loads((smollm2_q4_k_m / "config.json").read_text())
    assert config["compression_config"]["modules"]


@pytest.mark.parametrize("passes, refused", [
    ([{"gptq": {"gguf": "llama:Q4_K_M"}}], None),
    ([{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"gguf": "Q4_0"}}], None),
    ([{"rtn": {"bits": 4}}], "rtn"),
    ([{"wanda": {"sparsity": 0.5}}], "wanda"),
    ([{"gptq": {"bits": 4}}, {"lrec": {"rank": 8}}], "gptq"),
    ([{"lowrank": {"param_ratio": 0.8}}], "lowrank"),
])
def test_a_recipe_exporting_to_gguf_is_checked_before_it_runs(passes, refused):
    recipe = load_recipe({"model": "bundled:smollm2-135m", "passes": passes, "output": "o"})
    if refused is None:
        check_exportable(recipe.passes, False, recipe.model)
        return
    with pytest.raises(CompressorError, match=f"export to GGUF: {refused}"):
        check_exportable(recipe.passes, False, recipe.model)
    check_exportable(recipe.passes, True, recipe.model)  # --dense-fallback writes them in float16
