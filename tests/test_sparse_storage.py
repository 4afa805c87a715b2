import pytest
import torch
from conftest import recipe_dict
from torch import nn

import compressor
from compressor.checkpoint import weight_bytes
from compressor.nn import SparseLinear
from compressor.nn.sparse_linear import pack_mask, unpack_mask
from compressor.passes.prune import nm_keep_mask, row_keep_mask


def pruned_linear(pattern: str, in_features=64, out_features=12, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    w = linear.weight.data
    keep = row_keep_mask(w.abs(), 0.6) if pattern == "unstructured" else nm_keep_mask(
        w.abs(), *map(int, pattern.split(":")))
    w.mul_(keep)
    return linear


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "1:8"])
def test_sparse_linear_round_trips_exactly_and_is_smaller(pattern):
    linear = pruned_linear(pattern)
    sparse = SparseLinear.from_linear(linear, pattern)
    assert torch.equal(sparse.weight_dense(), linear.weight.data)
    x = torch.randn(3, 64)
    torch.testing.assert_close(sparse(x), linear(x), rtol=0, atol=0)
    assert sparse.storage_bytes() < linear.weight.numel() * 4


def test_two_of_four_stores_half_the_values_and_two_bit_indices():
    sparse = SparseLinear.from_linear(pruned_linear("2:4", bias=False), "2:4")
    assert sparse.values.shape == (12, 32)
    assert sparse.indices.shape == (12, 2)  # 32 indices x 2 bits = 2 int32 words per row
    assert sparse.storage_bytes() * 8 / (12 * 64) == pytest.approx(0.5 * 32 + 0.5 * 2)  # bits per weight


def test_mask_bits_are_little_endian():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True, True]])
    assert pack_mask(mask).tolist() == [[1, 3]]
    assert torch.equal(unpack_mask(pack_mask(mask), 10), mask)


def test_nm_storage_refuses_a_weight_off_the_pattern():
    with pytest.raises(ValueError, match="does not follow the 2:4 pattern"):
        SparseLinear.from_linear(pruned_linear("unstructured"), "2:4")


def test_pruned_checkpoint_is_smaller_on_disk_and_reloads(llama_dir, corpus, tmp_path):
    sizes = {}
    for name, passes in [("dense", [{"magnitude": {"sparsity": 0.0}}]), ("2of4", [{"wanda": {"pattern": "2:4"}}])]:
        out = tmp_path / name
        model = compressor.compress(recipe_dict(llama_dir, corpus, passes, out), progress=False)
        sizes[name] = weight_bytes(out)
        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(compressor.load(out)(input_ids=ids).logits, model(input_ids=ids).logits,
                                       rtol=0, atol=0)
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    decoder_linear_bytes = 3 * 4 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    # 2:4 in float32: 17 of 32 bits per weight remain (the safetensors header grows by ~2 KB: two
    # tensors per sparse module instead of one)
    assert sizes["dense"] - sizes["2of4"] == pytest.approx(decoder_linear_bytes * 15 / 32, rel=0.02)
