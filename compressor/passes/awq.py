"""Activation-aware weight scaling (AWQ; Lin et al., 2024): per-input-channel scales that make the channels with
large activations cheaper to quantize, folded into the module that feeds them, so the model computes the same
function before any rounding. A quantization pass (rtn, gptq, with lrec after it) then rounds the scaled weights.

Where one module feeds a group of linears (the smooth module and its balance linears; names from the adapter):

    attention input norm  ->  q_proj, k_proj, v_proj     loss on the attention block's output
    MLP input norm        ->  gate_proj, up_proj         loss on the MLP's output
    up_proj               ->  down_proj                  loss on down_proj's output

the pass tries, for a in {0, 1/n, ..., (n-1)/n} (n = `grid_points`),

    s = xbar^a / wbar^(1-a),  divided by sqrt(max s * min s)                      [in]

where xbar [in] is the mean |x| of each input channel over the calibration tokens and wbar [in] the mean over
the output rows of |W| relative to the largest |W| of its group. For each a, every balance linear's weight becomes
RTN(W diag(s)) diag(s)^-1 (rounded to nearest on the grid this pass is told: bits, group_size, symmetric), and
the block's output on the calibration inputs is compared with the float block's (mean squared error). No scaling
(s = 1) is a candidate too, so the search never makes the rounded block worse on the tokens it sees (its record
then says ratio: null). The best s is folded: W <- W diag(s) for the balance linears; the smooth module's output
is divided by s (a norm's weight, as offset + w <- (offset + w) / s; up_proj's rows).

v_proj -> o_proj, which AWQ also scales where each attention head has its own values, is left out: with
grouped-query attention (both bundled models) o_proj's input columns do not map one to one to v_proj's rows.
The search runs on the first windows holding `search_tokens` tokens; the statistics a quantization pass after
it collects come from every window, as usual.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.formats import SUPPORTED_BITS
from compressor.passes.base import LayerContext, LayerPass, ParamError, StopLayer, run_until_stopped
from compressor.passes.quantize import rtn


@dataclass
class Mapping:
    smooth: str  # module inside the layer whose output feeds the balance linears (a norm, or up_proj)
    balance: list[str]  # the linears that read it
    block: str  # the module whose output the loss compares (the balance linears' common parent, or the one linear)


@dataclass
class AWQ(LayerPass):
    """Search per-channel scales for each smooth -> balance mapping of a layer; fold the best ones in."""

    name: ClassVar[str] = "awq"
    stats: ClassVar[str] = "layer"

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    grid_points: int = 20
    search_tokens: int = 16384

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ParamError("bits", f"got {self.bits}; allowed: {', '.join(map(str, SUPPORTED_BITS))} (the bits of "
                                     "the quantization pass that follows, whose grid the search rounds to)")
        if self.group_size <= 0:
            raise ParamError("group_size", f"got {self.group_size}; use the quantization pass's group size, e.g. 128")
        if self.grid_points < 2:
            raise ParamError("grid_points", f"got {self.grid_points}; use at least 2 ratios (AWQ's default: 20)")
        if self.search_tokens <= 0:
            raise ParamError("search_tokens", f"got {self.search_tokens}; use a positive number of calibration "
                                              "tokens to search on, e.g. 16384")

    def check_model(self, model: nn.Module, adapter) -> None:
        if adapter.attn_inputs is None or adapter.mlp_inputs is None or adapter.mlp_output is None:
            raise CompressorError(f"awq: the {adapter.name} adapter does not name the norms that feed each layer's "
                                  "attention and MLP, so there is nothing to fold the scales into; awq supports "
                                  "the Llama and Gemma layouts")

    def apply_layer(self, ctx: LayerContext, run: None) -> tuple[list[torch.Tensor], dict[str, dict], None]:
        prefix = f"{ctx.adapter.layers}.{ctx.index}."
        targeted = {name.removeprefix(prefix) for name in ctx.names}
        mappings = [m for m in layer_mappings(ctx.adapter) if set(m.balance) <= targeted]
        windows = ctx.hidden[:max(1, math.ceil(self.search_tokens / ctx.hidden[0].shape[-2]))]
        inputs = capture_block_inputs(ctx.layer, [m.block for m in mappings], windows, ctx.kwargs, ctx.device)
        records: dict[str, dict] = {}
        for m in mappings:
            ratio, loss, loss_unscaled, scales = self.search(ctx.layer, m, inputs[m.block])
            fold(ctx.layer, m, scales, ctx.adapter.norm_offset)
            for name in m.balance:  # inputs scaled by s: the search's outcome
                records.setdefault(prefix + name, {"pass": self.name}).update(
                    ratio=ratio, loss=loss, loss_unscaled=loss_unscaled)
            records.setdefault(prefix + m.smooth, {"pass": self.name})["output_divided_for"] = m.block
            ctx.progress(f"awq {m.block}: ratio {ratio}, loss {loss:.3g} (unscaled {loss_unscaled:.3g})")
        return ctx.hidden, records, None

    @torch.no_grad()
    def search(self, layer: nn.Module, m: Mapping, calls: list[tuple[tuple, dict]]
               ) -> tuple[float | None, float, float, torch.Tensor]:
        """The best ratio a for mapping `m` on the block's recorded calls (None: no scaling did best); returns a,
        its loss, the loss without scaling, and its scales s [in]."""
        block = layer.get_submodule(m.block)
        linears = [layer.get_submodule(name) for name in m.balance]
        originals = [lin.weight.data.clone() for lin in linears]
        x = torch.cat([call_input(linears[0], args, kwargs) for args, kwargs in calls])  # [tokens, in]
        x_mean = x.abs().float().mean(0)  # [in]
        w_mean = torch.cat([relative_magnitudes(w, self.group_size) for w in originals]).mean(0)  # [in]
        targets = [output_of(block(*args, **kwargs)) for args, kwargs in calls]
        candidates = {None: torch.ones_like(x_mean)}  # no scaling
        for k in range(self.grid_points):
            ratio = k / self.grid_points
            s = (x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp(min=1e-4)).clamp(min=1e-4)
            candidates[ratio] = s / (s.max() * s.min()).sqrt()
        losses = {}
        try:
            for ratio, s in candidates.items():
                for lin, w in zip(linears, originals, strict=True):
                    lin.weight.data = self.rounded(w * s) / s
                losses[ratio] = sum(float((output_of(block(*args, **kwargs)) - t).float().pow(2).mean())
                                    for (args, kwargs), t in zip(calls, targets, strict=True)) / len(calls)
        finally:
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.data = w
        best = min(losses, key=losses.get)
        return best, losses[best], losses[None], candidates[best]

    def rounded(self, w: torch.Tensor) -> torch.Tensor:
        """w [out, in] rounded to nearest on the pass's grid, as floats."""
        codes, scales, zeros = rtn(w.float(), self.bits, self.group_size, self.symmetric)
        groups = torch.arange(w.shape[1], device=w.device) // self.group_size
        return ((codes - zeros[:, groups]) * scales[:, groups]).to(w.dtype)


