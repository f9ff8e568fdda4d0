"""Where the bundled YAML configs live and how a job reads one (no heavy imports: the planner uses it)."""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = ["CONFIG_DIR", "read_config"]


def read_config(group: str, name_or_path: str, what: str) -> dict:
    """YAML of ``configs/<group>/<name>.yaml`` (a bare name) or of a path; ``what`` names it in errors."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ValueError(f"unknown {what} {name_or_path!r} (no file {path}); known: {known}")
    with open(path) as fh:
        return yaml.safe_load(fh) or {}
