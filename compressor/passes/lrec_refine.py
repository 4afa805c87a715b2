"""Refine LREC factors on the calibration inputs (the INT2.1 idea), quantized weights frozen.

`lrec` fits each linear's factors to that linear's own output error. This pass then trains all the
factors of a decoder layer together, with Adam, so that the quantized layer's output matches the
dense layer's output on the same inputs (the outputs of the already compressed previous layers):
    min over {A, B}  sum_windows || layer_q+AB(x) - layer_dense(x) ||^2 / ||layer_dense(x)||^2
which also accounts for how the errors of q, k, v, o, gate, up and down combine through attention
and the MLP. Put it right after `lrec` in the same recipe (it needs the float weights that the
quantization pass hands on in the layer's state). Each pair A, B is first rescaled per rank component so
that both have entries of one size (`balanced`): Adam's steps are about lr in size whatever an entry's, and
LREC's whitened start can leave A orders of magnitude smaller than B.

`reference: model` matches, instead, the uncompressed model's own outputs at this layer (the dense
layers run on the dense inputs, carried along by this pass), as OmniQuant's block-wise training does:
    min over {A, B}  sum_windows || layer_q+AB(x_q) - layer_dense(x_dense) ||^2 / ||layer_dense(x_dense)||^2
so each layer also makes up for the error the layers before it left. "Dense" is the float weight the
quantization pass kept (after any pruning earlier in the recipe).

`loss: channel` weights each output channel's squared error by 1 / (that channel's mean square in the
targets) instead of summing all channels alike (`loss: total`):
    sum_windows  sum_c w_c || layer_q+AB(x)[:, c] - y[:, c] ||^2 / sum_c w_c || y[:, c] ||^2,
    w_c = 1 / mean(y[:, c]^2) over all target tokens
Gemma-3's residual stream carries a few channels around 1e5 while the rest stay near 1e1-1e2; under
`total` their error is the whole loss, the other channels go unfitted, and each later RMSNorm brings
those back to full weight.

`loss: next_norm` compares the two outputs as the next decoder layer reads them: after its input norm
(after the last layer, the model's final norm), a frozen copy of that module:
    sum_windows || N(layer_q+AB(x)) - N(y) ||^2 / || N(y) ||^2,   N(h) = h / rms(h) * gain
Each token then counts relative to its own scale (the first token's huge activations no longer dominate)
and each channel as much as the next layer's gain lets it through.

`autocast: bfloat16` runs the refinement's forward and backward matmuls in bfloat16 (torch.autocast; the
factors, Adam's state, the norms, the targets and the loss stay float32), which is faster on a CPU with
native bfloat16 instructions. The dense targets are still computed in float32. A CPU without them runs
bfloat16 matmuls far slower instead, so where a probe matmul in bfloat16 is more than 2x slower than in
float32 the pass warns and refines in float32; the record says which ran.

Left out of a recipe, `reference` and `loss` take the model adapter's defaults: `layer` and `total` for
Llama-family models, `model` and `next_norm` for Gemma-3 (why, with the measurements behind each choice:
docs/design-decisions.md, "lrec_refine balances the factors" and "Gemma-3: huge residual channels").
The settings used go into the checkpoint's per-module
record, with the loss before and after the refinement on the first `CHECK_WINDOWS` calibration windows
(`relative_error_before`, `relative_error_after`: the layer as it was and as stored, each in one forward pass
per window) and the mean training loss over the first and the last pass through the windows
(`relative_error_first`, `relative_error_last`; these overlap when there are fewer than twice as many steps as
windows).

Factors stored as integer codes (`lrec: {factor_bits: 8}` or 4) are trained through their rounding: each
step's forward uses the factors as storing would round them, the gradient passes straight through to the
float factors (straight-through estimator), so the refined layer is the stored one.

`scales: true` trains each group's scale as well, as a factor on the stored scale (codes and zero points
stay as they are), in the spirit of PEQA / EfficientQAT's block-wise training of quantization
parameters; the scales cost no extra bits, they are stored anyway. With scales trained, a quantized
linear needs no LREC factors to be refined.
"""

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CompressorError, CompressorWarning
from compressor.formats import dequantize, group_index
from compressor.nn import QuantLinear
from compressor.passes.base import LayerContext, LayerPass, ParamError, layer_output
from compressor.passes.factors import round_factors, store_factors
from compressor.runtime import SLOW_MATMUL, matmul_slowdown

CHECK_WINDOWS = 4  # the calibration windows on which the record's before / after errors are measured


