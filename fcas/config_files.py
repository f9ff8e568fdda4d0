"""How a job reads one of the bundled YAML configs (no heavy imports: the planner uses it).

The folder is :func:`fcas.bundled.config_dir` (``$FCAS_HOME/configs`` or the package's configs), so a name like
``preset=tiny`` or ``schema=cardiac`` works from an installed wheel and from any directory.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from fcas.bundled import config_dir, resolve

CONFIG_DIR = config_dir()   # at import; read_config looks the folder up on each call

__all__ = ["CONFIG_DIR", "read_config"]


def read_config(group: str, name_or_path: str, what: str) -> dict:
    """YAML of ``configs/<group>/<name>.yaml`` (a bare name) or of a path; ``what`` names it in errors."""
    path = Path(resolve(name_or_path))
    configs = config_dir()
    if not path.suffix:
        path = configs / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs / group).glob("*.yaml"))
        raise ValueError(f"unknown {what} {name_or_path!r} (no file {path}); known: {known}")
    with open(path) as fh:
        return yaml.safe_load(fh) or {}
