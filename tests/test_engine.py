from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from compressor.engine import compress_model
from compressor.errors import CompressorError
from compressor.models import load_model
from compressor.nn import SparseLinear
from compressor.passes import Pass
from compressor.passes.prune import Magnitude
from compressor.passes.quantize import GPTQ, RTN


def windows(n=3, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g)


@dataclass
class Spy(Pass):
    """Records the input statistics the engine hands it; changes nothing."""

    name: ClassVar[str] = "spy"
    stats: ClassVar[str | None] = "input_sq_norms"
    accepts: ClassVar[tuple[str, ...]] = ("dense", "pruned")
    seen: dict = None

    def apply(self, name, linear, stats, state):
        self.seen[name] = stats.clone()
        return linear, {"pass": "spy"}


def test_every_target_gets_the_exact_nm_pattern(model_dir):
    loaded = load_model(str(model_dir))
    head = loaded.model.lm_head.weight.clone()
    records = compress_model(loaded.model, loaded.adapter, [Magnitude(pattern="2:4")], None, torch.device("cpu"),
                             progress=False)
    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, SparseLinear)}  # stored sparse
    assert set(records) == set(linears) and len(linears) == 7 * 3
    for name, linear in linears.items():
        weight = linear.weight_dense()
        groups = (weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert (groups <= 2).all(), name
        sparsity = (weight == 0).float().mean().item()
        assert records[name] == [{"pass": "magnitude", "pattern": "2:4", "sparsity": sparsity,
                                  "runtime": linear.runtime_config()}]
    assert torch.equal(loaded.model.lm_head.weight, head)  # the head is not a decoder-layer linear


def weight(linear: torch.nn.Module) -> torch.Tensor:
    """A pruned linear's weight, dense: the engine stores it sparse where that takes fewer bytes."""
    return linear.weight_dense() if isinstance(linear, SparseLinear) else linear.weight


def test_ignore_leaves_modules_untouched(llama_dir):
    loaded = load_model(str(llama_dir))
    before = loaded.model.model.layers[1].mlp.down_proj.weight.clone()
    p = Magnitude(sparsity=0.5, ignore=["re:.*down_proj"])
    records = compress_model(loaded.model, loaded.adapter, [p], None, torch.device("cpu"), progress=False)
    assert not any(n.endswith("down_proj") for n in records)
    assert torch.equal(loaded.model.model.layers[1].mlp.down_proj.weight, before)
    assert weight(loaded.model.model.layers[1].mlp.up_proj).eq(0).float().mean() == 0.5


def test_sparsity_per_layer_by_one_pass_per_group_of_layers(llama_dir):
    """Per-layer sparsity: passes of one method with disjoint `targets`/`ignore`, each with its own sparsity."""
    loaded = load_model(str(llama_dir))
    first = [r"re:model\.layers\.0\..*"]
    passes = [Magnitude(sparsity=0.25, targets=first), Magnitude(sparsity=0.75, ignore=first)]
    records = compress_model(loaded.model, loaded.adapter, passes, None, torch.device("cpu"), progress=False)
    assert all(len(done) == 1 for done in records.values())  # each linear pruned once
    for i, layer in enumerate(loaded.model.model.layers):
        zeros = weight(layer.mlp.up_proj).eq(0).float().mean().item()
        assert zeros == (0.25 if i == 0 else 0.75), i


@pytest.mark.parametrize("fixture", ["llama_dir", "gemma_dir"])
def test_next_layer_is_calibrated_on_the_compressed_layers_outputs(fixture, request):
    """The statistics the engine collects for every layer equal those of the final compressed model,
    run whole: so layer i+1 saw compressed layer i, and each layer got its own mask and rotary
    embeddings (Gemma3 alternates sliding and full attention; windows are longer than its window)."""
    loaded = load_model(str(request.getfixturevalue(fixture)))
    spy = Spy(seen={})
    ids = windows()
    compress_model(loaded.model, loaded.adapter, [Magnitude(sparsity=0.5), spy], ids, torch.device("cpu"),
                   progress=False)
    expected = {name: torch.zeros_like(s) for name, s in spy.seen.items()}

    def accumulate(name):
        def hook(module, inputs, output):
            x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
            expected[name] += (x * x).sum(0)
        return hook

    hooks = [loaded.model.get_submodule(name).register_forward_hook(accumulate(name)) for name in expected]
    with torch.no_grad():
        for w in ids:
            loaded.model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    assert len(spy.seen) == 21
    for name in expected:
        torch.testing.assert_close(spy.seen[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_target_matching_nothing_fails_before_any_change(llama_dir):
    loaded = load_model(str(llama_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    passes = [Magnitude(sparsity=0.5), Magnitude(sparsity=0.5, targets=["re:.*attn.q_projection"])]
    with pytest.raises(CompressorError, match="matches no linear"):
        compress_model(loaded.model, loaded.adapter, passes, None, torch.device("cpu"), progress=False)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())


def test_nm_that_does_not_divide_the_input_width_fails(llama_dir):
    loaded = load_model(str(llama_dir))
    with pytest.raises(CompressorError, match="divisible by 128"):
        compress_model(loaded.model, loaded.adapter, [Magnitude(pattern="2:128")], None, torch.device("cpu"))


def test_pass_needing_data_without_windows_fails(llama_dir):
    loaded = load_model(str(llama_dir))
    with pytest.raises(CompressorError, match="calibration"):
        compress_model(loaded.model, loaded.adapter, [Spy(seen={})], None, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["hessian", "input_sq_norms"])
def test_sink_weight_counts_the_first_token_of_every_window_that_many_times(kind, llama_dir):
    """collect_stats against sums written out by hand over the inputs the layer's linears actually see."""
    from compressor.engine import capture_layer_inputs, collect_stats

    loaded = load_model(str(llama_dir))
    hidden, layer_kwargs = capture_layer_inputs(loaded.model, loaded.adapter, windows(n=2))
    layer = loaded.model.model.layers[0]
    linear = layer.mlp.down_proj
    seen = []
    handle = linear.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0][0].double()))
    stats = collect_stats(layer, {"down": linear}, hidden, layer_kwargs[0], kind, torch.device("cpu"), 9.0)["down"]
    handle.remove()
    weights = torch.ones(32, 1, dtype=torch.float64)
    weights[0] = 9.0
    expected = sum(x.T @ (weights * x) if kind == "hessian" else (weights * x * x).sum(0) for x in seen)
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-5)
    plain = collect_stats(layer, {"down": linear}, hidden, layer_kwargs[0], kind, torch.device("cpu"))["down"]
    assert not torch.allclose(plain.double(), expected, rtol=1e-3)


