"""Ray and Hydra stay at the edges: only fcas/pipeline may import them (docs/architecture.md)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fcas"
EDGE = PKG / "pipeline"
FORBIDDEN = {"ray", "hydra"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


LIBRARY_MODULES = sorted(p for p in PKG.rglob("*.py") if EDGE not in p.parents)


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_library_module_imports_neither_ray_nor_hydra(path):
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path} imports {bad}; move the wiring to fcas/pipeline/"


def test_the_check_sees_the_library():
    assert len(LIBRARY_MODULES) >= 2


def _private_imports(path: Path) -> list[str]:
    """``from fcas.x import _name`` of another module: a private helper borrowed across modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{node.module}.{a.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fcas")
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_private_name_is_imported_across_modules(path):
    bad = _private_imports(path)
    assert not bad, f"{path} imports private names {bad}; make them public where they are defined"
