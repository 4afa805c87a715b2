"""What every pass has: the contract the engine drives (Pass, LayerPass), targets/ignore matching, parameter
checks, and the state passes hand each other on a layer (LayerState) or see of it (LayerContext)."""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError


def layer_output(layer: nn.Module, hidden, kwargs: dict):
    """The hidden states a decoder layer returns (some architectures return a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class StopLayer(Exception):
    """Raised by a hook once a layer has run far enough for what the hook records: the rest is skipped."""


def run_until_stopped(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> None:
    """Run a decoder layer on one window until a hook raises StopLayer (or to the end)."""
    try:
        layer_output(layer, hidden.to(device), kwargs)
    except StopLayer:
        pass


class ParamError(CompressorError):
    """A pass parameter is invalid; `key` names it so the recipe can point at it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_sink_weight(sink_weight: float) -> None:
    """`sink_weight`: how many times the first token of each calibration window counts in a statistic."""
    if not sink_weight > 0:
        raise ParamError("sink_weight", f"got {sink_weight}; use a positive weight for the first token "
                                        "of each calibration window (default 1: no extra weight)")


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """True when a pattern names the module: its class name, its full name, or `re:REGEX` (full match)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif pattern in (name, type(module).__name__):
            return True
    return False


@dataclass
class Quantized:
    """What a quantization pass leaves for the passes after it on the same layer (lrec, lrec_refine)."""

    dense_weight: torch.Tensor  # [out, in] float32: the weight before rounding
    requantize: Callable[[torch.Tensor], None]  # round a new target [out, in] into the module's codes, as the pass did


@dataclass
class LayerState:
    """What the passes on one decoder layer hand to the passes after them on that layer. The engine makes one
    per layer and drops it when the layer is done, so nothing in it reaches the checkpoint."""

    pruned: set[str] = field(default_factory=set)  # linears a pruning pass zeroed: their zeros stay zero
    quantized: dict[str, Quantized] = field(default_factory=dict)  # linears a quantization pass made
    index: int = 0  # the layer's position among the decoder layers
    config: Any = None  # the model's config (transformers' PretrainedConfig)


@dataclass
class LayerContext:
    """Everything a LayerPass sees of the decoder layer it transforms."""

    model: nn.Module
    adapter: Any  # compressor.models.Adapter
    index: int
    layer: nn.Module
    hidden: list[torch.Tensor]  # the layer's calibration inputs, [1, L, d] each, on the CPU
    kwargs: dict  # the layer's other call arguments (masks, positions), on `device`
    device: torch.device
    names: list[str]  # the linears the plan chose in this layer
    state: LayerState
    progress: Callable[[str], None] = lambda text: None  # shows how far a long step has got (the progress bar)


@dataclass
class Pass:
    """A compression method applied, layer by layer, to the targeted linears of each decoder layer.

    Lifecycle, as the engine drives it:
    1. check: `validate()` when the recipe is read (parameters alone); `check_model()` and `check_module()`
       when the engine plans the run, before any work starts (can this model and each targeted linear take it).
    2. collect statistics: for each decoder layer, the engine runs the layer on the calibration inputs with
       hooks and hands each targeted linear the statistic the pass declares in `stats`.
    3. apply: `apply()` per targeted linear, layer by layer (a LayerPass: `apply_layer()` per layer).
    4. finish: a LayerPass's `finish()` after the last layer.
    A pass object holds its settings only. What it hands to later passes on the same layer goes into the
    layer's LayerState; what a LayerPass carries from layer to layer lives in the object its `new_run()`
    returns, which the engine keeps for the run and hands back.

    A subclass sets `name`, declares its parameters as dataclass fields, states which calibration
    statistic it needs (`stats`), and implements `apply`.
    """

    name: ClassVar[str] = ""
    # Per-linear calibration statistic: None; "input_sq_norms" (sum over tokens of x_j^2, [in], float64);
    # "input_sq_norms_running_mean" (the same, as llm-compressor's float32 running mean over windows);
    # "hessian" (sum over tokens of x x^T, [in, in], float32); "layer" (a LayerPass that runs the layer itself).
    stats: ClassVar[str | None] = None
    # What a targeted linear must be before the pass ("dense", "pruned", "quantized", "lowrank") and after.
    accepts: ClassVar[tuple[str, ...]] = ("dense",)
    produces: ClassVar[str] = "dense"

    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Check parameter values; raise ParamError(key, message)."""

    def selects(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and matches(name, module, self.targets) \
            and not matches(name, module, self.ignore)

    def check_model(self, model, adapter) -> None:
        """Check that the pass can run on this model and architecture at all; raise CompressorError."""

    def check_module(self, name: str, linear: nn.Linear) -> None:
        """Check that the pass can run on this linear before any work starts; raise CompressorError."""

    def apply(self, name: str, linear: nn.Linear, stats: Any, state: LayerState) -> tuple[nn.Module, dict]:
        """Compress `linear`; return the module that replaces it (or `linear` itself, changed in place)
        and the record of what was done, which the checkpoint stores. A record with a "runtime" entry
        tells `checkpoint.load` which runtime module to rebuild. `state`: the layer's hand-off between passes."""
        raise NotImplementedError


class LayerPass(Pass):
    """A pass that transforms a whole decoder layer and the model around it (slicing), rather than one
    linear at a time. The engine calls `new_run` once, `apply_layer` for every layer in order, then `finish`."""

    def new_run(self) -> Any:
        """The state this pass carries from layer to layer during one run (None: nothing)."""
        return None

    def apply_layer(self, ctx: LayerContext, run: Any) -> tuple[list, dict[str, dict], list | None]:
        """Transform layer `ctx.index`; return its cached calibration inputs (changed if the pass changed what the
        layer receives), a record per module changed or added, and the transformed layer's outputs on those
        inputs when the pass computed them anyway (else None: the engine runs the layer), which saves the
        engine a forward pass."""
        raise NotImplementedError

    def finish(self, model, adapter, run: Any) -> dict[str, dict]:
        """After the last layer; return a record per module changed or added."""
        return {}
