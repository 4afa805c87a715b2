import pytest
import torch

from compressor.formats import bits_per_weight, dequantize, pack, packed_words, unpack


def test_layout_is_pinned_bit_for_bit():
    # 4-bit: code j at bits 4*(j % 8) of word j // 8
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]])
    q = pack(codes, 4)
    assert q.dtype == torch.int32 and q.shape == (1, 2)
    assert q[0, 0].item() == 0xF7654321 - 2**32 and q[0, 1].item() == 9
    # 2-bit: 16 codes per word
    q = pack(torch.tensor([[3, 0, 1, 2] + [0] * 11 + [3]]), 2)
    assert q.tolist() == [[(3 | 1 << 4 | 2 << 6 | 3 << 30) - 2**32]]
    # 3-bit: code 10 spans bits 30..32, i.e. words 0 and 1
    codes = torch.zeros(1, 12, dtype=torch.long)
    codes[0, 10] = 0b101
    codes[0, 11] = 0b111
    q = pack(codes, 3)
    assert q.shape == (1, 2)
    assert (q[0, 0].item() & 0xFFFFFFFF) == (0b01 << 30) and q[0, 1].item() == 0b1 | 0b111 << 1
    # 8-bit
    assert pack(torch.tensor([[1, 2, 3, 255]]), 8).tolist() == [[1 | 2 << 8 | 3 << 16 | (255 << 24) - 2**32]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [1, 31, 32, 33, 96, 576, 1000])
def test_every_bit_width_round_trips(bits, in_features):
    codes = torch.randint(0, 2**bits, (5, in_features), generator=torch.Generator().manual_seed(bits))
    q = pack(codes, bits)
    assert q.shape == (5, packed_words(in_features, bits))
    assert torch.equal(unpack(q, bits, in_features).long(), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 1, dtype=torch.int32), 5, 6)


def test_dequantize_uses_groups_with_a_short_last_group():
    codes = torch.tensor([[0, 1, 2, 3, 3]])
    scales = torch.tensor([[1.0, 10.0]], dtype=torch.float16)
    zeros = torch.tensor([[1, 2]], dtype=torch.uint8)
    w = dequantize(pack(codes, 2), scales, zeros, bits=2, group_size=4, in_features=5)
    assert w.tolist() == [[-1.0, 0.0, 1.0, 2.0, 10.0]]


def test_bits_per_weight_counts_codes_scales_and_zeros():
    assert bits_per_weight(576, 576, 4, 64) == pytest.approx(4 + 24 / 64)
    assert bits_per_weight(10, 32, 3, 32) == pytest.approx(3 + 24 / 32)
