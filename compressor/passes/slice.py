"""SliceGPT-style slicing (Ashkboos et al., 2024): rotate the residual stream into its principal
axes and delete the dimensions that carry the least variance.

The residual stream has a basis at every point where a block reads it. Layer by layer, on the
calibration inputs (the outputs of the layers already sliced), with P [D, k] the basis in which
the layer's input arrives:
1. Fold the scales of the layer's RMS norms into the linears that read them; the norms become
   weightless RMS norms over the original width D (`RMSNormOverWidth`). Nothing changes yet.
2. Attention readers (q, k, v) read the input in its basis: W <- W P.
3. Q_mid [D, k]: the leading eigenvectors of sum a^T a, a the residual stream entering the MLP
   (in the original basis). The attention writer (o) writes in it: W <- Q_mid^T W; the residual
   connection gets the shortcut P^T Q_mid; the MLP readers (gate, up) read in it: W <- W Q_mid.
4. Q_out [D, k]: the same for the layer's output, computed with steps 2-3 in place; the MLP writer
   (down) writes in it, the MLP's residual connection gets Q_mid^T Q_out, and it is the next
   layer's P. k = D minus fraction * D rounded to a multiple of 8 (`layer_fractions` sets it per layer:
   on SmolLM2, keeping layer 0, where the embeddings enter, whole matters most). A layer kept whole
   whose input arrives in the original basis (P = I) is left as it is, without shortcuts.
The shortcuts need the adapter's `sliced_forward` (the architecture's layer forward with the two
shortcut matrices). Embeddings: when sliced, E <- E Q_emb (the leading eigenvectors of the layer-0
inputs) and P = Q_emb; when kept at full width (the default when they are tied to the head, where
slicing would mean untying and storing a second vocabulary matrix), P = I. The head: when sliced,
the final norm's scale is folded into it and it becomes W_head P_last; when kept, the last layer
writes the full-width stream (Q_out = I, as SliceGPT leaves the head connection unsliced).
Only pre-norm blocks whose outputs are added straight to the residual stream can be sliced: a norm
on a block's output (Gemma3's sandwich norms) acts on the unrotated output, which no rotation of
the linears can reproduce, so such architectures are refused.
"""

import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError, CompressorWarning
from compressor.models import Adapter
from compressor.nn import RMSNormOverWidth, Rotation
from compressor.nn.sliced import resize_config
from compressor.passes.base import LayerContext, LayerPass, ParamError, StopLayer, layer_output, run_until_stopped


def sliced_width(width: int, fraction: float) -> int:
    """The width left after deleting fraction * width dimensions, rounded to a multiple of 8."""
    return width - 8 * round(fraction * width / 8)


def norm_eps(norm: nn.Module) -> float:
    for attribute in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attribute, None), float):
            return getattr(norm, attribute)
    raise CompressorError(f"slice: cannot find the epsilon of {type(norm).__name__}; the adapter needs work")


def stream_linears(adapter: Adapter) -> list[str]:
    """The linears that read (q, k, v, gate, up) or write (o, down) a decoder layer's residual stream."""
    return [*adapter.attn_inputs[1], *adapter.mlp_inputs[1], adapter.attn_output[0], adapter.mlp_output[0]]


def shortcut_cost(layer: nn.Module, adapter: Adapter, full_width: int, width: int) -> tuple[int, int]:
    """(parameters the two k x k shortcut matrices add, parameters the linears lose) when `layer` is sliced
    from D to k: every reader and writer of the residual stream loses D - k of its D columns or rows."""
    linears = sum(layer.get_submodule(name).weight.numel() for name in stream_linears(adapter))
    return 2 * width**2, linears * (full_width - width) // full_width


