"""Image-quality metrics of a synthesized volume against its target, "under the same mask".

Images are intensities in unit scale ``[0, 1]`` (HU via :func:`fcas.diffusion.conditioning.hu_to_unit`),
``(X, Y, Z)`` numpy arrays or torch tensors; ``mask`` is a boolean ``(X, Y, Z)`` map or ``None``
(the whole volume).

Reading of "computed for each real and synthesized image pair under the same mask" (the paper's §4 and
Eq. 10-11): both metrics are averaged over the **voxels of the mask**, not over its bounding box:

* SSIM: MONAI's :func:`monai.metrics.regression.compute_ssim_and_cs` gives the local SSIM map of
  the whole volume (Gaussian window ``win_size``, sigma ``kernel_sigma``, ``data_range`` 1). The map
  is "valid"-sized: its voxel ``v`` is the window centred on ``v + (win_size - 1) // 2``; SSIM is
  the mean of the map over the mask voxels whose window fits in the volume. Mask voxels within
  ``(win_size - 1) // 2`` of the volume border are skipped. With ``mask=None`` this is exactly
  MONAI's ``SSIMMetric`` (mean of the map). The window sees the unmasked context around each
  masked voxel, so structure at the mask's edge counts.
* RMSE: ``sqrt(mean((x - y)^2))`` over the mask voxels (Eq. 11 restricted to the mask).
  Hand-written: MONAI's ``RMSEMetric`` has no mask.

A mask with no voxel left gives NaN. Images are clipped to ``[0, 1]`` before SSIM (its constants
assume that range) but not before RMSE.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["ssim", "ssim_map", "rmse", "psnr", "abs_error"]


def _vol(x, what: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 3:
        raise ValueError(f"{what} must be a (X, Y, Z) volume, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


def _pair(x, y, mask):
    a, b = _vol(x, "image"), _vol(y, "target")
    if a.shape != b.shape:
        raise ValueError(f"image and target must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = None
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)).to(torch.bool)
        if tuple(m.shape) != tuple(a.shape):
            raise ValueError(f"mask must have the image's shape {tuple(a.shape)}, got {tuple(m.shape)}")
    return a, b, m


def ssim_map(image, target, win_size: int = 7, kernel_sigma: float = 1.5, data_range: float = 1.0,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Local SSIM map ``(X - w + 1, Y - w + 1, Z - w + 1)`` (MONAI, Gaussian window ``w = win_size``), returned on the CPU.

    ``device``: where the convolutions run (a 512x512x256 volume takes minutes on one CPU core).
    """
    a, b, _ = _pair(image, target, None)
    a, b = a.to(device), b.to(device)
    if win_size < 1 or win_size % 2 == 0 or win_size > min(a.shape):
        raise ValueError(f"win_size must be odd and at most the smallest axis {min(a.shape)}, got {win_size}")
    s, _ = compute_ssim_and_cs(a.clamp(0, 1)[None, None], b.clamp(0, 1)[None, None], spatial_dims=3,
                               kernel_size=[win_size] * 3, kernel_sigma=[kernel_sigma] * 3, data_range=data_range)
    return s[0, 0].cpu()


def ssim(image, target, mask=None, win_size: int = 7, kernel_sigma: float = 1.5, data_range: float = 1.0,
         device: str | torch.device = "cpu") -> float:
    """SSIM (the paper's Eq. 10) of ``image`` vs ``target`` ``(X, Y, Z)`` in [0, 1], averaged over ``mask`` voxels.

    ``mask``: boolean ``(X, Y, Z)`` or ``None`` (whole volume; equals MONAI ``SSIMMetric``).
    """
    a, b, m = _pair(image, target, mask)
    s = ssim_map(a, b, win_size, kernel_sigma, data_range, device)
    if m is None:
        return float(s.mean())
    r = (win_size - 1) // 2
    inner = m[tuple(slice(r, n - r) for n in m.shape)]
    if not inner.any():
        return math.nan
    return float(s[inner].mean())


def rmse(image, target, mask=None) -> float:
    """Root mean square error (the paper's Eq. 11) over the ``mask`` voxels (all voxels when ``None``)."""
    a, b, m = _pair(image, target, mask)
    d = (a - b) ** 2
    if m is not None:
        if not m.any():
            return math.nan
        d = d[m]
    return float(torch.sqrt(d.to(torch.float64).mean()))


def psnr(image, target, mask=None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``20 log10(data_range / RMSE)``, both clipped to ``[0, data_range]``
    first (as :func:`ssim`), over the ``mask`` voxels (all when ``None``); identical images give 120 dB
    (the RMSE is floored at ``1e-6 * data_range``)."""
    a, b, m = _pair(image, target, mask)
    err = rmse(a.clamp(0, data_range), b.clamp(0, data_range), m)
    return 20.0 * math.log10(data_range / max(err, 1e-6 * data_range)) if math.isfinite(err) else math.nan


def abs_error(image, target) -> np.ndarray:
    """Voxel-wise ``|image - target|`` ``(X, Y, Z)`` float32 (for the confidence-vs-error analysis)."""
    a, b, _ = _pair(image, target, None)
    return (a - b).abs().numpy()
