"""Rotations (QuaRot, Ashkboos et al., 2024; SpinQuant, Liu et al., 2024): orthogonal changes of basis that leave
the model's function unchanged but spread each weight matrix's large entries over many coordinates, so that a
quantization pass after this one (rtn, gptq, with lrec) rounds weights with fewer outliers.

Every rotation is a randomized Hadamard matrix Q (compressor/nn/hadamard.py), drawn from `seed`:

1. `residual`: the residual stream is carried in the basis x Q (one Q [D, D] for the whole model). The embeddings
   become E Q. Each norm that feeds linears (an RMS norm, which computes the same on a rotated vector) has its
   scale folded into its readers, which then read in the new basis: W <- W diag(offset + g) Q. The linears that
   write the stream write in it: W <- Q^T W (bias b Q). The final norm, whose scale cannot be folded into a tied
   head, becomes norm(x Q^T) Q (`RotatedNorm`: two fast transforms per token); the head reads in the new basis.
   On Gemma (`fold_norms` false, its adapter's choice) the input norms keep their scales the same way, and a
   writer followed by a norm on its output (the sandwich norms) keeps the original basis, the norm's output being
   rotated, norm(x) Q: both measured better for rounding (docs/design-decisions.md).
   This is SliceGPT's change of basis (compressor/passes/slice.py) with a Hadamard matrix instead of the principal
   axes and nothing deleted; it shares its norm folding and reader/writer rotations.
2. `heads`: each attention head's values carried as v_h H (H [d_head, d_head]): v_proj's rows of head h become
   H^T W_h (bias b_h H), o_proj's columns of head h become W_h H. Attention mixes values linearly, so this is exact,
   and it costs nothing at run time.
3. `online`: the MLP writer (down_proj) reads its input rotated at run time: W <- W Q_mlp, input x -> x Q_mlp
   (`RotatedInput`: one fast transform per token), since the MLP's nonlinearity stands between it and any weight
   that could absorb Q_mlp.

The engine's cached layer-0 inputs are rotated with the embeddings, so later passes calibrate on what the rotated
model computes. Needs pre-norm blocks with RMS norms (LayerNorm subtracts the mean, which a rotation does not
preserve) and the Llama layer layout (which norm feeds which linears; the adapters say).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.models import Adapter
from compressor.nn.hadamard import Hadamard, RotatedInput, RotatedNorm, largest_power_of_two_dividing
from compressor.passes.base import LayerContext, LayerPass, ParamError
from compressor.passes.slice import fold_norm, read_in_basis, write_in_basis

MIN_BLOCK = 16  # the fewest coordinates one Hadamard block may mix (widths with a smaller power-of-two factor: refused)


@dataclass
class RotateRun:
    """What rotation carries from layer to layer."""

    signs: torch.Tensor | None = None  # [D]: the residual stream's Hadamard (None: not rotated)

    def residual(self) -> Hadamard:
        """The residual stream's rotation."""
        return Hadamard(self.signs.numel(), self.signs)


