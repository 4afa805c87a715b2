"""SliceGPT-style slicing (Ashkboos et al., 2024): rotate the residual stream into its principal
axes and delete the dimensions that carry the least variance.

Per decoder layer i, on the calibration inputs:
1. Fold the scales of the layer's RMS norms into the linears that read them; the norms become
   weightless RMS norms over the original width D (`RMSNormOverWidth`). Nothing changes yet.
2. Q_i [D, D]: eigenvectors of C, by decreasing eigenvalue, where C sums X^T X / tr(X^T X) over three
   points of the residual stream (the layer's input, its MLP's input and its output, in the original
   basis). Keep Qk = Q_i[:, :k], k = D minus fraction * D rounded to a multiple of 8.
3. Readers of the residual stream (q, k, v, gate, up): W <- W Qk [out, k]. Writers (o, down):
   W <- Qk^T W [k, in], bias <- Qk^T bias. The layer's input arrives in the previous layer's basis
   (P = Q_{i-1}[:, :k], or the embeddings' basis), so the layer gets an `InputRotation` P^T Qk
   [k_prev, k] applied to its input, which changes the basis of the residual stream once per layer
   (SliceGPT uses two bases per layer, one per block; one basis per layer needs no change to the
   architecture's own forward code).
4. Embeddings: when sliced, E <- E Q_0k and layer 0 needs no input rotation; when kept at full
   width (the default when they are tied to the head, where slicing would mean untying and storing
   a second vocabulary matrix), layer 0's input rotation is Q_0k [D, k]. The head: when sliced, the
   final norm's scale is folded into it and it becomes W_head Q_last,k; when kept, the final norm
   gets the input rotation Q_last,k^T [k, D] back to the original basis.
Only pre-norm blocks whose outputs are added straight to the residual stream can be sliced: a norm
on a block's output (Gemma3's sandwich norms) acts on the unrotated output, which no rotation of
the linears can reproduce, so such architectures are refused.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.models import Adapter
from compressor.nn import InputRotation, RMSNormOverWidth
from compressor.nn.sliced import resize_config
from compressor.passes.base import LayerPass, ParamError


def sliced_width(width: int, fraction: float) -> int:
    """The width left after deleting fraction * width dimensions, rounded to a multiple of 8."""
    return width - 8 * round(fraction * width / 8)


def norm_eps(norm: nn.Module) -> float:
    for attribute in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attribute, None), float):
            return getattr(norm, attribute)
    raise CompressorError(f"slice: cannot find the epsilon of {type(norm).__name__}; the adapter needs work")


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> RMSNormOverWidth:
    """Move the norm's scale into the linears that read its output; return the weightless norm."""
    for linear in readers:
        linear.weight.mul_(norm.weight.to(linear.weight.dtype)[None, :])
    return RMSNormOverWidth(norm.weight.numel(), norm_eps(norm))


