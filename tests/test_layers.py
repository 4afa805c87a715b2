"""Imports run one way: cli -> api -> (engine, resume, distributed, recipe, checkpoint, perplexity, exports)
-> passes -> (models, data) -> nn -> (formats, gguf_blocks, checkpoint_format, errors, runtime, kernels). A module
may import from its own level or below, never above, and no group of modules imports itself round in a cycle."""

import ast
from pathlib import Path

import compressor

PACKAGE = Path(compressor.__file__).parent
LEVELS = [
    ("compressor.errors", "compressor.checkpoint_format", "compressor.formats", "compressor.gguf_blocks",
     "compressor.runtime", "compressor.kernels"),
    ("compressor.nn",),
    ("compressor.models", "compressor.data"),
    ("compressor.passes",),
    ("compressor.engine", "compressor.resume", "compressor.distributed", "compressor.recipe", "compressor.checkpoint",
     "compressor.perplexity", "compressor.export", "compressor.export_gguf"),
    ("compressor.api",),
    ("compressor.cli", "compressor"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    """The level of the longest prefix of `module` that LEVELS names (the package itself only by its own name)."""
    best = max((prefix for lv in LEVELS for prefix in lv
                if module == prefix or (prefix != "compressor" and module.startswith(prefix + "."))), key=len)
    return next(i for i, lv in enumerate(LEVELS) if best in lv)


def imports() -> dict[str, set[str]]:
    """Each compressor module's imports of other compressor modules, function-level imports included."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compressor"):
                found |= {f"{node.module}.{a.name}" if (PACKAGE.parent / node.module.replace(".", "/") / a.name)
                          .with_suffix(".py").exists() else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("compressor")}
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def test_every_module_has_a_level():
    for module in imports():
        level(module)


def test_no_import_runs_up():
    upward = [(a, b) for a, targets in imports().items() for b in targets if level(b) > level(a)]
    assert not upward, f"imports that run up a level: {upward}"


def test_no_import_cycles():
    graph = imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cyclic = sorted(m for m in graph if reaches(m, m, set()))
    assert not cyclic, f"modules on an import cycle: {cyclic}"
