"""Refine LREC factors on the calibration inputs (the INT2.1 idea), quantized weights frozen.

`lrec` fits each linear's factors to that linear's own output error. This pass then trains all the
factors of a decoder layer together, with Adam, so that the quantized layer's output matches the
dense layer's output on the same inputs (the outputs of the already compressed previous layers):
    min over {A, B}  sum_windows || layer_q+AB(x) - layer_dense(x) ||^2 / ||layer_dense(x)||^2
which also accounts for how the errors of q, k, v, o, gate, up and down combine through attention
and the MLP. Put it right after `lrec` in the same recipe (it needs the float weights that the
quantization pass keeps for the duration of the layer).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CompressorError
from compressor.nn import QuantLinear
from compressor.passes.base import LayerPass, ParamError, layer_output


@dataclass
class LRECRefine(LayerPass):
    """Train the layer's LREC factors to match the dense layer's outputs."""

    name: ClassVar[str] = "lrec_refine"
    stats: ClassVar[str | None] = "layer"
    accepts: ClassVar[tuple[str, ...]] = ("quantized",)
    produces: ClassVar[str] = "quantized"

    steps: int = 100
    lr: float = 1e-3

    def validate(self) -> None:
        if self.steps <= 0:
            raise ParamError("steps", f"got {self.steps}; use a positive number of optimizer steps, e.g. 100")
        if not self.lr > 0:
            raise ParamError("lr", f"got {self.lr}; use a positive learning rate, e.g. 1e-3")

    def apply_layer(self, model, adapter, index: int, layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict,
                    device: torch.device, names: list[str]) -> tuple[list[torch.Tensor], dict[str, dict], None]:
        linears = {name: model.get_submodule(name) for name in names}
        for name, q in linears.items():
            if not getattr(q, "rank", 0) or getattr(q, "dense_weight", None) is None:
                raise CompressorError(f"lrec_refine: {name} has no LREC factors or float weights to refine "
                                      "against; put lrec_refine right after lrec in the same recipe")
        factors = {name: tuple(t.detach().float().requires_grad_() for t in (q.lora_a, q.lora_b))
                   for name, q in linears.items()}
        optimizer = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=self.lr)
        losses = []
        try:
            with torch.no_grad():
                for q in linears.values():
                    q.forward = _dense_forward(q)
                targets = [layer_output(layer, h.to(device), kwargs).cpu() for h in hidden]
            for name, q in linears.items():
                q.forward = _quantized_forward(q, q.weight_dequantized(torch.float32), *factors[name])
            with torch.enable_grad():
                for step in range(self.steps):
                    j = step % len(hidden)
                    y = targets[j].to(device)
                    loss = F.mse_loss(layer_output(layer, hidden[j].to(device), kwargs), y) / y.pow(2).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
        finally:
            for q in linears.values():
                q.__dict__.pop("forward", None)
        for name, (a, b) in factors.items():
            linears[name].set_low_rank(a.detach(), b.detach())
        window = min(len(hidden), len(losses))  # one pass over the windows, at the start and at the end
        record = {"pass": self.name, "steps": self.steps, "lr": self.lr,
                  "relative_error_first": round(sum(losses[:window]) / window, 6),
                  "relative_error_last": round(sum(losses[-window:]) / window, 6)}
        return hidden, {name: dict(record) for name in linears}, None


def _dense_forward(q: QuantLinear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, q.dense_weight.to(x.dtype), q.bias)
    return forward


def _quantized_forward(q: QuantLinear, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), q.bias) + (x @ a.to(x.dtype)) @ b.to(x.dtype)
    return forward