@dataclass
class RefineRun:
    """What lrec_refine carries from layer to layer: with `reference: model`, the dense model's hidden states
    entering the next layer, [1, L, d] per calibration window."""

    dense_hidden: list[torch.Tensor] | None = None


@dataclass
class LRECRefine(LayerPass):
    """Train the layer's LREC factors (and with `scales`, the group scales) to match the dense layer's outputs."""

    name: ClassVar[str] = "lrec_refine"
    stats: ClassVar[str | None] = "layer"
    accepts: ClassVar[tuple[str, ...]] = ("quantized",)
    produces: ClassVar[str] = "quantized"

    steps: int = 100
    lr: float = 1e-3
    scales: bool = False
    reference: str | None = None  # "layer": the dense layer on the compressed inputs; "model": on the dense
    # inputs; None: the model adapter's default
    loss: str | None = None  # "total": squared error over all channels; "channel": each channel relative to its
    # scale; "next_norm": the error after the norm through which the next layer reads the output; None: the
    # model adapter's default
    autocast: str = "none"  # "none": float32 throughout; "bfloat16": the matmuls of each step in bfloat16

    def validate(self) -> None:
        if self.reference not in (None, "layer", "model"):
            raise ParamError("reference", f"got {self.reference!r}; allowed: layer (the dense layer on the "
                                          "compressed layers' outputs) or model (the uncompressed model's outputs)")
        if self.loss not in (None, "total", "channel", "next_norm"):
            raise ParamError("loss", f"got {self.loss!r}; allowed: total (squared error over all channels), "
                                     "channel (each channel's squared error relative to its mean square) or "
                                     "next_norm (the error as the next layer's input norm passes it on)")
        if self.autocast not in ("none", "bfloat16"):
            raise ParamError("autocast", f"got {self.autocast!r}; allowed: none (float32 throughout) or bfloat16 "
                                         "(each step's matmuls in bfloat16; factors and optimizer in float32)")
        if self.steps <= 0:
            raise ParamError("steps", f"got {self.steps}; use a positive number of optimizer steps, e.g. 100")
        if not self.lr > 0:
            raise ParamError("lr", f"got {self.lr}; use a positive learning rate, e.g. 1e-3")

    def check_model(self, model: nn.Module, adapter) -> None:
        knows_norms = adapter.attn_inputs is not None and adapter.final_norm is not None
        if (self.loss or adapter.refine_loss) == "next_norm" and not knows_norms:
            raise CompressorError(f"lrec_refine: loss next_norm needs the norm through which the model reads each "
                                  f"layer's output, which is not known for {adapter.name} models; use loss: total "
                                  "or channel")

    def new_run(self) -> RefineRun:
        return RefineRun()

    def apply_layer(self, ctx: LayerContext, run: RefineRun) -> tuple[list[torch.Tensor], dict[str, dict], None]:
        model, adapter, index, layer, hidden = ctx.model, ctx.adapter, ctx.index, ctx.layer, ctx.hidden
        kwargs, device = ctx.kwargs, ctx.device
        linears = {name: model.get_submodule(name) for name in ctx.names}
        dense = {model.get_submodule(name): q.dense_weight for name, q in ctx.state.quantized.items()}
        reference = self.reference or adapter.refine_reference
        loss = self.loss or adapter.refine_loss
        if reference == "model":  # carry the dense model's hidden states on (the first layer: the same inputs)
            dense_inputs = hidden if index == 0 or run.dense_hidden is None else run.dense_hidden
            run.dense_hidden = dense_outputs(layer, dense_inputs, kwargs, device, dense)
        if not linears:  # targets that leave this layer out
            return hidden, {}, None
        for name, q in linears.items():
            if not (getattr(q, "rank", 0) or self.scales) or name not in ctx.state.quantized:
                raise CompressorError(f"lrec_refine: {name} has no LREC factors or float weights to refine "
                                      "against; put lrec_refine right after lrec in the same recipe"
                                      + ("" if self.scales else " (or set `scales: true` to train the scales)"))
        if reference == "model":
            targets = run.dense_hidden
        else:
            targets = dense_outputs(layer, hidden, kwargs, device, dense)
        weight = channel_weights(targets) if loss == "channel" else None  # [d] or None
        readout = next_norm(model, adapter, index).to(device) if loss == "next_norm" else nn.Identity()
        check = hidden[:CHECK_WINDOWS], targets[:CHECK_WINDOWS], kwargs, device, readout, weight
        before = mean_error(layer, *check)
        factors, scale_factors, losses = self.fit(
            layer, linears, hidden, targets, kwargs, device, readout, weight,
            on_step=lambda n, loss: ctx.progress(f"step {n}/{self.steps}, loss {loss:.4f}"))
        store(linears, factors, scale_factors)
        after = mean_error(layer, *check)
        window = min(len(hidden), len(losses))  # one pass over the windows, at the start and at the end
        record = {"pass": self.name, "steps": self.steps, "lr": self.lr, "scales": self.scales,
                  "reference": reference, "loss": loss,
                  "autocast": "bfloat16" if runs_bfloat16(self.autocast, device) else "none",
                  "relative_error_before": round(before, 6), "relative_error_after": round(after, 6),
                  "error_windows": len(check[0]),
                  "relative_error_first": round(sum(losses[:window]) / window, 6),
                  "relative_error_last": round(sum(losses[-window:]) / window, 6)}
        return hidden, {name: dict(record) for name in linears}, None

    def fit(self, layer: nn.Module, linears: dict[str, QuantLinear], hidden: list[torch.Tensor],
            targets: list[torch.Tensor], kwargs: dict, device: torch.device, readout: nn.Module,
            weight: torch.Tensor | None, on_step: Callable[[int, float], None] | None = None
            ) -> tuple[dict, dict, list[float]]:
        """Train the factors A, B of the linears that have them (with `scales`, a factor on each group's scale)
        for `steps` Adam steps on relative_error(readout(layer(hidden[j])), readout(targets[j])); `on_step(n, loss)`,
        if given, runs after step n. Returns the trained tensors, not yet stored, and each step's loss."""
        factors = {name: tuple(t.requires_grad_() for t in balanced(*q.low_rank_factors()))
                   for name, q in linears.items() if q.rank}
        scale_factors = {name: torch.ones_like(q.scales, dtype=torch.float32, requires_grad=True)
                         for name, q in linears.items()} if self.scales else {}
        optimizer = torch.optim.Adam([t for pair in factors.values() for t in pair] + list(scale_factors.values()),
                                     lr=self.lr)
        losses = []
        bfloat16 = runs_bfloat16(self.autocast, device)
        try:
            for name, q in linears.items():
                q.forward = _quantized_forward(q, factors.get(name), scale_factors.get(name))
            with torch.enable_grad():
                for step in range(self.steps):
                    j = step % len(hidden)
                    loss = window_error(layer, hidden[j], targets[j], kwargs, device, readout, weight, bfloat16)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    if on_step is not None:
                        on_step(step + 1, losses[-1])
        finally:
            for q in linears.values():
                q.__dict__.pop("forward", None)
        return factors, scale_factors, losses



