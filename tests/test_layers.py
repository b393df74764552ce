"""The package's layers (docs/DESIGN.md): every import, including those inside functions,
points down or within its layer, never up; no module imports itself back through others; no
source file grows past 600 lines; the benchmarks import neither each other nor tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_flash"

# bottom to top; a module may import only from its own layer or those below it
LAYERS = [
    ["_version", "errors", "sysmem", "eviction", "kernels", "argtypes"],
    ["bundle", "bundle_writer"],
    ["arch", "sources", "hub", "expert_index", "gguf_index"],
    ["neuron_matrix", "flash_io", "piece_io", "neuron_cache", "selection"],
    ["memory"],
    ["engine", "ffn", "moe"],
    ["loader", "pipeline"],
    ["convert", "convert_moe", "calibrate", "evaluate", "paths", "disk_probe"],
    ["api", "__init__", "cli", "generate", "chat", "server", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def top_module(path: Path) -> str:
    """The layer name of a package file: its first component under mlx_flash/."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module under mlx_flash imported) for every import in the file, at any depth."""
    return imports_in(path.read_text(), path.relative_to(ROOT).with_suffix("").parts[:-1])


def imports_in(text: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """The same for source `text` of a module in `package` (its path parts)."""
    tree = ast.parse(text)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - (node.level - 1)])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module:
                parts = node.module.split(".")
            else:
                continue
            if parts[0] != "mlx_flash":
                continue
            if len(parts) == 1:  # `from . import x`: the modules named
                found += [(node.lineno, a.name) for a in node.names]
            else:
                found.append((node.lineno, parts[1]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("mlx_flash.")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = {top_module(p) for p in SOURCES} - LAYER.keys()
    assert not unplaced, f"modules missing from LAYERS: {sorted(unplaced)}"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_no_upward_import(path: Path) -> None:
    me = top_module(path)
    upward = [f"line {line}: {me} (layer {LAYER[me]}) imports {target} (layer {LAYER[target]})"
              for line, target in imports_of(path)
              if target in LAYER and LAYER[target] > LAYER[me]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    """Between top-level modules (a package's files count as the package)."""
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        me = top_module(path)
        graph.setdefault(me, set()).update(t for _, t in imports_of(path)
                                           if t in LAYER and t != me)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_check_sees_every_import() -> None:
    """Relative, absolute and package imports, inside functions too."""
    text = ("from .errors import BundleError\n"
            "def f():\n    from .loader import open_model\n    import mlx_flash.cli\n"
            "    from . import api\n    from ..bundle import Bundle\n")
    assert [t for _, t in imports_in(text, ("mlx_flash", "arch"))] == [
        "arch", "arch", "cli", "arch", "bundle"]
    assert [t for _, t in imports_in(text, ("mlx_flash",))][:4] == [
        "errors", "loader", "cli", "api"]


def test_no_source_file_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("script", ["bench.py", "bench_moe.py"])
def test_benchmarks_import_neither_each_other_nor_tests(script: str) -> None:
    path = ROOT / "tools" / script
    if not path.exists():
        pytest.skip(f"tools/{script} is gone")
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    other = {"bench", "bench_moe"} - {script.removesuffix(".py")}
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    assert not names & (other | test_modules | {"tests"}), sorted(names & (other | test_modules))
