"""Processes of this test session, from /proc: fault tests kill only what they started."""
from __future__ import annotations

from pathlib import Path


def process_tree(root: int) -> set[int]:
    """``root`` and its descendants (Ray's workers run in sessions of their own, but under its raylet)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    return tree


def pids_matching(text: str, root: int) -> list[int]:
    """Processes under ``root`` whose command line contains ``text``."""
    pids = []
    for pid in sorted(process_tree(root) - {root}):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)
        except OSError:
            pass
    return pids
