"""The library's layering (docs/architecture.md): Ray and Hydra stay at the edges (only fcas/pipeline
imports them), no private name is borrowed across modules, and the packages import each other without
cycles (function-level imports included: a lazy import hides a cycle, it does not remove it)."""
import ast
from collections import defaultdict
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


def _unit(path: Path) -> str:
    """The package a module belongs to (``fcas/diffusion/x.py`` -> ``diffusion``; ``fcas/cli.py`` -> ``cli``)."""
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def package_graph() -> dict[str, dict[str, set[str]]]:
    """``graph[a][b]``: the modules of package ``a`` that import from package ``b`` (any import in the file)."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(PKG.rglob("*.py")):
        src = _unit(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"fcas.{a.name}" for a in node.names] if node.module == "fcas" else [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "fcas" and len(parts) > 1 and parts[1] != src:
                    graph[src][parts[1]].add(str(path.relative_to(PKG)))
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None (depth-first search)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}) is None


def test_packages_import_each_other_without_cycles():
    graph = package_graph()
    assert {"models", "diffusion", "pipeline", "synthesis"} <= set(graph)   # the graph sees the library
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a}->{b} in {sorted(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


# the modules a job passes through before its input checks answer: they load neither MONAI nor Ray Train
CHECK_PATH = ("fcas.pipeline.commands", *(f"fcas.pipeline.commands.{job}" for job in (
    "synthesize", "prepare", "plan", "train_vae", "cache_latents", "train_tcdm", "pretrain_cal", "evaluate",
    "export_nnunet", "reproduce")), "fcas.pipeline.train_tcdm", "fcas.pipeline.train_vae", "fcas.pipeline.prepare",
    "fcas.training.tcdm_settings", "fcas.training.vae_settings", "fcas.models.configs", "fcas.models.bundle",
    "fcas.models.maisi", "fcas.diffusion.schedulers", "fcas.labels", "fcas.prepare")


def test_the_input_check_path_loads_neither_monai_nor_ray_train():
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for m in {CHECK_PATH!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('monai', 'ray.train', 'ray.data') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"loaded on the input-check path: {proc.stdout.strip()}"
