"""Our GPTQ, SparseGPT and Wanda against llm-compressor's on single linears: the same weight and the same
Hessian (or calibration inputs) for both, small random tensors. Skipped where llm-compressor is not installed.

What these pin: SparseGPT at 2:4 and 4:8 gives bit-identical weights (at sink weight 1, the Hessian passed
as it is); at 50% unstructured the masks differ by about one weight per block of columns (llm-compressor
prunes every weight whose saliency is at most the k-th smallest, k + 1 or more; we prune exactly k) and the
output errors agree. Wanda's masks are llm-compressor's when the input norms are summed as its running
mean (the engine's `input_sq_norms_running_mean`, Wanda's default). GPTQ at llm-compressor's default job
(W4 symmetric, static act-order, damping 0.01, blocks of 128, min-max grid) leaves an output error
tr(D H D^T) within a small tolerance of llm-compressor's: the two differ only by float rounding and by our
scales being rounded to float16.
"""

import pytest
import torch

pytest.importorskip("llmcompressor")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: E402
from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify  # noqa: E402
from llmcompressor.modifiers.pruning.wanda import wanda_sparsify  # noqa: E402

from compressor.engine import collect_stats  # noqa: E402
from compressor.passes.prune import nm_keep_mask, row_keep_mask, sparsegpt  # noqa: E402
from compressor.passes.quantize import gptq  # noqa: E402

OUT, IN, TOKENS, WINDOWS = 96, 256, 64, 8  # two blocks of 128 columns; 8 windows of 64 tokens


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T) = ||X D^T||^2 for D [out, in] and H = X^T X, in float64."""
    d = error.double()
    return (d @ hessian.double() * d).sum().item()


def calibration(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [OUT, IN] and calibration inputs [WINDOWS, TOKENS, IN] with unevenly scaled, correlated
    channels (a few large ones, as in a transformer's activations)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=g) * 0.05
    scales = torch.exp(torch.randn(IN, generator=g))
    mix = torch.eye(IN) + 0.1 * torch.randn(IN, IN, generator=g)
    inputs = (torch.randn(WINDOWS, TOKENS, IN, generator=g) * scales) @ mix
    return weight, inputs


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    x = inputs.reshape(-1, IN)
    return x.T @ x


def linear_with(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    return linear


def peer_sparsegpt(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None):
    linear = linear_with(weight)
    kept, m = nm or (0, 0)  # (0, 0): unstructured
    # llm-compressor's prune_n counts the pruned weights of every m (for 2:4 and 4:8 as many as the kept ones)
    _, pruned = sgpt_sparsify.sparsify_weight(linear, {linear: H.clone()}, sparsity, m - kept, m, 128, 0.01, False)
    return pruned.float()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_nm_is_bit_identical_to_llmcompressor(nm, seed):
    weight, inputs = calibration(seed)
    H = hessian(inputs)
    ours = sparsegpt(weight, H, 0.5, nm, damp=0.01, block_size=128)
    peer = peer_sparsegpt(weight, H, 0.5, nm)
    assert torch.equal(ours == 0, peer == 0)
    assert torch.equal(ours, peer)


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_unstructured_matches_llmcompressor_but_for_its_threshold_ties(seed):
    weight, inputs = calibration(seed)
    H = hessian(inputs)
    ours = sparsegpt(weight, H, 0.5, None, damp=0.01, block_size=128)
    peer = peer_sparsegpt(weight, H, 0.5, None)
    blocks = IN // 128
    assert (ours == 0).sum().item() == blocks * int(0.5 * OUT * 128)  # exactly k per block
    # the weight at llm-compressor's threshold, and the few near it that the next block's updates then reorder
    assert ((ours == 0) != (peer == 0)).float().mean().item() < 1e-3
    e_ours, e_peer = output_error(weight - ours, H), output_error(weight - peer, H)
    assert e_ours == pytest.approx(e_peer, rel=5e-3)


def running_mean_norms(linear: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """The engine's Wanda statistic (llm-compressor's arithmetic), one forward per window."""
    layer = torch.nn.Sequential(linear)
    stats = collect_stats(layer, {"0": linear}, [w[None] for w in inputs], {}, "input_sq_norms_running_mean",
                          torch.device("cpu"))
    return stats["0"]


def peer_row_scalars(linear: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """llm-compressor's statistic, fed window by window as its hooks would."""
    row, count = torch.zeros(IN), 0
    for window in inputs:
        row, count = wanda_sparsify.accumulate_row_scalars(window[None], linear, row, count)
    return row


@pytest.mark.parametrize("pattern", ["50%", "2:4", "4:8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_masks_with_running_mean_norms_equal_llmcompressors(pattern, seed):
    weight, inputs = calibration(seed)
    linear = linear_with(weight)
    norms = running_mean_norms(linear, inputs)
    peer_norms = peer_row_scalars(linear, inputs)
    torch.testing.assert_close(norms, peer_norms, rtol=1e-6, atol=0)
    score = weight.abs() * norms.float().sqrt()[None, :]
    if pattern == "50%":
        keep, sparsity, pruned_of_m, m = row_keep_mask(score, 0.5), 0.5, 0, 0
    else:
        n, m = map(int, pattern.split(":"))
        keep, sparsity, pruned_of_m = nm_keep_mask(score, n, m), None, m - n
    peer = wanda_sparsify.sparsify_weight(linear, {linear: peer_norms}, sparsity or 0.5, pruned_of_m, m).float()
    assert torch.equal(keep, peer != 0)
    assert torch.equal(weight * keep, peer)


def peer_gptq(weight: torch.Tensor, H: torch.Tensor, group_size: int) -> torch.Tensor:
    """llm-compressor's GPTQ weight (dequantized) at its default job: W4 symmetric groups, static act-order,
    scales from its min-max observer on the original weight."""
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size,
                            actorder="static")
    groups = weight.view(OUT, IN // group_size, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)  # [out, groups]
    return quantize_weight(weight[None].clone(), H[None].clone(), scale[None], zero_point[None], None, args,
                           blocksize=128, percdamp=0.01)[0][0].float()


def ours_gptq(weight: torch.Tensor, H: torch.Tensor, group_size: int) -> torch.Tensor:
    codes, scales, zeros = gptq(weight, H, 4, group_size, True, damp=0.01, block_size=128, act_order=True,
                                clip_search=False)
    g = torch.arange(IN) // group_size
    return (codes - zeros[:, g]) * scales[:, g]


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_output_error_within_rounding_of_llmcompressors(group_size, seed):
    weight, inputs = calibration(seed)
    H = hessian(inputs)
    ours, peer = ours_gptq(weight, H, group_size), peer_gptq(weight, H, group_size)
    e_ours, e_peer = output_error(weight - ours, H), output_error(weight - peer, H)
    assert e_ours / e_peer == pytest.approx(1.0, abs=0.02)  # 0.2-1% apart on these small layers
    # far better than round-to-nearest on the same grid: both are GPTQ, not a fallback
    rtn = weight.clone()
    for start in range(0, IN, group_size):
        w = weight[:, start:start + group_size]
        step = 2 * w.abs().amax(1, keepdim=True) / 15
        rtn[:, start:start + group_size] = torch.clamp(torch.round(w / step), -8, 7) * step
    assert max(e_ours, e_peer) < 0.8 * output_error(weight - rtn, H)