def layer_mappings(adapter) -> list[Mapping]:
    """The smooth -> balance mappings of one decoder layer, by the adapter's names."""
    (attn_norm, attn_readers), (mlp_norm, mlp_readers) = adapter.attn_inputs, adapter.mlp_inputs
    down = adapter.mlp_output[0]
    up = next(name for name in mlp_readers if name.endswith("up_proj"))
    return [Mapping(attn_norm, list(attn_readers), common_parent(attn_readers)),
            Mapping(mlp_norm, list(mlp_readers), common_parent(mlp_readers)),
            Mapping(up, [down], down)]


def common_parent(names: tuple[str, ...]) -> str:
    """The innermost module holding all `names` ("self_attn" for q/k/v_proj)."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def relative_magnitudes(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """|w| [out, in] relative to the largest |w| of its row's group."""
    out_features, in_features = w.shape
    magnitudes = w.abs().float()
    for start in range(0, in_features, group_size):
        group = magnitudes[:, start:start + group_size]
        group /= group.amax(1, keepdim=True).clamp(min=1e-12)
    return magnitudes


def capture_block_inputs(layer: nn.Module, blocks: list[str], hidden: list[torch.Tensor], kwargs: dict,
                         device: torch.device) -> dict[str, list[tuple[tuple, dict]]]:
    """Each block's call arguments, once per window: the layer runs on each window until the last block is
    called."""
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in blocks}
    seen: set[str] = set()

    def record(name: str):
        def hook(_module, args, kw):
            calls[name].append((args, kw))
            seen.add(name)
            if len(seen) == len(blocks):
                raise StopLayer  # the rest of the layer is not needed
        return hook

    handles = [layer.get_submodule(name).register_forward_pre_hook(record(name), with_kwargs=True)
               for name in blocks]
    try:
        for h in hidden:
            seen.clear()
            run_until_stopped(layer, h, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def call_input(first: nn.Linear, args: tuple, kwargs: dict) -> torch.Tensor:
    """The balance linears' input [tokens, in] in one recorded call of their block: the block's own input (the
    linear itself, or a block whose input goes straight to its linears: attention's q/k/v, the MLP's gate/up)."""
    x = args[0] if args else kwargs["hidden_states"]
    return x.reshape(-1, first.in_features)


def output_of(out) -> torch.Tensor:
    """A block's output tensor (attention blocks return (output, weights))."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def fold(layer: nn.Module, m: Mapping, s: torch.Tensor, norm_offset: float) -> None:
    """W <- W diag(s) for the balance linears; the smooth module's output divided by s."""
    for name in m.balance:
        lin = layer.get_submodule(name)
        lin.weight.data = (lin.weight.data.double() * s.double()).to(lin.weight.dtype)
    smooth = layer.get_submodule(m.smooth)
    if isinstance(smooth, nn.Linear):  # up_proj: its output rows
        smooth.weight.data = (smooth.weight.data.double() / s.double()[:, None]).to(smooth.weight.dtype)
        if smooth.bias is not None:
            smooth.bias.data = (smooth.bias.data.double() / s.double()).to(smooth.bias.dtype)
        return
    w = smooth.weight.data.double()
    smooth.weight.data = ((norm_offset + w) / s.double() - norm_offset).to(smooth.weight.dtype)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.data = (smooth.bias.data.double() / s.double()).to(smooth.bias.dtype)