def warn_if_slicing_adds_parameters(layers: list[nn.Module], adapter: Adapter, fractions: list[float]) -> None:
    """SliceGPT's shortcut matrices cost 2 k^2 per layer: on narrow models a small fraction adds parameters."""
    full_width = layers[0].get_submodule(adapter.mlp_inputs[0]).weight.numel()
    widths = [sliced_width(full_width, fraction) for fraction in fractions]

    def grows(layer: nn.Module, k: int) -> bool:
        added, saved = shortcut_cost(layer, adapter, full_width, k)
        return added > saved

    growing = [i for i, (layer, k) in enumerate(zip(layers, widths, strict=True)) if k < full_width and grows(layer, k)]
    if not growing:
        return
    first, k = layers[growing[0]], widths[growing[0]]
    added, saved = shortcut_cost(first, adapter, full_width, k)
    saving = next(w for w in range(full_width - 8, 0, -8) if not grows(first, w))
    warnings.warn(
        f"slice: {len(growing)} of {len(layers)} decoder layers (first: {growing[0]}) get more parameters than they "
        f"lose: at width {k} of {full_width}, their two {k} x {k} shortcut matrices add {added:,} and their linears "
        f"lose {saved:,}. Slicing saves parameters on this model at width {saving} "
        f"(fraction {(full_width - saving) / full_width:.3f}) or less.", CompressorWarning, stacklevel=2)


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear], offset: float = 0.0) -> RMSNormOverWidth:
    """Move the norm's scale (offset + w: `Adapter.norm_offset`) into the linears that read its output; return the
    weightless norm."""
    for linear in readers:
        linear.weight.mul_((offset + norm.weight.to(linear.weight.dtype))[None, :])
    return RMSNormOverWidth(norm.weight.numel(), norm_eps(norm))


def read_in_basis(linear: nn.Linear, Q: torch.Tensor | None) -> None:
    """The linear reads the residual stream in basis Q [D, k]: W [out, D] -> W Q [out, k]."""
    if Q is not None:
        linear.weight = nn.Parameter((linear.weight.double() @ Q).to(linear.weight.dtype), requires_grad=False)
        linear.in_features = Q.shape[1]


