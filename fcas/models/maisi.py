"""MAISI's released diffusion UNet and ControlNet as the starting point of TCDM training (``init=maisi:...``).

MAISI (NVIDIA, Project-MONAI/tutorials ``generation/maisi``) releases its networks as two ``torch.save``
dicts: ``{"unet_state_dict": ..., "scale_factor": ...}`` (``diff_unet_3d_{ddpm,rflow}-ct.pt``) and
``{"controlnet_state_dict": ...}`` (``controlnet_3d_{ddpm,rflow}-ct.pt``), in the key layout of
``DiffusionModelUNetMaisi`` / ``ControlNetMaisi`` -- the networks ``model=maisi`` / ``model=maisi-rflow``
build. :func:`load_maisi_init` loads both into a :class:`~fcas.models.networks.TCDM` of that kind.

Only one tensor may differ in shape: MAISI's ControlNet reads 8 condition channels (bit planes of its 132
labels), ours :attr:`ConditionConfig.channels` (9 by default: ``M'_A``, ``M'_B`` bits and ``I_B``), so
the first convolution of the condition embedding keeps its fresh initialisation (:data:`MAY_REINIT`).
Anything else that does not fit (missing keys, other shapes) is refused with one line naming the file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fcas.io import storage
from fcas.models.checkpoint import load_into, load_state_file

if TYPE_CHECKING:   # annotations only: the init spec is parsed and checked without MONAI
    from fcas.models.networks import TCDM

log = logging.getLogger(__name__)

__all__ = ["MAY_REINIT", "MaisiInit", "parse_init", "absolute_init", "load_maisi_init"]

PREFIX = "maisi:"
# ControlNet tensors whose shape depends on our condition channel count (its bias does not)
MAY_REINIT = ("controlnet_cond_embedding.conv_in.conv.weight",)


@dataclass(frozen=True)
class MaisiInit:
    """What :func:`load_maisi_init` did: tensor names ``unet.<key>`` / ``controlnet.<key>``."""

    unet_file: str
    controlnet_file: str
    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]
    scale_factor: float | None


def parse_init(spec: str) -> tuple[str, str]:
    """``maisi:<unet file>,<controlnet file>`` -> the two URIs (``ValueError`` for any other form)."""
    body = str(spec)[len(PREFIX):] if str(spec).startswith(PREFIX) else ""
    parts = body.split(",")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"init={spec!r}: expected maisi:<unet file>,<controlnet file>")
    return parts[0].strip(), parts[1].strip()


def absolute_init(spec: str | None) -> str | None:
    """``spec`` with relative local paths made absolute (Ray workers run elsewhere); None stays None."""
    if spec is None:
        return None
    return PREFIX + ",".join(storage.absolute(p) for p in parse_init(spec))


def _released(uri: str, key: str) -> tuple[dict, dict]:
    """``(state dict under key, the whole file)``; one-line ``ValueError`` naming ``uri`` otherwise."""
    if not storage.exists(uri):
        raise ValueError(f"MAISI weights not found: {uri}")
    data = load_state_file(uri)   # torch.load(weights_only=True)
    sd = data.get(key)
    if not isinstance(sd, dict):
        raise ValueError(f"{uri} has no {key!r} (keys {sorted(map(str, data))[:5]}): not a released MAISI file")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}, data


def load_maisi_init(model: TCDM, spec: str) -> MaisiInit:
    """Load MAISI's released UNet and ControlNet (``spec`` = ``maisi:<unet file>,<controlnet file>``) into
    ``model`` (built with ``kind: maisi``). The UNet must fit exactly; of the ControlNet only
    :data:`MAY_REINIT` may differ in shape, and keeps its fresh initialisation. Logs and returns what was
    loaded and re-initialised, and the UNet file's ``scale_factor`` (None when it has none)."""
    unet_uri, control_uri = parse_init(spec)
    if model.maisi is None:
        raise ValueError(f"init={spec!r} needs MAISI's networks: use model=maisi or model=maisi-rflow")
    unet_sd, unet_file = _released(unet_uri, "unet_state_dict")
    control_sd, _ = _released(control_uri, "controlnet_state_dict")
    load_into(model.unet, unet_sd, unet_uri)

    own = model.controlnet.state_dict()
    reinit = sorted(k for k in MAY_REINIT if k in own and k in control_sd and own[k].shape != control_sd[k].shape)
    keep = {k: own[k] for k in reinit}
    load_into(model.controlnet, {**control_sd, **keep}, control_uri)   # refuses any other mismatch

    scale = unet_file.get("scale_factor")
    scale = float(scale) if scale is not None else None
    loaded = tuple([f"unet.{k}" for k in unet_sd] + [f"controlnet.{k}" for k in control_sd if k not in keep])
    result = MaisiInit(unet_uri, control_uri, loaded, tuple(f"controlnet.{k}" for k in reinit), scale)
    log.info("init from MAISI: %d tensors loaded (%s, %s), re-initialised %s, scale_factor %s",
             len(loaded), unet_uri, control_uri, list(result.reinitialised) or "none", scale)
    return result