def runs_bfloat16(autocast: str, device: torch.device) -> bool:
    """Whether the refinement's matmuls run in bfloat16: asked for, and not much slower than float32 on `device`
    (otherwise a warning, once, and float32)."""
    if autocast != "bfloat16":
        return False
    slowdown = matmul_slowdown(torch.bfloat16, device.type)
    if slowdown > SLOW_MATMUL:
        warnings.warn(f"lrec_refine: autocast: bfloat16 asked for, but this CPU runs bfloat16 matmuls {slowdown:.0f}x "
                      "slower than float32 ones (no native bfloat16 instructions); refining in float32 instead",
                      CompressorWarning, stacklevel=1)  # warned from here: once per process
        return False
    return True


@torch.no_grad()
def balanced(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [in, r] and B [r, out] rescaled, A[:, k] * c_k and B[k, :] / c_k, so that column k of A and row k of B
    have the same root mean square; A B stays the same (why: the module's docstring; LREC's whitened start puts
    1 / sqrt(eigenvalues of H) into A). Integer factors are rounded per rank component, so the rescaling leaves
    their rounding as it was."""
    rms_a = a.pow(2).mean(0).sqrt()  # [r]
    rms_b = b.pow(2).mean(1).sqrt()  # [r]
    c = torch.where((rms_a > 0) & (rms_b > 0), (rms_b / rms_a).sqrt(), 1.0)  # [r]; 1 where a factor is zero
    return a * c, b / c[:, None]


@torch.no_grad()
def store(linears: dict[str, QuantLinear], factors: dict, scale_factors: dict) -> None:
    """Put trained tensors from `LRECRefine.fit` into the linears: scale factors onto the stored scales, factors
    stored as each linear stores its factors (float16 or int8 codes)."""
    for name, m in scale_factors.items():
        linears[name].scales.copy_(linears[name].scales.float() * m)
    for name, (a, b) in factors.items():
        store_factors(linears[name], a.detach(), b.detach())


def next_norm(model: nn.Module, adapter, index: int) -> nn.Module:
    """A frozen copy of the norm through which the model reads decoder layer `index`'s output: the next
    layer's input norm, or after the last layer the final norm."""
    layers = adapter.decoder_layers(model)  # (LRECRefine.check_model: the adapter knows both norms)
    if index + 1 < len(layers):
        norm = layers[index + 1].get_submodule(adapter.attn_inputs[0])
    else:
        norm = model.get_submodule(adapter.final_norm)
    return copy.deepcopy(norm).requires_grad_(False)


def channel_weights(targets: list[torch.Tensor]) -> torch.Tensor:
    """1 / mean square of each channel over all target tokens, [d], scaled to mean 1; channels whose mean
    square is below 1e-6 of the average one are clamped there."""
    mean_square = sum(y.pow(2).flatten(0, -2).sum(0) for y in targets) / sum(y[..., 0].numel() for y in targets)
    weight = 1 / mean_square.clamp(min=1e-6 * mean_square.mean().item())
    return weight / weight.mean()


def window_error(layer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, device: torch.device,
                 readout: nn.Module, weight: torch.Tensor | None, bfloat16: bool = False) -> torch.Tensor:
    """relative_error(readout(layer(hidden)), readout(target)) for one window; with `bfloat16`, the layer's
    matmuls run under bfloat16 autocast. The loss is taken in float32: on CUDA, mse_loss's backward refuses a
    bfloat16 target beside float32."""
    with torch.autocast(device.type, torch.bfloat16, enabled=bfloat16):
        output = layer_output(layer, hidden.to(device), kwargs)
    return relative_error(readout(output.float()), readout(target.to(device, torch.float32)), weight)


@torch.no_grad()
def mean_error(layer: nn.Module, hidden: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict,
               device: torch.device, readout: nn.Module, weight: torch.Tensor | None) -> float:
    """The mean window_error over the windows, the layer run as it stands (its linears' stored weights and
    factors), in float32."""
    errors = [window_error(layer, h, y, kwargs, device, readout, weight).item()
              for h, y in zip(hidden, targets, strict=True)]
    return sum(errors) / len(errors)


def relative_error(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """||output - target||^2 / ||target||^2, each channel weighted by `weight` [d] where given."""
    if weight is None:
        return F.mse_loss(output, target) / target.pow(2).mean()
    weight = weight.to(target.device)
    return ((output - target).pow(2) * weight).mean() / (target.pow(2) * weight).mean()


@torch.no_grad()
def dense_outputs(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict, device: torch.device,
                  dense: dict[nn.Module, torch.Tensor]) -> list[torch.Tensor]:
    """The layer's outputs on `hidden` with each quantized linear in `dense` (those quantized in this layer by
    the recipe) run on its float weight [out, in] instead."""
    try:
        for q, weight in dense.items():
            q.forward = _dense_forward(q, weight)
        return [layer_output(layer, h.to(device), kwargs).cpu() for h in hidden]
    finally:
        for q in dense:
            q.__dict__.pop("forward", None)


def _dense_forward(q: QuantLinear, weight: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), q.bias)
    return forward


def _quantized_forward(q: QuantLinear, factors: tuple[torch.Tensor, torch.Tensor] | None,
                       scale_factor: torch.Tensor | None):
    """q's forward with trained factors A [in, rank], B [rank, out] and a trained factor [out, groups] on its
    scales (each None when not trained)."""
    if scale_factor is not None:
        g = group_index(q.in_features, q.group_size).to(q.qweight.device)
        stored = q.scales.float()
        centered = dequantize(q.qweight, torch.ones_like(stored), q.zeros, q.bits, q.group_size,
                              q.in_features)  # codes - zero, [out, in]
    else:
        weight = q.weight_dequantized(torch.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = weight if scale_factor is None else centered * (stored * scale_factor)[:, g]
        y = F.linear(x, w.to(x.dtype), q.bias)
        if factors is not None:
            a, b = factors
            if q.factor_bits < 16:  # as stored, with the gradient passed straight through the rounding
                rounded_a, rounded_b = round_factors(a.detach(), b.detach(), q.factor_bits)
                a, b = a + (rounded_a - a).detach(), b + (rounded_b - b).detach()
            y = y + (x @ a.to(x.dtype)) @ b.to(x.dtype)
        return y
    return forward
