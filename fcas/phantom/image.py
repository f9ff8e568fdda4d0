"""Image formation: from a label map and a HU table to the CT image a scanner would give.

Class HU, smooth contrast inhomogeneity, right-atrial inflow mixing, papillary muscles, lung density,
the unlabelled tissue painted by the surroundings, then the reconstruction kernel (a Gaussian blur:
partial volume) and correlated Gaussian noise, clipped to [HU_MIN, HU_MAX]. Kept apart from the
anatomy so the acquisition (:mod:`fcas.phantom.intensities` domains) changes only this step.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fcas.labels import LabelSchema
from fcas.phantom.geometry import Grid, Waves
from fcas.phantom.intensities import HU_MAX, HU_MIN, IDS, class_lut


def render_image(label: np.ndarray, extra: np.ndarray, pap: np.ndarray, grid: Grid, hu: dict, rng,
                 schema: LabelSchema, noise: bool = True) -> np.ndarray:
    """The (X, Y, Z) int16 HU image of ``label`` on ``grid``; draws from ``rng`` (the noise last).

    ``extra``: HU of unlabelled tissue and sub-tissues (NaN: the class HU); ``pap``: the papillary
    muscles' signed distance (< 0 inside), painted with myocardium HU inside the LV label.
    """
    lut = class_lut(hu)
    mod = Waves(rng, 4, (50, 120), 12.0).grid(grid.axes)  # smooth contrast inhomogeneity
    mix = Waves(rng, 3, (20, 50), 35.0).grid(grid.axes)  # inflow mixing of contrast in the right atrium
    img = lut[label] + np.where(np.isin(label, schema.cardiac_ids), mod, 0) + np.where(label == IDS["ra"], mix, 0)
    pap = (pap < 0) & (label == IDS["lv"])
    img[pap] = hu["myo"]
    lung = label == IDS["lung"]  # gravity-dependent density and smooth parenchymal variation
    img[lung] += (35 * np.clip(-grid.pts[..., 1][lung] / 60, 0, 1)
                  + Waves(rng, 4, (25, 60), 15.0).grid(grid.axes)[lung])
    cardiac = np.isin(label, schema.cardiac_ids)
    use = np.isfinite(extra) & ~cardiac
    img[use] = extra[use]
    sp = grid.spacing
    img = ndimage.gaussian_filter(img, np.sqrt(0.45 ** 2 + (hu["psf"] / sp) ** 2), mode="nearest")
    if noise:
        grain = rng.standard_normal(grid.shape, dtype=np.float32)
        grain = ndimage.gaussian_filter(grain, np.maximum(0.7 / sp, 0.4), mode="wrap")
        img += grain * (hu["noise"] / max(float(grain.std()), 1e-6))
    return np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
