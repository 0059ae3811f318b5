"""Imports run one way: the import graph of ``dst_kernels/`` and ``benchmarks/`` has no circle.

The graph is read from the source (AST): every ``import`` and ``from ... import`` anywhere in a
file, lazy imports inside functions included. A node is a module (a file); ``from a.b import c``
is an edge to ``a.b.c`` when that is a module, else to ``a.b``. A package's ``__init__`` is a
node of its own: it is the public face that re-exports its modules, so importing
``a.b.c`` is an edge to ``a.b.c`` only.

The layers, bottom up (docs/architecture.md):

    _checks, _ops, _dtensor, regulariser, reference, triton/*      (ops and their kernels)
    functional                                                     (backend dispatch)
    nn/* (layers)                                                  (modules)
    convert, controller, report, distributed, export/*, sparse    (model-level tools)
    dst_kernels (the package's public face), nn (its face), train/*, benchmarks/*
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("dst_kernels", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


# Compiled modules: nodes with no imports of their own.
EXTENSIONS = ("dst_kernels._C",)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for tree in TREES for p in sorted((ROOT / tree).rglob("*.py"))}


def _known() -> set[str]:
    return set(_modules()) | set(EXTENSIONS)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules of the two trees it imports}}``."""
    modules = _modules()
    known = _known()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()

# Below the dispatcher: the ops, their checks and kernels, the maths they share.
BELOW_FUNCTIONAL = (
    "dst_kernels._checks",
    "dst_kernels._ops",
    "dst_kernels._dtensor",
    "dst_kernels.native",
    "dst_kernels.reference",
    "dst_kernels.regulariser",
    "dst_kernels.triton",
)
# What they must not import: the dispatcher and everything above it.
ABOVE_OPS = (
    "dst_kernels.functional",
    "dst_kernels.nn",
    "dst_kernels.convert",
    "dst_kernels.controller",
    "dst_kernels.report",
    "dst_kernels.distributed",
    "dst_kernels.export",
    "dst_kernels.sparse",
    "dst_kernels.train",
    "dst_kernels.integrations",
)


def test_the_graph_is_read():
    assert "dst_kernels.functional" in GRAPH and "benchmarks.harness" in GRAPH
    assert "dst_kernels.functional" in GRAPH["dst_kernels.nn.linear"]
    assert len(GRAPH) > 30


def test_no_import_circle():
    circles = strongly_connected(GRAPH)
    assert not circles, "import circles (each a strongly connected component): " + "; ".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_check_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _under(m, BELOW_FUNCTIONAL)))
def test_nothing_below_functional_imports_it_or_what_is_above(module):
    bad = sorted(t for t in GRAPH[module] if _under(t, ABOVE_OPS))
    assert not bad, f"{module} imports {bad} (a layer above it)"


def test_functional_imports_only_the_ops():
    bad = sorted(t for t in GRAPH["dst_kernels.functional"] if _under(t, ABOVE_OPS[1:]))
    assert not bad, f"dst_kernels.functional imports {bad}"


@pytest.mark.parametrize(
    "module", sorted(m for m in GRAPH if _under(m, ("dst_kernels.nn",)) and m != "dst_kernels.nn")
)
def test_layers_import_no_model_level_tool(module):
    bad = sorted(t for t in GRAPH[module] if _under(t, ABOVE_OPS[2:]) or t == "dst_kernels.nn")
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize(
    "module",
    sorted(m for m in GRAPH if m.startswith("dst_kernels") and not _under(m, ("dst_kernels.train",))),
)
def test_the_library_never_imports_the_training_command(module):
    bad = sorted(t for t in GRAPH[module] if _under(t, ("dst_kernels.train",)))
    assert not bad, f"{module} imports {bad}: the library must not depend on dst-train"


LIBRARY = sorted(m for m in GRAPH if m.startswith("dst_kernels.") and not _under(m, ("dst_kernels.train",)))


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_does_not_import_its_public_face(module):
    """``import dst_kernels`` inside the library would import everything from everywhere (the
    training command and the benchmarks are its users: they may)."""
    assert "dst_kernels" not in GRAPH[module], f"{module} imports the package itself"


def test_the_core_package_needs_only_torch():
    """numpy, tqdm and matplotlib are the ``train`` extra's: nothing outside train/ imports them."""
    extras = ("numpy", "tqdm", "matplotlib", "scipy", "pandas")
    for name, path in _modules().items():
        if not name.startswith("dst_kernels") or _under(
            name, ("dst_kernels.train", "dst_kernels.integrations")
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            bad = [m for m in mods if m.split(".")[0] in extras]
            assert not bad, f"{name} imports {bad}: only the train extra may"
