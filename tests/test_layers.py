"""The layers of docs/architecture.md hold: no import points up a layer, none loops.

Imports are read with ``ast`` from the source files (every ``import`` and ``from ...
import``, inside functions too, since a lazy import is still a dependency), so the
test needs nothing imported. trio keeps a test of the same kind; this one is ours.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fanflow"

# What each layer may import besides itself (docs/architecture.md, "Layers").
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "engine": {"core"},
    "store": {"core"},
    "providers": {"core", "engine"},
    "testing": {"core", "engine"},
    "durability": {"core", "engine", "store"},
    "backends": {"core", "engine", "store", "durability"},
    "patterns": {"core", "engine", "store", "durability", "backends"},
    "interfaces": {
        "core",
        "engine",
        "store",
        "providers",
        "testing",
        "durability",
        "backends",
        "patterns",
    },
}

# Modules directly under fanflow/ and the layer each belongs to. A new module must be
# placed here (the test says so), which is the moment to decide where it belongs.
TOP_LEVEL: dict[str, str] = {
    "fanflow": "interfaces",
    "fanflow.__main__": "interfaces",
    "fanflow._types": "core",
    "fanflow._batchinfo": "core",
    "fanflow._exceptions": "core",
    "fanflow._checks": "core",
    "fanflow._util": "core",
    "fanflow._version": "core",
    "fanflow._pricing": "core",
    "fanflow._promptcache": "core",
    "fanflow._tokens": "core",
    "fanflow._events": "core",
    "fanflow.events": "core",
    "fanflow.errors": "core",
    "fanflow.limits": "engine",
    "fanflow.results": "interfaces",
    "fanflow.otel": "core",
    "fanflow._rate": "core",
    "fanflow._transport": "core",
    "fanflow._decide": "core",
    "fanflow._hedge": "core",
    "fanflow._gc": "core",
    "fanflow._retry": "core",
    "fanflow._sync": "core",
    "fanflow._log": "core",
    "fanflow._progress": "core",
    "fanflow._repr": "core",
    "fanflow._budget": "engine",
    "fanflow._cold": "engine",
    "fanflow._gate": "engine",
    "fanflow._meters": "engine",
    "fanflow._steer": "engine",
    "fanflow._limits": "engine",
    "fanflow._leases": "engine",
    "fanflow._llm": "engine",
    "fanflow._batchapi": "engine",
    "fanflow._engine": "engine",
    "fanflow._breaker": "engine",
    "fanflow._router": "engine",
    "fanflow.routing": "interfaces",
    "fanflow._durable": "durability",
}

SUBPACKAGES: dict[str, str] = {
    "fanflow.cli": "interfaces",
    "fanflow._shared": "engine",
    "fanflow.patterns": "patterns",
    "fanflow.backends": "backends",
    "fanflow.providers": "providers",
    "fanflow.store": "store",
    "fanflow.testing": "testing",
}


def layer_of(module: str) -> str:
    for package, layer in SUBPACKAGES.items():
        if module == package or module.startswith(package + "."):
            return layer
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    raise LookupError(
        f"{module} is in no layer; add it to TOP_LEVEL in tests/test_layers.py and to "
        "docs/architecture.md"
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(
    module: str, source: str, is_package: bool, known: set[str]
) -> Iterator[tuple[str, bool]]:
    """(fanflow module imported, whether the import runs only under TYPE_CHECKING)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                typing_only.update(id(n) for n in ast.walk(child))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` / ``from .pkg import mod``: x may be a module itself;
            # then the import is of x (its package is imported first in any case).
            submodules = [f"{target}.{a.name}" for a in node.names]
            submodules = [name for name in submodules if name in known]
            targets = submodules if len(submodules) == len(node.names) else [target]
        for target in targets:
            if target == "fanflow" or target.startswith("fanflow."):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]  # fanflow.x.Name -> fanflow.x
                yield target, id(node) in typing_only


def import_graph() -> dict[str, set[tuple[str, bool]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[tuple[str, bool]]] = {}
    for module, path in files.items():
        edges = imports_of(module, path.read_text(), path.name == "__init__.py", known)
        graph[module] = {(t, typing) for t, typing in edges if t != module}
    return graph


def upward_imports(graph: Mapping[str, set[tuple[str, bool]]]) -> list[str]:
    """Every import from a layer to one it may not use (type-only imports count too)."""
    bad = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module)
        for target, _ in sorted(edges):
            theirs = layer_of(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return bad


def cycles(graph: Mapping[str, set[tuple[str, bool]]]) -> list[list[str]]:
    """Import loops among modules (Tarjan's strongly connected components). Imports
    under ``if TYPE_CHECKING:`` are left out: they never run, so cannot loop."""
    runtime = {m: sorted(t for t, typing in edges if not typing) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in runtime.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(runtime):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    for module in graph:
        layer_of(module)  # raises with the fix for a module in no layer


def test_no_import_points_up_a_layer() -> None:
    graph = import_graph()
    assert ("fanflow._engine", False) in graph["fanflow.backends._local"]  # it sees imports
    assert upward_imports(graph) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_nothing_imports_the_cli() -> None:
    graph = import_graph()
    users = sorted(
        m
        for m, edges in graph.items()
        if not m.startswith("fanflow.cli") and m != "fanflow.__main__"
        for t, _ in edges
        if t.startswith("fanflow.cli")
    )
    assert users == []


# The checks themselves: each one catches what it is for.


def test_the_checks_catch_an_upward_import_and_a_loop() -> None:
    graph: dict[str, set[tuple[str, bool]]] = {
        "fanflow._engine": {("fanflow.patterns._map", False)},  # engine -> patterns: up
        "fanflow.patterns._map": {("fanflow._engine", False)},
        "fanflow.store._sqlite": {("fanflow._durable", True)},  # type-only, still up
        "fanflow._durable": set(),
    }
    assert upward_imports(graph) == [
        "fanflow._engine (engine) imports fanflow.patterns._map (patterns)",
        "fanflow.store._sqlite (store) imports fanflow._durable (durability)",
    ]
    assert cycles(graph) == [["fanflow._engine", "fanflow.patterns._map"]]
    graph["fanflow._engine"] = {("fanflow.patterns._map", True)}  # type-only: no loop
    assert cycles(graph) == []


def test_imports_are_read_from_source_relative_lazy_and_type_only() -> None:
    known = {"fanflow", "fanflow.backends", "fanflow.backends._ray", "fanflow._types"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .. import _types\n"
        "if TYPE_CHECKING:\n"
        "    from ._ray import RayMapRun\n"
        "def f():\n"
        "    import fanflow.backends._ray\n"
    )
    got = set(imports_of("fanflow.backends._config", source, False, known))
    assert got == {
        ("fanflow._types", False),
        ("fanflow.backends._ray", True),
        ("fanflow.backends._ray", False),
    }


def test_a_module_in_no_layer_is_named_with_the_fix() -> None:
    with pytest.raises(LookupError, match=r"fanflow\._new is in no layer; add it to TOP_LEVEL"):
        layer_of("fanflow._new")
