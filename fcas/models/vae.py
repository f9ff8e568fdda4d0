"""The frozen latent encoder/decoder of TCDM: MONAI ``AutoencoderKL`` (or MAISI's ``AutoencoderKlMaisi``).

* :func:`vae_encode` / :func:`vae_decode` -- image ``(B, 1, D, H, W)`` in [0, 1] <-> latent
  ``(B, 4, D/4, H/4, W/4)`` multiplied by ``scale_factor`` (unit variance for the diffusion model, as in
  MONAI's latent diffusion tutorials). Encoding returns the posterior mean (deterministic).
* :func:`sliding_window_decode` / :func:`sliding_window_encode` -- the same through MONAI's
  ``SlidingWindowInferer`` with overlapping, Gaussian-blended windows (the output grid is 4x / 1/4 the
  input's; MONAI's inferer handles the zoom), for volumes that do not fit at once.
* :func:`load_maisi_autoencoder` -- MAISI's released autoencoder weights from a user-given path.
* :func:`vae_loss` / :func:`reconstruction_loss` -- the training objective of ``jobs/train_vae.py``:
  L1 + ``ssim_weight`` * (1 - SSIM) (MONAI ``SSIMLoss``, the 7-voxel Gaussian window of the project's
  SSIM metric) + ``kl_weight`` * KL. The adversarial term (MONAI ``PatchDiscriminator``) is added by
  the training loop (:mod:`fcas.training.vae`). Hand-written: the weighted sum and the KL.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from torch import nn

from fcas.io import storage
from fcas.models.checkpoint import load_into, load_state_file
from fcas.models.networks import VAEConfig, build_vae

__all__ = [
    "MAISI_VAE",
    "vae_encode",
    "vae_decode",
    "sliding_window_decode",
    "sliding_window_encode",
    "load_maisi_autoencoder",
    "vae_loss",
    "reconstruction_loss",
    "kl_divergence",
    "compute_scale_factor",
    "latent_scale_factor",
]

# MAISI's released autoencoder (configs/config_maisi.json of the MAISI bundle)
MAISI_VAE = VAEConfig(channels=(64, 128, 256), num_res_blocks=(2, 2, 2), attention_levels=(False, False, False),
                      latent_channels=4, norm_num_groups=32, kind="maisi")


def _check_image(x: torch.Tensor, name: str = "image") -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, D, H, W), got {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % 4]
    if bad:
        raise ValueError(f"{name} spatial size {tuple(x.shape[2:])} must be divisible by 4")


def vae_encode(vae: nn.Module, image: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """``(B, 1, D, H, W)`` in [0, 1] -> scaled posterior mean ``(B, 4, D/4, H/4, W/4)``."""
    _check_image(image)
    z_mu, _ = vae.encode(image)
    return z_mu * scale_factor


def vae_decode(vae: nn.Module, z: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """Scaled latent ``(B, 4, d, h, w)`` -> image ``(B, 1, 4d, 4h, 4w)`` (not clipped)."""
    return vae.decode(z / scale_factor)


def sliding_window_decode(
    vae: nn.Module,
    z: torch.Tensor,
    roi_size: Sequence[int],
    scale_factor: float = 1.0,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Decode latent windows of ``roi_size`` (latent voxels) and blend them (MONAI SlidingWindowInferer).

    ``overlap * roi_size`` should be an integer per axis so that window edges land on whole voxels
    after the 4x zoom. Returns ``(B, 1, 4d, 4h, 4w)``.
    """
    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)
    return inferer(z, lambda w: vae.decode(w / scale_factor))


def sliding_window_encode(
    vae: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    scale_factor: float = 1.0,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Encode image windows of ``roi_size`` (image voxels, multiples of 4) and blend the latents."""
    _check_image(image)
    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)
    return inferer(image, lambda w: vae.encode(w)[0] * scale_factor)


def load_maisi_autoencoder(uri: str, cfg: VAEConfig = MAISI_VAE) -> nn.Module:
    """Build ``AutoencoderKlMaisi`` of ``cfg`` and load MAISI's released weights from ``uri`` (.pt).

    Accepts a bare state dict or one wrapped under ``state_dict`` / ``autoencoder`` /
    ``autoencoder_state_dict``; ``ValueError`` naming the file when it does not fit.
    """
    if cfg.kind != "maisi":
        cfg = VAEConfig(**{**cfg.__dict__, "kind": "maisi"})
    if not storage.exists(uri):
        raise ValueError(f"MAISI autoencoder weights not found: {uri}")
    sd = load_state_file(uri)
    for key in ("state_dict", "autoencoder", "autoencoder_state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    vae = build_vae(cfg)
    load_into(vae, sd, uri)
    return vae


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    return 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1).flatten(1).sum(1).mean()


_SSIM_LOSSES: dict[int, nn.Module] = {}


def reconstruction_loss(recon: torch.Tensor, image: torch.Tensor, ssim_weight: float = 0.0
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + ``ssim_weight`` * (1 - SSIM) of ``recon`` vs ``image`` ``(B, 1, D, H, W)`` in [0, 1].

    The SSIM term (MONAI ``SSIMLoss``, data range 1, 7-voxel Gaussian window as
    :func:`fcas.metrics.image.ssim`) rewards local structure that L1 alone smooths away.
    """
    recon, image = recon.float(), image.float()
    l1 = F.l1_loss(recon, image)
    parts = {"l1": float(l1.detach())}
    loss = l1
    if ssim_weight > 0:
        dims = image.ndim - 2
        if dims not in _SSIM_LOSSES:
            from monai.losses import SSIMLoss

            _SSIM_LOSSES[dims] = SSIMLoss(spatial_dims=dims, data_range=1.0, win_size=7, kernel_sigma=1.5)
        s = _SSIM_LOSSES[dims](recon, image)
        parts["ssim_loss"] = float(s.detach())
        loss = loss + ssim_weight * s
    return loss, parts


def vae_loss(vae: nn.Module, image: torch.Tensor, kl_weight: float = 1e-6, ssim_weight: float = 0.0,
             return_recon: bool = False):
    """Reconstruction loss (:func:`reconstruction_loss`) + ``kl_weight`` * KL for ``image (B, 1, D, H, W)``.

    Returns ``(loss, parts)``, or ``(loss, parts, recon)`` with ``return_recon`` (for the adversarial term).
    """
    recon, z_mu, z_sigma = vae(image)
    # the loss terms in fp32 even under autocast: SSIM's variances (E[x^2] - E[x]^2) cancel in bf16 / fp16
    with torch.autocast(image.device.type, enabled=False):
        loss, parts = reconstruction_loss(recon.float(), image.float(), ssim_weight)
        kl = kl_divergence(z_mu.float(), z_sigma.float())
    loss = loss + kl_weight * kl
    parts["kl"] = float(kl.detach())
    return (loss, parts, recon) if return_recon else (loss, parts)


@torch.no_grad()
def compute_scale_factor(vae: nn.Module, images: torch.Tensor) -> float:
    """``1 / std(z)`` over the posterior means of ``images (B, 1, D, H, W)`` (MONAI LDM tutorial)."""
    return latent_scale_factor(vae_encode(vae, images))


def latent_scale_factor(z: torch.Tensor) -> float:
    """``1 / std(z)`` of unscaled posterior means ``z (B, C, d, h, w)`` (e.g. read from a latent cache)."""
    std = float(z.std())
    if not std > 0:
        raise ValueError(f"latent std is {std}; cannot scale")
    return 1.0 / std
