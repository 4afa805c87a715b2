"""Recipe: what to compress, with what data, by which passes, to where. Loaded from YAML or a dict.

Every error names the file, the key path, the bad value and what is allowed.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressor.errors import CompressorError
from compressor.passes import PASSES, ParamError, Pass


class RecipeError(CompressorError):
    pass


@dataclass
class Calibration:
    dataset: str = "bundled:wikileads"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"


@dataclass
class Perplexity:
    dataset: str = "bundled:wikileads"
    seqlen: int = 2048
    windows: int | None = None  # None: the full eval split


@dataclass
class Export:
    output: str  # the exported folder (a .gguf file for gguf)
    format: str = "compressed-tensors"
    dense_fallback: bool = False
    dtype: str | None = None  # compressed-tensors: None is the checkpoint's
    embedding_type: str = "auto"  # gguf: the embeddings' and head's types (compressor/export_gguf.py)
    head_type: str = "auto"


EXPORT_FORMATS = ("compressed-tensors", "gguf")


@dataclass
class Recipe:
    model: str
    passes: list[Pass]
    output: str | None = None
    calibration: Calibration = field(default_factory=Calibration)
    evaluate: Perplexity | None = None
    export: Export | None = None  # also write the checkpoint in another format
    device: str = "auto"
    dtype: str = "float32"
    source: str = "<dict>"  # where the recipe came from, for messages
    raw: dict = field(default_factory=dict)  # the recipe as written, kept with the checkpoint

    def resolved(self) -> dict:
        """The recipe with every default filled in, as stored in the checkpoint."""
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "calibration": dataclasses.asdict(self.calibration),
            "passes": [{p.name: dataclasses.asdict(p)} for p in self.passes],
            "output": self.output,
            "evaluate": {"perplexity": dataclasses.asdict(self.evaluate)} if self.evaluate else None,
            "export": dataclasses.asdict(self.export) if self.export else None,
        }


DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = {"model", "passes", "output", "calibration", "evaluate", "export", "device", "dtype"}


def load_recipe(recipe: "str | Path | dict | Recipe") -> Recipe:
    """Parse and validate a recipe from a YAML path, a dict, or pass a Recipe through."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<dict>")
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, str(path))


def parse_recipe(data: Any, source: str) -> Recipe:
    def fail(key: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{source}: {key}: {message}")

    if not isinstance(data, dict):
        fail("(top level)", f"expected a mapping of {sorted(TOP_KEYS)}, got {type(data).__name__}")
    _reject_unknown(data, TOP_KEYS, "(top level)", fail)
    for key in ("model", "passes"):
        if key not in data:
            fail(key, "missing; a recipe needs `model` and `passes`")
    model = _typed(data["model"], str, "model", fail)
    device = _typed(data.get("device", "auto"), str, "device", fail)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        fail("device", f"got {device!r}; allowed: auto, cpu, cuda, cuda:N")
    dtype = _typed(data.get("dtype", "float32"), str, "dtype", fail)
    if dtype not in DTYPES:
        fail("dtype", f"got {dtype!r}; allowed: {', '.join(DTYPES)}")
    output = data.get("output")
    if output is not None:
        output = _typed(output, str, "output", fail)

    calibration = _dataclass_from(Calibration, data.get("calibration") or {}, "calibration", fail)
    for key in ("samples", "seqlen"):
        if getattr(calibration, key) <= 0:
            fail(f"calibration.{key}", f"got {getattr(calibration, key)}; must be a positive integer")

    evaluate = None
    if data.get("evaluate"):
        spec = data["evaluate"]
        if not isinstance(spec, dict):
            fail("evaluate", "expected a mapping such as {perplexity: {windows: 16}}")
        _reject_unknown(spec, {"perplexity"}, "evaluate", fail)
        evaluate = _dataclass_from(Perplexity, spec.get("perplexity") or {}, "evaluate.perplexity", fail)
        if evaluate.seqlen <= 1 or (evaluate.windows is not None and evaluate.windows <= 0):
            fail("evaluate.perplexity", "seqlen must be > 1 and windows (when given) > 0")

    export = None
    if data.get("export") is not None:
        if not isinstance(data["export"], dict) or "output" not in data["export"]:
            fail("export", "expected a mapping such as {format: compressed-tensors, output: out/model-ct}")
        export = _dataclass_from(Export, data["export"], "export", fail)
        if export.format not in EXPORT_FORMATS:
            fail("export.format", f"got {export.format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
        if export.dtype is not None and export.dtype not in DTYPES:
            fail("export.dtype", f"got {export.dtype!r}; allowed: {', '.join(DTYPES)}")
        if output is None or Path(export.output).resolve() == Path(output).resolve():
            fail("export.output", "export writes the saved checkpoint in another format: give the recipe an "
                                  "`output` for the checkpoint and export a different folder")

    passes = data["passes"]
    if not isinstance(passes, list) or not passes:
        fail("passes", "expected a non-empty list such as [{magnitude: {sparsity: 0.5}}]")
    parsed = [_parse_pass(entry, f"passes[{i}]", fail) for i, entry in enumerate(passes)]
    _check_rotate_order(parsed, fail)
    return Recipe(model=model, passes=parsed, output=output, calibration=calibration, evaluate=evaluate,
                  export=export, device=device, dtype=dtype, source=source, raw=data)


def _check_rotate_order(passes: list[Pass], fail) -> None:
    """`rotate` changes the basis the passes after it see, so it comes first, and not with the passes that choose a
    basis or fold scales into the norms it removes."""
    names = [p.name for p in passes]
    if "rotate" not in names:
        return
    i = names.index("rotate")
    if i > 0:
        fail(f"passes[{i}]", f"rotate must come first: it rotates the weights {names[0]} works on; move it to the top")
    for j, name in enumerate(names):
        if name == "slice" and passes[i].residual:
            fail(f"passes[{j}]", "slice puts the residual stream in its own basis (its principal axes, which a "
                                 "rotation before it leaves as they are): use slice, or rotate with residual: false")
        if name == "awq":
            fail(f"passes[{j}]", "awq scales the norms and the down_proj input that rotate folds away or rotates "
                                 "online; use one of awq and rotate")


def _parse_pass(entry: Any, where: str, fail) -> Pass:
    if not (isinstance(entry, dict) and len(entry) == 1):
        fail(where, f"expected one mapping `name: {{params}}`, got {entry!r}")
    (name, params), = entry.items()
    if name not in PASSES:
        fail(where, f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    pass_ = _dataclass_from(PASSES[name], params or {}, f"{where}.{name}", fail)
    try:
        pass_.validate()
    except ParamError as e:
        fail(f"{where}.{name}.{e.key}", str(e))
    return pass_


def _dataclass_from(cls: type, values: Any, where: str, fail):
    if not isinstance(values, dict):
        fail(where, f"expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _reject_unknown(values, set(fields), where, fail)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _is_instance(value, hints[key]):
            fail(f"{where}.{key}", f"got {value!r}; expected {_type_name(hints[key])}")
    return cls(**values)


def _reject_unknown(values: dict, allowed: set, where: str, fail) -> None:
    unknown = sorted(set(values) - allowed, key=str)
    if unknown:
        fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")


def _typed(value: Any, kind: type, key: str, fail):
    if not _is_instance(value, kind):
        fail(key, f"got {value!r}; expected {_type_name(kind)}")
    return value


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {float: "a number", int: "an integer", str: "a string", bool: "true/false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
