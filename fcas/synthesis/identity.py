"""The identity of a synthesis run: ``out/run.json``, written on first start, checked on every rerun.

What makes two runs the same run: the settings that decide a sample's content (preset, MGM, run
seed, template source, schema, sampler and SSV settings: everything the config hash covers except
the checkpoint's *path*), the checkpoint's digest (not its path: a moved checkpoint is the same
model) and the template library's digest (its template and reference case ids, in order: the plan
of sample ``i`` indexes into them). ``n``, ``out``, resources and progress are not part of it, so a
rerun may grow ``n`` or change the cluster. A rerun whose identity differs is refused with one line
naming the first differing keys, before any work: one run never mixes two configurations.

The file is created once (atomic write) and never rewritten; deleting it is the explicit way to
adopt an old run. Hand-written: a few dict comparisons.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from fcas.io import storage
from fcas.security import safe_child

__all__ = ["IDENTITY_FILE", "library_digest", "check_identity", "identity_diff"]

IDENTITY_FILE = "run.json"
VERSION = 1


def library_digest(library) -> str:
    """sha256 of a :class:`fcas.synthesis.plan.TemplateLibrary`'s template and reference ids, in order."""
    ids = {"templates": [t.case_id for t in library.templates], "references": [r.case_id for r in library.references]}
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k in sorted(d):
            out.update(_flat(d[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def identity_diff(recorded: Mapping, current: Mapping, limit: int = 3) -> list[str]:
    """``key: recorded -> now`` for the first ``limit`` keys that differ (dotted paths)."""
    a, b = _flat(recorded), _flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]] + (
        [f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def check_identity(out: str, part: str, value: Mapping[str, Any]) -> dict:
    """Record ``value`` as section ``part`` of ``out/run.json`` if the run has none yet, else refuse
    (``ValueError``, one line) when it differs from what the run recorded. Returns the whole identity."""
    uri = safe_child(out, IDENTITY_FILE)
    ident: dict = {"version": VERSION}
    if storage.exists(uri):
        try:
            ident = json.loads(storage.read_bytes(uri))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{uri}: unreadable run identity ({exc}); restore it or use another out") from None
    value = json.loads(json.dumps(value, sort_keys=True, default=str))
    if part in ident:
        diff = identity_diff(ident[part], value)
        if diff:
            raise ValueError(f"{out} holds another run ({IDENTITY_FILE}, {part} differ: {'; '.join(diff)}); "
                             f"use the run's settings, or another out")
        return ident
    ident[part] = value
    storage.atomic_write_bytes(uri, json.dumps(ident, indent=2, sort_keys=True).encode())
    return ident
