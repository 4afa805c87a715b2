"""A run's finished decoder layers kept on disk, so that a run killed at any point restarts where it stopped.

While a recipe with an `output` compresses, the folder `.NAME.partial` beside the output holds:

    progress.json          what the run is (the resolved recipe and the model source), how many decoder layers
                           are done, the records so far, and the plain values the passes carry between layers
    layer-I.safetensors    decoder layer I as compressed, one file per finished layer (its tensors under their
                           names in the model, as a checkpoint's shard holds them)
    carried-I.safetensors  after layer I: the next layer's inputs (one tensor per calibration window) and the
                           tensors the passes carry between layers (lrec_refine's dense hidden states, slicing's
                           basis)

Every file is written under a temporary name and renamed; progress.json goes last and names the layers done,
and the previous layer's carried file is removed only after it, so a run killed at any moment leaves the state
after some whole layer, never a mix. `compress run --resume` (compressor.compress(...,
resume=True)) checks that the folder belongs to the same recipe and model, rebuilds the finished layers from
their records and tensors (as loading a checkpoint does), and goes on with the next layer; the checkpoint it
writes equals an uninterrupted run's. The folder is removed once the checkpoint is saved; a run without
--resume refuses to start while it exists, unless --overwrite (then it starts over and replaces it).
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.errors import CompressorError
from compressor.nn import rebuild


class Progress:
    """The partial-run folder of one output: what `compress_model` saves after each layer and resumes from."""

    def __init__(self, folder: Path, identity: dict, layers: str = "model.layers"):
        self.folder = folder
        self.layers = layers  # the decoder layers' name in the model (Adapter.layers)
        self.state = {"identity": identity, "layers_done": 0, "records": {}, "runs": {}}

    @classmethod
    def open(cls, output: str | Path, identity: dict, resume: bool, overwrite: bool = False,
             layers: str = "model.layers") -> "Progress":
        """The folder for `output`: read back with `resume` (refused when missing or made by another run),
        otherwise started empty; an interrupted run found there is refused unless `overwrite` (then removed)."""
        out = Path(output)
        progress = cls(out.with_name(f".{out.name}.partial"), identity, layers)
        saved = progress.folder / "progress.json"
        if not resume:
            if saved.is_file() and not overwrite:
                raise CompressorError(f"an interrupted run of this output is kept in {progress.folder}: --resume goes "
                                      "on from it, --overwrite starts over (and removes it)")
            shutil.rmtree(progress.folder, ignore_errors=True)
            return progress
        if not saved.is_file():
            raise CompressorError(f"--resume: no interrupted run of this output to resume ({progress.folder} does not "
                                  "exist); run without --resume")
        progress.state = json.loads(saved.read_text())
        if progress.state["identity"] != identity:
            differs = sorted(k for k in identity if identity[k] != progress.state["identity"].get(k))
            raise CompressorError(f"--resume: the interrupted run in {progress.folder} was made with another "
                                  f"{' and '.join(differs)}; run with --overwrite instead of --resume to start over "
                                  "(the interrupted run is then removed)")
        return progress

    @property
    def layers_done(self) -> int:
        return self.state["layers_done"]

    def save_layer(self, index: int, layer: nn.Module, records: dict[str, list[dict]], hidden: list[torch.Tensor],
                   runs: dict[int, Any]) -> None:
        """Keep decoder layer `index` as compressed, the records so far, the next layer's inputs and the passes'
        carried state; the layer counts as done once this returns. A write that fails (a full disk) leaves the
        previous layer's state as it was and stops the run with a message."""
        carried = {f"hidden.{j}": h for j, h in enumerate(hidden)}
        plain = {}
        for k, run in runs.items():
            tensors, plain[str(k)] = split_run(run)
            carried |= {f"run.{k}.{name}": t for name, t in tensors.items()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_tensors(self.layer_file(index).name,
                                {f"{self.layers}.{index}.{k}": t.clone() for k, t in layer.state_dict().items()})
            self._write_tensors(f"carried-{index}.safetensors", carried)
            tmp = self.folder / "progress.json.tmp"
            tmp.write_text(json.dumps(self.state | {"layers_done": index + 1, "records": records, "runs": plain}))
            os.replace(tmp, self.folder / "progress.json")
            (self.folder / f"carried-{index - 1}.safetensors").unlink(missing_ok=True)
        except OSError as error:
            raise CompressorError(f"could not keep decoder layer {index} in {self.folder} ({error}); the layers "
                                  f"before it are kept: free space and run again with --resume") from None
        self.state |= {"layers_done": index + 1, "records": records, "runs": plain}

    def layer_file(self, index: int) -> Path:
        return self.folder / f"layer-{index}.safetensors"

    def restore(self, model: nn.Module, layers: nn.ModuleList, runs: dict[int, Any], load_layers: bool = True
                ) -> tuple[dict[str, list[dict]], list[torch.Tensor]]:
        """Put the finished layers into `model` (rebuilt from their records, then their tensors; left out with
        `load_layers` False, as a streamed run does, whose checkpoint is made of the files), the passes' carried
        state into `runs` (in place); return the records so far and the next layer's inputs."""
        records = self.state["records"]
        if load_layers:
            rebuild(model, records, model.dtype)
            for i in range(self.layers_done):
                prefix = f"{self.layers}.{i}."
                tensors = load_file(self.layer_file(i))
                layers[i].load_state_dict({k.removeprefix(prefix): t for k, t in tensors.items()}, strict=True)
        carried = load_file(self.folder / f"carried-{self.layers_done - 1}.safetensors")
        hidden = [carried[f"hidden.{j}"] for j in range(sum(k.startswith("hidden.") for k in carried))]
        for k, run in runs.items():
            tensors = {name[len(f"run.{k}."):]: t for name, t in carried.items() if name.startswith(f"run.{k}.")}
            join_run(run, tensors, self.state["runs"][str(k)])
        return records, hidden

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / f"{name}.tmp"
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, tmp)
        os.replace(tmp, self.folder / name)


def split_run(run: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """A pass's carried state (a dataclass, or None) as tensors (a tensor field, or each tensor of a list field,
    `field.j`) and plain JSON values (the rest; a list of tensors as its length)."""
    tensors, plain = {}, {}
    for field in dataclasses.fields(run) if run is not None else ():
        value = getattr(run, field.name)
        if isinstance(value, torch.Tensor):
            tensors[field.name] = value
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            tensors |= {f"{field.name}.{j}": v for j, v in enumerate(value)}
            plain[field.name] = {"tensors": len(value)}
        else:
            plain[field.name] = value
    return tensors, plain


def join_run(run: Any, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """The inverse of split_run, into `run` in place."""
    for field in dataclasses.fields(run) if run is not None else ():
        value = plain.get(field.name)
        if field.name in tensors:
            value = tensors[field.name]
        elif isinstance(value, dict) and "tensors" in value:
            value = [tensors[f"{field.name}.{j}"] for j in range(value["tensors"])]
        setattr(run, field.name, value)
