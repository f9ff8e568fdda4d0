"""Loading trained networks for use: the frozen VAE (our checkpoint, MAISI weights, or random for
tests) and the full TCDM bundle (VAE + UNet + ControlNet + scheduler/condition settings) that the
synthesis job samples from. Hand-written glue over :mod:`fcas.models.checkpoint`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fcas.bundled import resolve
from fcas.models.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, load_into
from fcas.io import storage
from fcas.models.networks import TCDM, ModelConfig, VAEConfig, build_tcdm, build_vae

__all__ = ["load_vae", "vae_digest", "TCDMBundle", "load_tcdm", "tcdm_weights"]


def tcdm_weights(ck: Checkpoint, map_location: str | torch.device = "cpu") -> tuple[dict, dict, str]:
    """``(unet state dict, controlnet state dict, source)`` of a TCDM checkpoint: the EMA weights
    when the run kept them (``train.ema_decay > 0``; source ``'ema'``), else the raw ones (``'raw'``)."""
    if "ema" in ck.files:
        sd = ck.state_dict("ema", map_location)
        parts: dict[str, dict] = {"unet": {}, "controlnet": {}}
        for key, value in sd.items():
            head, _, rest = key.partition(".")
            net, _, name = rest.partition(".")
            if head == "module" and net in parts:
                parts[net][name] = value
        if not parts["unet"] or not parts["controlnet"]:
            raise ValueError(f"{storage.join(ck.uri, 'ema.pt')} holds no unet/controlnet weights")
        return parts["unet"], parts["controlnet"], "ema"
    return ck.state_dict("unet", map_location), ck.state_dict("controlnet", map_location), "raw"


def load_vae(spec: str | None, cfg: VAEConfig, seed: int = 0) -> tuple[nn.Module, VAEConfig, float | None, str]:
    """Frozen VAE from ``spec``; returns ``(vae, vae_config, scale_factor or None, digest)``.

    ``spec``: a VAE checkpoint folder URI or a ``jobs/train_vae.py`` output root (its latest
    checkpoint; the checkpoint's own config wins), or
    ``maisi:<uri>`` (MAISI's released weights at the MAISI architecture), or ``None`` / ``random``:
    an untrained VAE seeded by ``seed`` (a fixed deterministic encoder; for tests only).
    """
    if spec in (None, "", "random", "none"):
        warnings.warn("TCDM uses an untrained (random) VAE: fine for tests, useless for images", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = build_vae(cfg)
        digest, scale = f"random:{seed}", None
    elif str(spec).startswith("maisi:"):
        from fcas.models.vae import MAISI_VAE, load_maisi_autoencoder

        cfg = MAISI_VAE if cfg.kind != "maisi" else cfg
        vae = load_maisi_autoencoder(str(spec)[len("maisi:"):], cfg)
        digest, scale = str(spec), None
    else:
        uri = resolve(str(spec))   # a bundled checkpoint (checkpoints/demo) from any directory
        if not storage.exists(storage.join(uri, "checkpoint.json")):
            uri = latest_checkpoint(uri) or uri  # a training output root: its latest checkpoint
        ck = load_checkpoint(uri)
        cfg = ModelConfig.from_dict(ck.config["model"]).vae
        vae = build_vae(cfg)
        load_into(vae, ck.state_dict("vae"), storage.join(ck.uri, "vae.pt"))
        digest, scale = ck.digest, ck.config.get("scale_factor")
    vae.eval().requires_grad_(False)
    return vae, cfg, (float(scale) if scale is not None else None), digest


def vae_digest(spec: str | None, seed: int = 0) -> str:
    """The digest :func:`load_vae` gives the VAE of ``spec``, without building it: the sha256 of the
    checkpoint's ``checkpoint.json`` (of a training output root: its latest checkpoint's), ``maisi:<uri>``
    as written, ``random:<seed>``. ``ValueError`` when ``spec`` names no complete checkpoint."""
    if spec in (None, "", "random", "none"):
        return f"random:{seed}"
    if str(spec).startswith("maisi:"):
        return str(spec)
    uri = resolve(str(spec))
    if not storage.exists(storage.join(uri, "checkpoint.json")):
        uri = latest_checkpoint(uri) or uri
    return load_checkpoint(uri).digest


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
    def condition(self):
        from fcas.diffusion.conditioning import ConditionConfig

        return ConditionConfig(**self.config["condition"])

    @property
    def scheduler(self):
        from fcas.diffusion.schedulers import SchedulerConfig

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
    latest checkpoint; its EMA weights when it kept them, see :func:`tcdm_weights`); eval mode, float32, frozen. ``expected_digest``: refuse (``ValueError``) a
    checkpoint whose digest differs (see :func:`fcas.models.checkpoint.load_checkpoint`)."""
    uri = resolve(uri)   # a bundled checkpoint (checkpoints/demo) from any directory
    if not storage.exists(storage.join(uri, "checkpoint.json")):
        uri = latest_checkpoint(uri) or uri
    ck: Checkpoint = load_checkpoint(uri, expected_digest=expected_digest)
    for key in ("model", "condition", "scheduler", "scale_factor"):
        if key not in ck.config:
            raise ValueError(f"{storage.join(uri, 'config.json')} has no {key!r}: not a TCDM checkpoint")
    from fcas.diffusion.conditioning import ConditionConfig

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
