"""Loading trained networks for use: the frozen VAE (our checkpoint, MAISI weights, or random for
tests), a checkpoint folder from a training output root, and a TCDM checkpoint's UNet/ControlNet
weights (EMA when kept). The full sampling bundle is :mod:`fcas.diffusion.bundle`. Hand-written glue
over :mod:`fcas.models.checkpoint`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fcas.bundled import resolve
from fcas.models.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, load_into
from fcas.io import storage
from fcas.models.configs import ModelConfig, VAEConfig

__all__ = ["load_vae", "vae_digest", "tcdm_weights", "checkpoint_folder"]


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
    from fcas.models.networks import build_vae   # here: digests and configs need no MONAI

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
        ck = load_checkpoint(checkpoint_folder(spec))
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
    return load_checkpoint(checkpoint_folder(spec)).digest


def checkpoint_folder(spec: str) -> str:
    """The checkpoint folder ``spec`` names: a bundled name (``checkpoints/demo``) from any directory,
    a checkpoint folder, or a training output root (then its latest checkpoint)."""
    uri = resolve(str(spec))
    if not storage.exists(storage.join(uri, "checkpoint.json")):
        uri = latest_checkpoint(uri) or uri
    return uri
