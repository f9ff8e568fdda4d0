"""The TCDM sampling bundle: VAE + UNet + ControlNet + the condition and scheduler settings of one TCDM
checkpoint, rebuilt for sampling (eval, float32, frozen). Hand-written glue over
:mod:`fcas.models.checkpoint` and :mod:`fcas.models.bundle`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fcas.diffusion.conditioning import ConditionConfig
from fcas.diffusion.schedulers import SchedulerConfig
from fcas.io import storage
from fcas.models.bundle import checkpoint_folder, tcdm_weights
from fcas.models.checkpoint import Checkpoint, load_checkpoint, load_into
from fcas.models.networks import TCDM, ModelConfig, build_tcdm, build_vae

__all__ = ["TCDMBundle", "load_tcdm"]


@dataclass
class TCDMBundle:
    """Everything a sampler needs, loaded from one TCDM checkpoint folder."""

    vae: nn.Module
    model: TCDM
    config: dict
    scale_factor: float
    digest: str
    uri: str

    @property
    def condition(self) -> ConditionConfig:
        return ConditionConfig(**self.config["condition"])

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(**self.config["scheduler"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.config["shape"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.config["spacing"])

    def to(self, device) -> "TCDMBundle":
        self.vae.to(device)
        self.model.to(device)
        return self


def load_tcdm(uri: str, map_location: str | torch.device = "cpu", expected_digest: str | None = None) -> TCDMBundle:
    """Rebuild VAE + UNet + ControlNet from a TCDM checkpoint folder, or a training output root (its
    latest checkpoint; its EMA weights when it kept them, see :func:`fcas.models.bundle.tcdm_weights`); eval mode, float32, frozen. ``expected_digest``: refuse (``ValueError``) a
    checkpoint whose digest differs (see :func:`fcas.models.checkpoint.load_checkpoint`)."""
    uri = checkpoint_folder(uri)
    ck: Checkpoint = load_checkpoint(uri, expected_digest=expected_digest)
    for key in ("model", "condition", "scheduler", "scale_factor"):
        if key not in ck.config:
            raise ValueError(f"{storage.join(uri, 'config.json')} has no {key!r}: not a TCDM checkpoint")
    mcfg = ModelConfig.from_dict(ck.config["model"])
    cond = ConditionConfig(**ck.config["condition"])
    model = build_tcdm(mcfg, cond.channels, init_controlnet_from_unet=False)
    unet_sd, control_sd, source = tcdm_weights(ck, map_location)
    where = "ema.pt" if source == "ema" else "{}.pt"
    load_into(model.unet, unet_sd, storage.join(uri, where.format("unet")))
    load_into(model.controlnet, control_sd, storage.join(uri, where.format("controlnet")))
    vae = build_vae(mcfg.vae)
    load_into(vae, ck.state_dict("vae", map_location), storage.join(uri, "vae.pt"))
    for m in (model, vae):
        m.float().eval().requires_grad_(False)
    return TCDMBundle(vae, model, ck.config, float(ck.config["scale_factor"]), ck.digest, uri)
