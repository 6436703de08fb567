"""The package's layers import only downward, with no cycles, lazy imports included.

Reads every module's source with :mod:`ast` (so imports inside functions and under
``TYPE_CHECKING`` count, as they would for a reader), resolves each import to a module
of the package, and checks three rules that docs/design.md states:

* a module imports only from its own layer or the layers below it;
* the module graph has no cycle;
* ``wire/`` (sans-IO codecs) imports no I/O: no sockets, threads, trio or processes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import holepunch_mig

PACKAGE_DIR = Path(holepunch_mig.__file__).resolve().parent

#: bottom to top; a module may import its own layer's modules and anything lower
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "report", "roles"),
    ("wire",),
    ("net",),
    ("session",),
    ("testing",),
    ("migration",),
    ("lab",),
    ("bench",),
    ("cli",),
    ("__init__",),  # the public facade: nothing inside the package imports it
)

IO_MODULES = frozenset(
    {"socket", "select", "selectors", "threading", "queue", "trio", "asyncio", "subprocess"}
    | {"ifaddr", "multiprocessing", "concurrent"}
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR).with_suffix("")
    parts = ["holepunch_mig", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if key in names:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add its top-level name to LAYERS")


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> Iterator[str]:
    """The package modules one import statement loads (names, not packages, win)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("holepunch_mig"):
                yield alias.name
        return
    if node.level:
        is_package = MODULES[importer].name == "__init__.py"
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    if not target.startswith("holepunch_mig"):
        return
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        yield submodule if submodule in MODULES else target


def _imports(module: str) -> dict[str, int]:
    """Package modules imported by ``module`` -> first line number."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _resolve(module, node):
                if target in MODULES and target != module:
                    found.setdefault(target, node.lineno)
    return found


def _third_party(module: str) -> dict[str, int]:
    tree = ast.parse(MODULES[module].read_text())
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module.split(".")[0], node.lineno)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down() -> None:
    upward = [
        f"{MODULES[m].relative_to(PACKAGE_DIR)}:{line} imports {target}"
        for m, targets in GRAPH.items()
        for target, line in targets.items()
        if _layer(target) > _layer(m)
    ]
    assert upward == [], "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("holepunch_mig.wire")))
def test_wire_does_no_io(module: str) -> None:
    io = {name: line for name, line in _third_party(module).items() if name in IO_MODULES}
    assert io == {}, f"{module} imports I/O modules (line numbers): {io}"


def test_lazy_and_relative_imports_are_resolved() -> None:
    """The reader must see function-level and relative imports, or the rules prove nothing."""
    source = "def f():\n    from .wire import messages\n    from ..net import control\n"
    tree = ast.parse(source)
    fake = "holepunch_mig.session.negotiate"
    got = [t for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for t in _resolve(fake, n)]
    assert got == ["holepunch_mig.session.wire", "holepunch_mig.net.control"]
