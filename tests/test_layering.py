"""The data flow is one-way: module -> functional (dispatch) -> op (native / triton / reference)
-> kernel. Nothing below functional imports it (or the modules above it), so there is no import
circle between the dispatcher and a backend."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dst_kernels"
# Modules below the dispatcher, and what they must not import.
BELOW_FUNCTIONAL = ["_checks.py", "_ops.py", "native.py", "reference.py", "triton"]
ABOVE = {"dst_kernels.functional", "dst_kernels.nn", "dst_kernels.export", "dst_kernels.train"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", BELOW_FUNCTIONAL)
def test_backends_do_not_import_the_dispatcher_or_modules(entry):
    for path in _files(entry):
        bad = {name for name in _imports(path) if any(name == a or name.startswith(a + ".") for a in ABOVE)}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)} (a layer above it)"


def test_functional_does_not_import_modules():
    bad = {
        n
        for n in _imports(PACKAGE / "functional.py")
        if n.startswith(("dst_kernels.nn", "dst_kernels.train"))
    }
    assert not bad, f"functional imports {sorted(bad)}"
