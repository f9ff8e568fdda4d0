"""Skip-Sampling Variance (SSV, the paper's §3.2, Eq. 7): a per-voxel confidence map from the spread of
the intermediate predictions collected every k-th reverse step.

Eq. 7 as printed sums deviations from the mean (identically zero); as docs/method.md explains, we read it
as the per-voxel variance over the intermediates ``Π = {Ĩ_t0, Ĩ_tk, ..., Ĩ_trk}``, normalised per
sample, and ``CM = 1 - normalised variance`` (stable voxels -> high confidence).

Two modes:

* ``image`` (the paper): decode every intermediate with the VAE, variance in image space.
  Costs one VAE decode per intermediate.
* ``latent``: variance of the intermediate latents, averaged over the latent channels and
  upsampled (trilinear) to the image grid. Nearly free.

Normalisation: the variance is divided by its ``quantile`` (default 0.999) over the sample's
voxels and clipped to [0, 1] (robust to a few extreme voxels; ``quantile=1`` is max-normalisation).
Hand-written: no library computes SSV.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fcas.diffusion.sampling import decode_latent

__all__ = ["SSV_MODES", "ssv_variance", "normalize_variance", "ssv_confidence"]

SSV_MODES = ("latent", "image")


def ssv_variance(intermediates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-voxel (population) variance over K intermediates, each ``(B, C, ...)`` -> ``(B, C, ...)``."""
    if len(intermediates) < 2:
        raise ValueError(f"SSV needs at least 2 intermediates (got {len(intermediates)}); "
                         "lower ssv.every or raise sampler.steps")
    stack = torch.stack([t.to(torch.float32) for t in intermediates], dim=0)
    return stack.var(dim=0, unbiased=False)


def normalize_variance(var: torch.Tensor, quantile: float = 0.999, eps: float = 1e-12) -> torch.Tensor:
    """``(B, 1, D, H, W)`` variance -> [0, 1] per sample (divided by its ``quantile``, clipped)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    flat = var.flatten(1)
    if quantile >= 1.0:
        scale = flat.max(dim=1).values
    else:
        # torch.quantile refuses very large inputs; a strided subsample estimates it well
        step = max(1, flat.shape[1] // 4_000_000)
        scale = torch.quantile(flat[:, ::step], quantile, dim=1)
    scale = scale.clamp_min(eps).view(-1, *([1] * (var.ndim - 1)))
    return (var / scale).clamp(0.0, 1.0)


def ssv_confidence(
    intermediates: Sequence[torch.Tensor],
    mode: str = "latent",
    *,
    out_shape: Sequence[int] | None = None,
    vae: torch.nn.Module | None = None,
    scale_factor: float = 1.0,
    decode_window: Sequence[int] | None = None,
    quantile: float = 0.999,
) -> torch.Tensor:
    """Confidence map ``CM = 1 - normalised SSV variance``, ``(B, 1, D, H, W)`` float32 in [0, 1].

    Args:
        intermediates: K >= 2 latents ``(B, 4, d, h, w)`` collected every k-th step (x̂0 by default).
        mode: 'latent' (variance in latent space, channel mean, upsampled to ``out_shape``) or
            'image' (decode each with ``vae`` first, as the paper).
        out_shape: ``(D, H, W)`` of the image grid; default ``4 x`` the latent grid.
        vae, scale_factor, decode_window: the decoder for 'image' mode.
        quantile: normalisation quantile (see module doc).
    """
    if mode not in SSV_MODES:
        raise ValueError(f"unknown SSV mode {mode!r}; use one of {SSV_MODES}")
    if not intermediates:
        raise ValueError("SSV needs intermediates: set ssv.every > 0")
    lat_shape = tuple(intermediates[0].shape[2:])
    out_shape = tuple(out_shape) if out_shape is not None else tuple(4 * s for s in lat_shape)
    if mode == "image":
        if vae is None:
            raise ValueError("SSV image mode needs the VAE to decode the intermediates")
        images = [decode_latent(vae, z, scale_factor, window=decode_window) for z in intermediates]
        var = ssv_variance(images)                                   # (B, 1, D, H, W)
        if tuple(var.shape[2:]) != out_shape:
            var = F.interpolate(var, size=out_shape, mode="trilinear", align_corners=False)
    else:
        var = ssv_variance(intermediates).mean(dim=1, keepdim=True)   # (B, 1, d, h, w)
        var = F.interpolate(var, size=out_shape, mode="trilinear", align_corners=False)
    return 1.0 - normalize_variance(var, quantile)