def write_in_basis(linear: nn.Linear, Q: torch.Tensor) -> None:
    """The linear writes the residual stream in basis Q [D, k]: W [D, in] -> Q^T W [k, in]."""
    linear.weight = nn.Parameter((Q.T @ linear.weight.double()).to(linear.weight.dtype), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter((linear.bias.double() @ Q).to(linear.bias.dtype), requires_grad=False)
    linear.out_features = Q.shape[1]


@dataclass
class SliceRun:
    """What slicing carries from layer to layer."""

    frame: torch.Tensor | None = None  # [D, k]: the basis the next layer's input arrives in (None: the original)
    slice_embeddings: bool = False  # whether the embeddings and head are sliced too
    untied: bool = False  # whether slicing untied a tied head from the embeddings
    embedding_basis: torch.Tensor | None = None  # [D, k]: what the embeddings become E Q of, in `finish`


@dataclass
class Slice(LayerPass):
    """Delete the least-variance dimensions of the residual stream (SliceGPT)."""

    name: ClassVar[str] = "slice"
    stats: ClassVar[str | None] = "layer"  # runs each layer on the calibration inputs itself

    fraction: float = 0.25
    # None: slice the embeddings and head unless they are tied (then keep both at full width)
    slice_embeddings: bool | None = None
    damp: float = 0.0  # added to C's diagonal, as a fraction of its mean, before the eigendecomposition
    layer_fractions: dict = field(default_factory=dict)  # {decoder layer index: fraction}, overriding `fraction`

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            raise ParamError("fraction", f"got {self.fraction}; allowed: a number in (0, 1), e.g. 0.25")
        if self.targets != ["Linear"] or self.ignore:
            raise ParamError("targets", "slice rotates every reader and writer of the residual stream; "
                                        "it takes no targets or ignore")
        if self.damp < 0:
            raise ParamError("damp", f"got {self.damp}; allowed: a number >= 0")
        try:
            self.layer_fractions = {int(layer): float(f) for layer, f in (self.layer_fractions or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ParamError("layer_fractions", f"got {self.layer_fractions!r}; allowed: a mapping from decoder "
                                                "layer index to fraction, e.g. {0: 0.0, 1: 0.3}") from None
        for layer, f in self.layer_fractions.items():
            if layer < 0 or not 0 <= f < 1:
                raise ParamError("layer_fractions", f"layer {layer}: {f}; allowed: index >= 0, fraction in [0, 1)")

    def check_model(self, model: PreTrainedModel, adapter: Adapter) -> None:
        layers = adapter.decoder_layers(model)
        n_layers = len(layers)
        if any(layer >= n_layers for layer in self.layer_fractions):
            raise ParamError("layer_fractions", f"slice: layer_fractions names layers {sorted(self.layer_fractions)}, "
                                                f"but the model has {n_layers} decoder layers (0 to {n_layers - 1})")
        for block, output in [("attention", adapter.attn_output), ("MLP", adapter.mlp_output)]:
            if output is not None and output[1] is not None:
                writer, norm = output
                raise CompressorError(
                    f"slice: {adapter.name} models normalise each {block} output ({norm} after {writer}) before "
                    "adding it to the residual stream; that norm acts on the unrotated output, so slicing would "
                    "change the model beyond the deleted dimensions. Use lowrank or quantization for this model.")
        if adapter.sliced_forward is None:
            raise CompressorError(f"slice: the {adapter.name} adapter has no sliced layer forward; "
                                  "slicing supports: llama, mistral, qwen2")
        fractions = [self.layer_fractions.get(i, self.fraction) for i in range(n_layers)]
        warn_if_slicing_adds_parameters(layers, adapter, fractions)

    def new_run(self) -> SliceRun:
        return SliceRun()

    def apply_layer(self, ctx: LayerContext, run: SliceRun
                    ) -> tuple[list[torch.Tensor], dict[str, dict], list[torch.Tensor] | None]:
        """Slice decoder layer `ctx.index`; return its (possibly rotated) cached inputs, the records and the
        sliced layer's outputs (None for the last layer when the head stays full width)."""
        model, adapter, index, layer, hidden = ctx.model, ctx.adapter, ctx.index, ctx.layer, ctx.hidden
        kwargs, device = ctx.kwargs, ctx.device
        prefix = f"{adapter.layers}.{index}"
        n_layers = len(adapter.decoder_layers(model))
        (attn_norm, attn_readers), (mlp_norm, mlp_readers) = adapter.attn_inputs, adapter.mlp_inputs
        attn_writer, mlp_writer = adapter.attn_output[0], adapter.mlp_output[0]
        records = {}
        full_width = layer.get_submodule(mlp_norm).weight.numel()
        width = sliced_width(full_width, self.layer_fractions.get(index, self.fraction))
        if index == 0:
            hidden = self._start(model, adapter, hidden, width, device, run)
        P = run.frame  # [D, k_in], or None: the input arrives in the original basis
        if width == full_width and P is None:
            # A layer kept whole that reads the original basis stays the dense layer and writes the original
            # basis: rotating it would be exact too, but would cost two D x D shortcut matrices.
            records[prefix] = {"pass": self.name, "width": width, "full_width": full_width}
            return hidden, records, None
        for norm_name, reader_names in [(attn_norm, attn_readers), (mlp_norm, mlp_readers)]:
            norm = fold_norm(layer.get_submodule(norm_name), [layer.get_submodule(n) for n in reader_names])
            layer.set_submodule(norm_name, norm)
            records[f"{prefix}.{norm_name}"] = {"pass": self.name, "runtime": norm.runtime_config()}
        eye = torch.eye(full_width, dtype=torch.float64, device=device)
        # Run as the dense layer (identity shortcuts, writers in the original basis) to find Q_mid.
        dtype = layer.get_submodule(attn_writer).weight.dtype
        layer.attn_shortcut, layer.mlp_shortcut = (Rotation(full_width, full_width, dtype) for _ in range(2))
        layer.forward = types.MethodType(adapter.sliced_forward, layer)
        self._set(layer.attn_shortcut, eye if P is None else P.T)  # back to the original basis: exact
        self._set(layer.mlp_shortcut, eye)
        for name in attn_readers:
            read_in_basis(layer.get_submodule(name), P)
        Q_mid = principal_axes(residual_before(layer, layer.get_submodule(mlp_norm), hidden, kwargs, device),
                               self.damp, device)[:, :width]
        self._set(layer.attn_shortcut, Q_mid if P is None else P.T @ Q_mid)
        write_in_basis(layer.get_submodule(attn_writer), Q_mid)
        for name in mlp_readers:
            read_in_basis(layer.get_submodule(name), Q_mid)
        self._set(layer.mlp_shortcut, Q_mid.T)  # the output back in the original basis, to find Q_out
        if index == n_layers - 1 and not run.slice_embeddings:
            Q_out, outputs = eye, None  # a full-width head reads the last layer's output in the original basis
        else:
            outputs = [layer_output(layer, h.to(device), kwargs).cpu() for h in hidden]  # [1, L, D] each
            Q_out = principal_axes(outputs, self.damp, device)[:, :width]
            # The sliced layer's output is this output in the basis Q_out: the next layer's inputs.
            Q_out_cpu = Q_out.cpu()
            outputs = [out @ Q_out_cpu.to(out.dtype) for out in outputs]
        self._set(layer.mlp_shortcut, Q_mid.T @ Q_out)
        write_in_basis(layer.get_submodule(mlp_writer), Q_out)
        for name in stream_linears(adapter):
            records[f"{prefix}.{name}"] = {"pass": self.name, "runtime": resize_config(layer.get_submodule(name))}
        for name in ("attn_shortcut", "mlp_shortcut"):
            records[f"{prefix}.{name}"] = {"pass": self.name, "runtime": layer.get_submodule(name).runtime_config()}
        records[prefix] = {"pass": self.name, "width": width, "full_width": full_width,
                           "runtime": {"class": "SlicedLayer", "adapter": adapter.name}}
        run.frame = Q_out
        return hidden, records, outputs

    @staticmethod
    def _set(rotation: Rotation, matrix: torch.Tensor) -> None:
        rotation.weight = nn.Parameter(matrix.to(rotation.weight.dtype).contiguous(), requires_grad=False)

    def finish(self, model: PreTrainedModel, adapter: Adapter, run: SliceRun) -> dict[str, dict]:
        """After the last layer: slice the embeddings (untying a tied head) and bring the head to the last layer's
        basis. The embeddings change here rather than before layer 0, so that a resumed run, which starts from the
        original model, changes them too."""
        if not run.slice_embeddings:  # the last layer already writes the full width
            return {}
        embeddings, head = model.get_submodule(adapter.embeddings), model.get_submodule(adapter.head)
        if run.untied:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        with torch.no_grad():
            Q = run.embedding_basis.to(embeddings.weight.device)
            embeddings.weight = nn.Parameter((embeddings.weight.double() @ Q).to(embeddings.weight.dtype),
                                             requires_grad=False)
        embeddings.embedding_dim = Q.shape[1]
        norm = model.get_submodule(adapter.final_norm)
        model.set_submodule(adapter.final_norm, fold_norm(norm, [head]))
        with torch.no_grad():
            frame = run.frame.to(head.weight.device)
            head.weight = nn.Parameter((head.weight.double() @ frame).to(head.weight.dtype))
        head.in_features = run.frame.shape[1]
        return {adapter.embeddings: {"pass": self.name, "width": Q.shape[1], "runtime": resize_config(embeddings)},
                adapter.final_norm: {"pass": self.name,
                                     "runtime": model.get_submodule(adapter.final_norm).runtime_config()},
                adapter.head: {"pass": self.name, "width": head.in_features, "untied": run.untied,
                               "runtime": resize_config(head)}}

    def _start(self, model: PreTrainedModel, adapter: Adapter, hidden: list[torch.Tensor], width: int,
               device: torch.device, run: SliceRun) -> list[torch.Tensor]:
        """Before layer 0: keep the embeddings, or find their basis (applied in `finish`) and put the cached
        layer-0 inputs in it."""
        embeddings, head = model.get_submodule(adapter.embeddings), model.get_submodule(adapter.head)
        tied = head.weight is embeddings.weight
        run.slice_embeddings = not tied if self.slice_embeddings is None else self.slice_embeddings
        run.untied = tied and run.slice_embeddings
        if not run.slice_embeddings:
            return hidden
        run.frame = principal_axes(hidden, self.damp, device)[:, :width]
        run.embedding_basis = run.frame.cpu()
        return [(h.double() @ run.embedding_basis).to(h.dtype) for h in hidden]


@torch.no_grad()
def residual_before(layer: nn.Module, module: nn.Module, hidden: list[torch.Tensor], kwargs: dict,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """The residual stream entering `module` (a norm inside `layer`), one cached input at a time; the
    layer runs only up to that module."""
    seen = []

    def stop(_module, args):
        seen.append(args[0])
        raise StopLayer  # the rest of the layer is not needed

    handle = module.register_forward_pre_hook(stop)
    try:
        for h in hidden:
            run_until_stopped(layer, h, kwargs, device)
            if not seen:
                raise CompressorError(f"slice: the layer never ran its {type(module).__name__}; the adapter needs work")
            yield seen.pop()
    finally:
        handle.remove()


@torch.no_grad()
def principal_axes(xs: Iterable[torch.Tensor], damp: float, device: torch.device) -> torch.Tensor:
    """Eigenvectors [D, D] (float64) of C = sum over xs of x^T x (x [..., D], flattened to rows) by
    decreasing eigenvalue, with damp * mean(diag C) added to C's diagonal."""
    C = 0
    for x in xs:
        x = x.to(device).reshape(-1, x.shape[-1]).double()
        if not torch.isfinite(x).all():
            raise CompressorError("slice: non-finite calibration activations in the residual stream")
        C = C + x.T @ x
    C.diagonal().add_(damp * C.diagonal().mean())
    _, Q = torch.linalg.eigh(C)
    return Q.flip(-1)
