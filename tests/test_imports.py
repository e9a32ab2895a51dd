"""The persllm package's import graph has no circle.

Every source file is parsed (nothing is imported) and each `import` / `from ... import`, relative or absolute, at
module level or inside a function, becomes an edge to the persllm module it names. A package's `__init__` counts as
the package. `from package import name` points at `package.name` when that is a module, else at the package; the
parent packages Python initialises on the way to a module are not edges (every submodule would otherwise loop
through its package's `__init__`). Imports under `if TYPE_CHECKING:` are left out: they never run, so they cannot
make a runtime circle, and annotations are allowed to look up the graph. Imports inside functions do count: a lazy
import hides a circle from Python's loader, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import persllm

PACKAGE = Path(persllm.__file__).parent


def module_name(path: Path) -> str:
    """'persllm.eval.runner' for persllm/eval/runner.py, 'persllm.eval' for persllm/eval/__init__.py."""
    parts = ("persllm", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under `node` that can run (not in an `if TYPE_CHECKING:` body)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield from _runtime_imports(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _runtime_imports(child)


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The persllm module `name` refers to, or its nearest enclosing known module."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The persllm modules `module` imports at run time."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if target == "persllm" or target.startswith("persllm."):
                resolved = _resolve(target, known)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the persllm modules it imports."""
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "persllm.pipeline" in graph and "persllm.eval" in graph
    assert "persllm.workspace" in graph["persllm.pipeline"]


def test_relative_and_lazy_imports_are_edges(tmp_path: Path) -> None:
    known = {"persllm.a": tmp_path / "a" / "__init__.py", "persllm.a.b": tmp_path / "a" / "b.py",
             "persllm.c": tmp_path / "c.py", "persllm.d": tmp_path / "d.py"}
    source = ("from typing import TYPE_CHECKING\nfrom . import helper\nif TYPE_CHECKING:\n    from persllm import d\n"
              "def f():\n    from ..c import x\n")
    path = known["persllm.a.b"]
    path.parent.mkdir()
    path.write_text(source, encoding="utf-8")
    assert imports_of("persllm.a.b", path, known) == {"persllm.a", "persllm.c"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_only_the_cli_imports_the_pipeline() -> None:
    """The orchestrator sits on top: stages, eval, arena and serve read artifacts through the Workspace."""
    importers = sorted(name for name, targets in import_graph().items()
                       if "persllm.pipeline" in targets and name != "persllm.cli" and not name.startswith("persllm.cli."))
    assert importers == []
