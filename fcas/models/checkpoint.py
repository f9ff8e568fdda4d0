"""Checkpoints as folders (diffusers style), on any fsspec URI.

A checkpoint folder holds::

    config.json        everything needed to rebuild the networks (+ training settings, config hash)
    <name>.pt          one torch state dict per file (``unet.pt``, ``controlnet.pt``, ``vae.pt``,
                       ``optimizer.pt`` ...), saved with ``torch.save``, loaded with ``weights_only=True``
    checkpoint.json    written LAST: step, config hash and the sha256 of every file above

A folder without ``checkpoint.json`` is an unfinished write and is ignored by
:func:`latest_checkpoint`. Loading verifies each file's sha256, so a truncated or swapped file
raises ``ValueError`` naming it; a state dict that does not fit the network raises ``ValueError``
naming the file and the offending keys. Hand-written glue over ``torch.save`` and fcas.io.storage.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from fcas.bundled import resolve
from fcas.io import storage

__all__ = [
    "Checkpoint",
    "no_report",
    "config_hash",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_dir",
    "load_state_file",
    "load_into",
    "checkpoint_digest",
]

MANIFEST = "checkpoint.json"
CONFIG = "config.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")


def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``config``."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_dir(root: str, step: int) -> str:
    return storage.join(root, f"step_{int(step):09d}")


@dataclass
class Checkpoint:
    uri: str
    step: int
    config: dict
    config_hash: str
    digest: str
    files: dict[str, str]

    def state_dict(self, name: str, map_location: str | torch.device = "cpu") -> dict:
        if name not in self.files:
            raise ValueError(f"checkpoint {self.uri} has no {name!r}; it holds {sorted(self.files)}")
        return load_state_file(storage.join(self.uri, f"{name}.pt"), map_location, expected_sha256=self.files[name])


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _half(sd: Mapping[str, Any]) -> dict:
    return {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in sd.items()}


def save_checkpoint(
    uri: str,
    *,
    config: Mapping[str, Any],
    state_dicts: Mapping[str, Mapping[str, Any]],
    step: int,
    half: bool = False,
) -> str:
    """Write a checkpoint folder at ``uri`` (created; existing files replaced); returns its digest.

    ``state_dicts``: name -> state dict (module or optimizer). ``half`` stores floating tensors of
    module state dicts as float16 (optimizer states are never halved).
    """
    if not state_dicts:
        raise ValueError("save_checkpoint needs at least one state dict")
    chash = config_hash(config)
    files: dict[str, str] = {}
    for name, sd in state_dicts.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(f"state dict name {name!r} must be [A-Za-z0-9_-]+")
        data = _to_bytes(_half(sd) if half and name != "optimizer" else dict(sd))
        storage.atomic_write_bytes(storage.join(uri, f"{name}.pt"), data)
        files[name] = hashlib.sha256(data).hexdigest()
    cfg_bytes = json.dumps(dict(config), indent=2, sort_keys=True, default=str).encode()
    storage.atomic_write_bytes(storage.join(uri, CONFIG), cfg_bytes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config_hash": chash,
        "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
        "files": files,
    }
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.atomic_write_bytes(storage.join(uri, MANIFEST), blob)
    return hashlib.sha256(blob).hexdigest()


def checkpoint_digest(uri: str) -> str:
    """sha256 of the checkpoint's ``checkpoint.json`` (which pins every file's sha256)."""
    return hashlib.sha256(storage.read_bytes(storage.join(resolve(uri), MANIFEST))).hexdigest()


def load_checkpoint(uri: str, expected_digest: str | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder's manifest and config (weights load lazily, each checked
    against its sha256 in ``checkpoint.json``). A bundled one (``checkpoints/demo``) is found from any
    directory (:func:`fcas.bundled.resolve`).

    ``expected_digest``: when given (e.g. the ``checkpoint_digest`` a run recorded), the sha256 of
    ``checkpoint.json`` must equal it, so a swapped or retrained checkpoint is refused before use.
    """
    uri = resolve(uri)
    man_uri = storage.join(uri, MANIFEST)
    if not storage.exists(man_uri):
        raise ValueError(f"{man_uri} not found: {uri} is not a complete checkpoint")
    blob = storage.read_bytes(man_uri)
    if expected_digest and hashlib.sha256(blob).hexdigest() != str(expected_digest).strip().lower():
        raise ValueError(f"checkpoint {uri}: digest {hashlib.sha256(blob).hexdigest()} of {man_uri} "
                         f"does not match the expected {expected_digest}")
    try:
        man = json.loads(blob)
        files = {str(k): str(v) for k, v in man["files"].items()}
        step = int(man["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint manifest {man_uri} is unreadable: {exc}") from None
    cfg_uri = storage.join(uri, CONFIG)
    cfg_bytes = storage.read_bytes(cfg_uri)
    if "config_sha256" in man and hashlib.sha256(cfg_bytes).hexdigest() != man["config_sha256"]:
        raise ValueError(f"checkpoint file {cfg_uri} does not match its sha256 in {man_uri} (truncated or replaced)")
    try:
        config = json.loads(cfg_bytes)
    except ValueError as exc:
        raise ValueError(f"checkpoint file {cfg_uri} is not valid JSON: {exc}") from None
    return Checkpoint(uri, step, config, str(man.get("config_hash", "")), hashlib.sha256(blob).hexdigest(), files)


def load_state_file(
    uri: str, map_location: str | torch.device = "cpu", expected_sha256: str | None = None
) -> dict:
    """``torch.load(weights_only=True)`` of one ``.pt`` file; ``ValueError`` naming it when damaged."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {uri} is missing") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(
            f"checkpoint file {uri} does not match the sha256 in its checkpoint.json "
            f"({len(data)} bytes): truncated or replaced"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError on damage
        # one line (torch's weights_only refusal spans many), cut short: it may quote the payload
        why = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
        why = why if len(why) <= 300 else why[:300] + "..."
        raise ValueError(f"checkpoint file {uri} cannot be loaded ({type(exc).__name__}: {why})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint file {uri} holds a {type(obj).__name__}, expected a state dict")
    return obj


def load_into(module: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """``module.load_state_dict(strict=True)`` with a ``ValueError`` naming ``source`` on mismatch.

    float16 tensors (a halved checkpoint) are cast to the module's dtype by ``load_state_dict``.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint file {source} does not fit {type(module).__name__}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {shapes[:5]}"
        )
    module.load_state_dict(state_dict, strict=True)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as sorted ``(step, uri)``; unfinished folders are skipped."""
    if not storage.exists(root):
        return []
    out = []
    for child in storage.listdir(root):
        m = _STEP_DIR.search(child.rstrip("/"))
        if m and storage.exists(storage.join(child, MANIFEST)):
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(root: str) -> str | None:
    """URI of the complete checkpoint with the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def no_report(metrics: dict, checkpoint_uri: str | None = None, checkpoint_step: bool = False) -> None:
    """The training loops' ``report`` when no Ray Train session is there to receive metrics and checkpoints."""
    return None