@dataclass
class Slice(LayerPass):
    """Delete the least-variance dimensions of the residual stream (SliceGPT)."""

    name: ClassVar[str] = "slice"
    stats: ClassVar[str | None] = "layer"  # runs each layer on the calibration inputs itself

    fraction: float = 0.25
    # None: slice the embeddings and head unless they are tied (then keep both at full width)
    slice_embeddings: bool | None = None
    damp: float = 0.0  # added to C's diagonal, as a fraction of its mean, before the eigendecomposition

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            raise ParamError("fraction", f"got {self.fraction}; allowed: a number in (0, 1), e.g. 0.25")
        if self.targets != ["Linear"] or self.ignore:
            raise ParamError("targets", "slice rotates every reader and writer of the residual stream; "
                                        "it takes no targets or ignore")
        if self.damp < 0:
            raise ParamError("damp", f"got {self.damp}; allowed: a number >= 0")

    def check_adapter(self, adapter: Adapter) -> None:
        for block, (writer, norm) in [("attention", adapter.attn_output), ("MLP", adapter.mlp_output)]:
            if norm is not None:
                raise CompressorError(
                    f"slice: {adapter.name} models normalise each {block} output ({norm} after {writer}) before "
                    "adding it to the residual stream; that norm acts on the unrotated output, so slicing would "
                    "change the model beyond the deleted dimensions. Use lowrank or quantization for this model.")

    def apply_layer(self, model: PreTrainedModel, adapter: Adapter, index: int, layer: nn.Module,
                    hidden: list[torch.Tensor], kwargs: dict, device: torch.device, names: list[str],
                    ) -> tuple[list[torch.Tensor], dict[str, dict]]:
        """Slice decoder layer `index`; return its (possibly rotated) cached inputs and the records."""
        prefix = f"{adapter.layers}.{index}"
        records = {}
        (attn_norm, attn_readers), (mlp_norm, mlp_readers) = adapter.attn_inputs, adapter.mlp_inputs
        for norm_name, reader_names in [(attn_norm, attn_readers), (mlp_norm, mlp_readers)]:
            norm = fold_norm(layer.get_submodule(norm_name), [layer.get_submodule(n) for n in reader_names])
            layer.set_submodule(norm_name, norm)
            records[f"{prefix}.{norm_name}"] = {"pass": self.name, "runtime": norm.runtime_config()}
        if index == 0:
            self._start(model, adapter)
        Q = self.principal_axes(layer.get_submodule(mlp_norm), layer, hidden, kwargs, device)
        width = sliced_width(Q.shape[0], self.fraction)
        Qk = Q[:, :width]  # [D, k]
        for name in (*attn_readers, *mlp_readers):
            linear = layer.get_submodule(name)
            linear.weight = nn.Parameter((linear.weight.double() @ Qk).to(linear.weight.dtype))
            linear.in_features = width
        for name in (adapter.attn_output[0], adapter.mlp_output[0]):
            linear = layer.get_submodule(name)
            linear.weight = nn.Parameter((Qk.T @ linear.weight.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias = nn.Parameter((linear.bias.double() @ Qk).to(linear.bias.dtype))
            linear.out_features = width
        for name in (*attn_readers, *mlp_readers, adapter.attn_output[0], adapter.mlp_output[0]):
            records[f"{prefix}.{name}"] = {"pass": self.name, "width": width,
                                           "runtime": resize_config(layer.get_submodule(name))}
        if self._frame is None and self._slice_embeddings:  # layer 0: rotate the embeddings instead
            embeddings = model.get_submodule(adapter.embeddings)
            embeddings.weight = nn.Parameter((embeddings.weight.double() @ Qk.cpu()).to(embeddings.weight.dtype))
            embeddings.embedding_dim = width
            records[adapter.embeddings] = {"pass": self.name, "width": width, "runtime": resize_config(embeddings)}
            hidden = [(h.double() @ Qk.cpu()).to(h.dtype) for h in hidden]
        else:
            rotation = Qk if self._frame is None else self._frame.T @ Qk  # [k_prev, k]
            records[f"{prefix}.input_rotation"] = {"pass": self.name,
                                                   **self._attach_rotation(layer, rotation)}
        records[prefix] = {"pass": self.name, "width": width, "full_width": Q.shape[0]}
        self._frame = Qk
        return hidden, records

    def finish(self, model: PreTrainedModel, adapter: Adapter) -> dict[str, dict]:
        """After the last layer: bring the head to the last layer's basis."""
        norm = model.get_submodule(adapter.final_norm)
        if not self._slice_embeddings:  # full-width head: rotate back before the final norm
            return {f"{adapter.final_norm}.input_rotation": {"pass": self.name,
                                                             **self._attach_rotation(norm, self._frame.T)}}
        head = model.get_submodule(adapter.head)
        model.set_submodule(adapter.final_norm, fold_norm(norm, [head]))
        with torch.no_grad():
            frame = self._frame.to(head.weight.device)
            head.weight = nn.Parameter((head.weight.double() @ frame).to(head.weight.dtype))
        head.in_features = self._frame.shape[1]
        return {adapter.final_norm: {"pass": self.name,
                                     "runtime": model.get_submodule(adapter.final_norm).runtime_config()},
                adapter.head: {"pass": self.name, "width": head.in_features, "untied": self._untied,
                               "runtime": resize_config(head)}}

    def _start(self, model: PreTrainedModel, adapter: Adapter) -> None:
        """Before layer 0: decide about the embeddings; untie the head when both are sliced."""
        self._frame = None
        tied = model.get_submodule(adapter.head).weight is model.get_submodule(adapter.embeddings).weight
        self._slice_embeddings = not tied if self.slice_embeddings is None else self.slice_embeddings
        self._untied = tied and self._slice_embeddings
        if self._untied:
            head = model.get_submodule(adapter.head)
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False

    @staticmethod
    def _attach_rotation(module: nn.Module, rotation: torch.Tensor) -> dict:
        weight = next(module.parameters())
        module.input_rotation = InputRotation(*rotation.shape, dtype=weight.dtype).to(weight.device)
        module.input_rotation.weight.data.copy_(rotation)
        module.input_rotation.attach(module)
        return {"width": rotation.shape[1], "runtime": module.input_rotation.runtime_config()}

    @torch.no_grad()
    def principal_axes(self, mlp_norm: nn.Module, layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict,
                       device: torch.device) -> torch.Tensor:
        """Q [D, D] (float64), by decreasing eigenvalue: eigenvectors of C = sum over the layer's three points
        of the residual stream (its input, its MLP's input, its output) of X^T X / tr(X^T X), in the original
        basis. Each point is normalised by its own energy: the stream grows by orders of magnitude inside the
        first layers, and an unweighted sum would fit the basis to the largest point alone."""
        width = mlp_norm.full_width
        C = {point: torch.zeros(width, width, dtype=torch.float64, device=device)
             for point in ("input", "mlp input", "output")}

        def accumulate(point: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, width).double()
            if not torch.isfinite(x).all():
                raise CompressorError(f"slice: non-finite calibration activations in {type(layer).__name__}")
            C[point].add_(x.T @ x)

        handle = mlp_norm.register_forward_pre_hook(lambda module, args: accumulate("mlp input", args[0]))
        try:
            for h in hidden:
                x = h.to(device)
                x = x if self._frame is None else (x.double() @ self._frame.T).to(h.dtype)  # [1, L, D]
                accumulate("input", x)
                out = layer(x, **kwargs)
                accumulate("output", out[0] if isinstance(out, tuple) else out)
        finally:
            handle.remove()
        total = sum(c / c.trace() for c in C.values())
        total.diagonal().add_(self.damp * total.diagonal().mean())
        _, Q = torch.linalg.eigh(total)
        return Q.flip(-1)