@dataclass
class Rotate(LayerPass):
    """Rotate the residual stream, each attention head's values and the MLP writer's input by Hadamard matrices."""

    name: ClassVar[str] = "rotate"

    seed: int = 0
    residual: bool = True
    heads: bool = True
    online: bool = True
    fold_norms: bool | None = None  # None: the adapter's choice (rotate_folds_norms)

    def validate(self) -> None:
        if self.targets != ["Linear"] or self.ignore:
            raise ParamError("targets", "rotate changes the basis of every reader and writer of the residual stream; "
                                        "it takes no targets or ignore")
        if not (self.residual or self.heads or self.online):
            raise ParamError("residual", "residual, heads and online are all false: nothing to rotate")

    def check_model(self, model: PreTrainedModel, adapter: Adapter) -> None:
        if None in (adapter.attn_inputs, adapter.mlp_inputs, adapter.attn_output, adapter.mlp_output):
            raise CompressorError(f"rotate: the {adapter.name} adapter does not know which norms feed each layer's "
                                  "linears and which linears write the residual stream (its layers do not have the "
                                  "Llama layout), so the rotations cannot be folded into the weights")
        layer = adapter.decoder_layers(model)[0]
        if self.residual:
            norms = [adapter.attn_inputs[0], adapter.mlp_inputs[0], adapter.attn_output[1], adapter.mlp_output[1]]
            found = [(name, type(layer.get_submodule(name)).__name__) for name in norms if name is not None]
            if adapter.final_norm is None:
                raise CompressorError(f"rotate: the final norm of this {adapter.name} model was not found, and the "
                                      "head reads the residual stream through it; use rotate with residual: false")
            found += [(adapter.final_norm, type(model.get_submodule(adapter.final_norm)).__name__)]
            for name, kind in found:
                if "RMSNorm" not in kind:
                    raise CompressorError(
                        f"rotate: {name} is a {kind}, not an RMS norm; only an RMS norm computes the same on a rotated "
                        "residual stream (a LayerNorm subtracts the mean), so the residual stream of this model "
                        "cannot be rotated. Use rotate with residual: false (heads and online only)")
        widths = {"the residual stream": layer.get_submodule(adapter.attn_output[0]).out_features} if self.residual \
            else {}
        if self.heads:
            widths["an attention head"] = head_dim(model.config)
        if self.online:
            widths["down_proj's input"] = layer.get_submodule(adapter.mlp_output[0]).in_features
        for what, width in widths.items():
            if largest_power_of_two_dividing(width) < MIN_BLOCK:
                raise CompressorError(
                    f"rotate: the width of {what} is {width}, whose largest power-of-two factor is "
                    f"{largest_power_of_two_dividing(width)}: the fast Hadamard transform would mix fewer than "
                    f"{MIN_BLOCK} coordinates at a time, too few to spread large weights; leave it out of the rotation")
        if self.heads:
            attention = layer.get_submodule(adapter.attn_output[0].rpartition(".")[0])
            if hasattr(attention, "v_norm"):
                raise CompressorError("rotate: this model normalises each head's values (v_norm), which a rotation "
                                      "of the values does not commute with; use rotate with heads: false")

    def new_run(self) -> RotateRun:
        return RotateRun()

    def apply_layer(self, ctx: LayerContext, run: RotateRun) -> tuple[list[torch.Tensor], dict[str, dict], None]:
        model, adapter, index, layer = ctx.model, ctx.adapter, ctx.index, ctx.layer
        prefix = f"{adapter.layers}.{index}"
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index + 1)
        records, hidden = {}, ctx.hidden
        if self.residual:
            if index == 0:
                hidden = self._start(model, adapter, hidden, run)
            self._rotate_residual(layer, adapter, run.residual().to(ctx.device), prefix, records)
        if self.heads:
            self._rotate_heads(layer, adapter, head_dim(model.config), generator, ctx.device, prefix, records)
        if self.online:
            name = adapter.mlp_output[0]
            writer = layer.get_submodule(name)
            rotation = Hadamard.random(writer.in_features, generator).to(ctx.device)
            read_in_basis(writer, rotation.matrix())
            layer.set_submodule(name, RotatedInput(rotation, writer))
            records[f"{prefix}.{name}"] = {"pass": self.name, "rotated": "input, online",
                                           "runtime": layer.get_submodule(name).runtime_config()}
        return hidden, records, None

    def _start(self, model: PreTrainedModel, adapter: Adapter, hidden: list[torch.Tensor], run: RotateRun
               ) -> list[torch.Tensor]:
        """Before layer 0: draw the residual stream's Q and rotate the cached layer-0 inputs (the embeddings follow
        in `finish`, so that a resumed run, which starts from the original model, rotates them too)."""
        width = model.get_submodule(adapter.embeddings).weight.shape[1]
        rotation = Hadamard.random(width, torch.Generator().manual_seed(self.seed * 100_003))
        run.signs = rotation.signs
        for h in hidden:  # in place: a second copy of every window's hidden states would double their memory
            h.copy_(rotation(h))
        return hidden

    def _rotate_residual(self, layer: nn.Module, adapter: Adapter, rotation: Hadamard, prefix: str,
                         records: dict) -> None:
        """Fold the input norms into their readers (or keep their scales, `fold_norms`) and rotate the readers and
        writers of the stream."""
        Q = rotation.matrix()
        fold = adapter.rotate_folds_norms if self.fold_norms is None else self.fold_norms
        for norm_name, reader_names in (adapter.attn_inputs, adapter.mlp_inputs):
            readers = [layer.get_submodule(n) for n in reader_names]
            if fold:
                norm = fold_norm(layer.get_submodule(norm_name), readers, adapter.norm_offset)
            else:
                norm = RotatedNorm(Hadamard(rotation.width, rotation.signs), layer.get_submodule(norm_name),
                                   reads_rotated=True)
            layer.set_submodule(norm_name, norm)
            records[f"{prefix}.{norm_name}"] = {"pass": self.name, "runtime": norm.runtime_config()}
            for name, reader in zip(reader_names, readers, strict=True):
                read_in_basis(reader, Q)
                records[f"{prefix}.{name}"] = {"pass": self.name, "rotated": "input"}
        for writer_name, output_norm in (adapter.attn_output, adapter.mlp_output):
            if output_norm is None:
                write_in_basis(layer.get_submodule(writer_name), Q)
                records[f"{prefix}.{writer_name}"] = {"pass": self.name, "rotated": "output"}
            else:
                rotated = RotatedNorm(Hadamard(rotation.width, rotation.signs), layer.get_submodule(output_norm),
                                      reads_rotated=False)
                layer.set_submodule(output_norm, rotated)
                records[f"{prefix}.{output_norm}"] = {"pass": self.name, "runtime": rotated.runtime_config()}

    def _rotate_heads(self, layer: nn.Module, adapter: Adapter, size: int, generator: torch.Generator,
                      device: torch.device, prefix: str, records: dict) -> None:
        """Each head's values in the basis v_h H: v_proj rows H^T W_h, o_proj columns W_h H."""
        H = Hadamard.random(size, generator).matrix().to(device)  # [d_head, d_head]
        v_name = next(n for n in adapter.attn_inputs[1] if n.endswith("v_proj"))
        o_name = adapter.attn_output[0]
        v, o = layer.get_submodule(v_name), layer.get_submodule(o_name)
        with torch.no_grad():
            W = v.weight.double().reshape(-1, size, v.in_features)  # [kv heads, d_head, D]
            v.weight.copy_(torch.einsum("ji,hjd->hid", H, W).reshape(v.weight.shape).to(v.weight.dtype))
            if v.bias is not None:
                v.bias.copy_((v.bias.double().reshape(-1, size) @ H).reshape(-1).to(v.bias.dtype))
            W = o.weight.double().reshape(o.out_features, -1, size)  # [D, heads, d_head]
            o.weight.copy_((W @ H).reshape(o.weight.shape).to(o.weight.dtype))
        records.setdefault(f"{prefix}.{v_name}", {"pass": self.name})["heads"] = "output rows per head"
        records.setdefault(f"{prefix}.{o_name}", {"pass": self.name})["heads"] = "input columns per head"

    def finish(self, model: PreTrainedModel, adapter: Adapter, run: RotateRun) -> dict[str, dict]:
        """After the last layer: the embeddings write the rotated stream (E Q); the final norm works in the original
        basis and writes the rotated one; an untied head reads it (a tied head is E Q already)."""
        if not self.residual:
            return {}
        embeddings, head = model.get_submodule(adapter.embeddings), model.get_submodule(adapter.head)
        norm = model.get_submodule(adapter.final_norm)
        rotation = run.residual()
        Q = rotation.matrix()
        rotate_rows(embeddings.weight, Q)
        records = {adapter.embeddings: {"pass": self.name, "rotated": "output"}}
        if head.weight is not embeddings.weight:
            rotate_rows(head.weight, Q)
            records[adapter.head] = {"pass": self.name, "rotated": "input"}
        rotated = RotatedNorm(rotation.to(norm.weight.device), norm, reads_rotated=True)
        model.set_submodule(adapter.final_norm, rotated)
        records[adapter.final_norm] = {"pass": self.name, "runtime": rotated.runtime_config()}
        return records


@torch.no_grad()
def rotate_rows(weight: torch.Tensor, Q: torch.Tensor) -> None:
    """W [rows, D] <- W Q in place, a block of rows at a time (a vocabulary in float64 at once would take GBs)."""
    Q = Q.to(weight.device)
    for rows in weight.split(4096):
        rows.copy_((rows.double() @ Q).to(rows.dtype))


def head_dim(config) -> int:
    """The width of one attention head."""
    config = config.get_text_config()
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
