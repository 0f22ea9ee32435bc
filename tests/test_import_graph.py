"""The package's import graph has no cycle, and its layers hold: every import of a sparsetune module, at module
level or inside a function, is an edge (a function-level import only postpones a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparsetune"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules `tree` imports anywhere. `from a import b` is an edge to a.b when that is a module
    (a submodule import), else to a; relative imports are resolved against `name`."""

    def known(target: str) -> str | None:
        while target and target not in modules:  # `import a.b.c` of a name inside a module: its longest module
            target = target.rpartition(".")[0]
        return target or None

    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(t for alias in node.names if (t := known(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            for alias in node.names:
                target = known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else known(base)
                if target:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {
        name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search with three colours, iterative (no recursion
    limit), visiting nodes and edges in sorted order so the reported cycle is stable."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None  # a diamond is no cycle


def test_graph_resolves_relative_function_level_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    from pkg.sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from ..a import f\n")
    (pkg / "sub" / "b.py").write_text("import pkg.a.f\nfrom . import missing_name\n")
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": {"pkg.a"},
        "pkg.sub.b": {"pkg.a", "pkg.sub"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_sparsetune_has_no_import_cycle():
    graph = import_graph()
    assert "sparsetune.cli.app" in graph and "sparsetune.pipeline" in graph["sparsetune.cli.run"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# (importer, imported): regexes over module names; no edge may go from a match of the first to one of the second.
# Loading and model structure sit below export and training (the formats those write register with
# `input_formats` instead); SEFT's sparse deltas choose their targets through `structure`, not the prune library;
# the multi-process helpers resolve devices below loading.
LOADING = r"sparsetune\.(loading|structure|input_formats|devices|streaming|stream_inputs)"
FORBIDDEN = (
    (LOADING, r"sparsetune\.(train|export)(\..+)?"),
    (r"sparsetune\.train\.sparse_delta(\..+)?", r"sparsetune\.prune(\..+)?"),
    (r"sparsetune\.distributed", r"sparsetune\.(loading|structure)"),
)


def layer_violations(graph: dict[str, set[str]], rules=FORBIDDEN) -> list[str]:
    """Each edge some rule forbids, as "importer -> imported"."""
    return sorted(
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        for importer, imported in rules
        if re.fullmatch(importer, src) and re.fullmatch(imported, dst)
    )


def test_layer_check_finds_a_forbidden_edge_and_only_that():
    graph = {
        "sparsetune.loading": {"sparsetune.devices", "sparsetune.export.formats"},
        "sparsetune.export.writer": {"sparsetune.loading"},
        "sparsetune.train.sparse_delta.method": {"sparsetune.structure", "sparsetune.prune.api"},
        "sparsetune.train.smet": {"sparsetune.prune.engine"},  # above sparse_delta: allowed
        "sparsetune.distributed": {"sparsetune.devices"},
        "sparsetune.streaming_extra": {"sparsetune.train"},  # not a loading module (full names only)
    }
    assert layer_violations(graph) == [
        "sparsetune.loading -> sparsetune.export.formats",
        "sparsetune.train.sparse_delta.method -> sparsetune.prune.api",
    ]
    assert layer_violations({"sparsetune.distributed": {"sparsetune.loading"}}) == [
        "sparsetune.distributed -> sparsetune.loading"
    ]


def test_sparsetune_layers_hold():
    graph = import_graph()
    assert {"sparsetune.loading", "sparsetune.structure", "sparsetune.train.sparse_delta.method"} <= set(graph)
    violations = layer_violations(graph)
    assert not violations, "imports across layers: " + ", ".join(violations)