def test_running_mean_norms_follow_llm_compressors_arithmetic_bit_for_bit(llama_dir):
    """Wanda's `norms: running_mean`: per window w, the float32 norm over its tokens squared, folded into a
    float32 running mean S <- S * w / (w + 1) + n_w / (w + 1) (llm-compressor's), so the masks match its own."""
    from compressor.engine import capture_layer_inputs, collect_stats

    loaded = load_model(str(llama_dir))
    hidden, layer_kwargs = capture_layer_inputs(loaded.model, loaded.adapter, windows(n=3))
    layer = loaded.model.model.layers[0]
    linear = layer.mlp.down_proj
    seen = []
    handle = linear.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0][0]))
    stats = collect_stats(layer, {"down": linear}, hidden, layer_kwargs[0], "input_sq_norms_running_mean",
                          torch.device("cpu"))["down"]
    handle.remove()
    expected = torch.zeros(linear.in_features)
    for w, x in enumerate(seen):  # x: [tokens, in] float32
        expected *= w / (w + 1)
        expected += torch.norm(x.T, p=2, dim=1) ** 2 / (w + 1)
    assert len(seen) == 3 and stats.dtype == torch.float32
    assert torch.equal(stats, expected)
    exact = collect_stats(layer, {"down": linear}, hidden, layer_kwargs[0], "input_sq_norms", torch.device("cpu"))
    torch.testing.assert_close(stats.double(), exact["down"] / 3, rtol=1e-5, atol=0)


def test_non_finite_activations_name_the_linear(llama_dir):
    # layer 0's down_proj, left out of the pass, puts Inf into the residual stream: layer 1 reads NaN/Inf
    loaded = load_model(str(llama_dir))
    loaded.model.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("inf")
    p = GPTQ(bits=4, group_size=32, ignore=[r"re:.*layers\.0\..*"])
    with pytest.raises(CompressorError, match=r"non-finite calibration activations entering model\.layers\.1\."):
        compress_model(loaded.model, loaded.adapter, [p], windows(), torch.device("cpu"), progress=False)


def test_non_finite_weights_name_the_linear(llama_dir):
    loaded = load_model(str(llama_dir))
    loaded.model.model.layers[1].self_attn.k_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(CompressorError, match=r"model\.layers\.1\.self_attn\.k_proj has NaN or Inf weights"):
        compress_model(loaded.model, loaded.adapter, [RTN(bits=4, group_size=32)], None, torch.device("cpu"),
                       progress=False)


def test_statistics_pass_stops_once_every_linear_has_its_input(llama_dir):
    from compressor.engine import capture_layer_inputs, collect_stats

    loaded = load_model(str(llama_dir))
    hidden, layer_kwargs = capture_layer_inputs(loaded.model, loaded.adapter, windows(n=2))
    layer = loaded.model.model.layers[0]
    ran = []
    for name in ("mlp.gate_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_hook(lambda module, inputs, output, name=name: ran.append(name))
    collect_stats(layer, {"q": layer.self_attn.q_proj}, hidden, layer_kwargs[0], "hessian", torch.device("cpu"))
    assert ran == []  # the MLP never ran
    stats = collect_stats(layer, {"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj}, hidden,
                          layer_kwargs[0], "hessian", torch.device("cpu"))
    assert ran == ["mlp.gate_proj", "mlp.gate_proj"]  # once per window; down_proj's own matmul skipped
    assert stats["down"].abs().sum() > 0
