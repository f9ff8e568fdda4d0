"""Where the bundled configs, checkpoints and benchmark results are, and how a path to one resolves.

The repository keeps them in ``configs/``, ``checkpoints/`` and ``benchmarks/results/``; a wheel ships the same
folders inside the package (``fcas/configs/``, ...: setup.py maps them, nothing moves). Every job finds them
through this module, so it runs from an installed wheel, an editable install or a checkout, from any directory:

* the folder: ``$FCAS_HOME/<folder>`` when ``FCAS_HOME`` is set and has it, else the package data;
* a path (``checkpoint=checkpoints/demo``): URIs and absolute paths as given; a relative path that exists
  in the cwd keeps its meaning; else a path under one of the folders resolves to ``$FCAS_HOME``'s copy,
  then to the bundled one (so the default ``checkpoints/demo`` works outside the repository).

No heavy imports: the planner and the label schemas use it.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["BUNDLED", "bundle_root", "config_dir", "fcas_home", "resolve"]

BUNDLED = ("configs", "checkpoints", "benchmarks/results")


def fcas_home() -> Path | None:
    """``$FCAS_HOME`` (a folder with ``configs/`` and/or ``checkpoints/``), or None when unset."""
    home = os.environ.get("FCAS_HOME")
    if not home:
        return None
    path = Path(home).expanduser()
    if not path.is_dir():
        raise ValueError(f"FCAS_HOME={home} is not a directory")
    return path


def bundle_root() -> Path:
    """The folder that holds the bundled folders: the installed package, or a checkout's root (editable
    install, PYTHONPATH, a Ray ``working_dir``), where they sit beside ``fcas/``."""
    package = Path(str(importlib.resources.files("fcas")))
    return package if (package / "configs").is_dir() else package.parent


def config_dir() -> Path:
    """The config folder Hydra composes from and :func:`fcas.config_files.read_config` reads."""
    home = fcas_home()
    if home is not None and (home / "configs").is_dir():
        return home / "configs"
    return bundle_root() / "configs"


def resolve(path: str | os.PathLike) -> str:
    """``path`` as the file to open (see the module docstring); unchanged when nothing matches, so errors name it."""
    given = os.fspath(path)
    if not given or "://" in given or os.path.isabs(given) or os.path.exists(given):
        return given
    parts = Path(given).parts
    if not any(parts[:len(Path(b).parts)] == Path(b).parts for b in BUNDLED):
        return given
    for base in (fcas_home(), bundle_root()):
        if base is not None and (base / given).exists():
            return str(base / given)
    return given
