"""Segmentation metrics: Dice (the paper's Eq. 14) and RDice (the paper's Eq. 15), per class and mean.

Inputs are label maps of class ids, ``(X, Y, Z)`` (any number of spatial axes) integer numpy
arrays or torch tensors; outputs are plain floats keyed by class id.

* Dice per class is MONAI's :func:`monai.metrics.compute_dice` on the class's binary maps
  (``(1, 1, X, Y, Z)``, one class at a time so a 512x512x256 volume never becomes a 12-channel
  float one-hot).
* Empty classes: when the class is absent from both the prediction and the ground truth the score
  is **NaN** (``both_empty``) and the means skip it (:func:`mean_score`); a class absent from the
  ground truth but predicted scores 0 (every predicted voxel is a false positive); a class present
  in the ground truth but not predicted scores 0.
* RDice (Eq. 15): the ground truth Q is dilated by a ball of ``radius`` voxels (Euclidean,
  ``|d| <= radius`` in voxel units) to Q'; the prediction is restricted to it, P' = P ∩ Q', and
  RDice = 2 |P' ∩ Q| / (|P'| + |Q|). False positives farther than ``radius`` voxels from the
  class's ground truth are ignored; those inside the band still count. The dilation is
  :func:`scipy.ndimage.binary_dilation` with a ball structuring element, computed only in the
  ground truth's bounding box padded by ``radius`` (nothing outside it can be in Q').
  When the ground truth of a class is empty Q' is empty, so P' is empty and RDice is NaN.

Hand-written glue (the per-class loop, the empty-class rule, RDice's restriction); the Dice
itself is MONAI's.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Mapping

import numpy as np
import torch
from monai.metrics import compute_dice
from scipy import ndimage

__all__ = ["ball", "dice_per_class", "rdice_per_class", "mean_score", "dilate_ball"]


def _as_ids(x, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64)
        raise ValueError(f"{what} must hold integer class ids, got dtype {a.dtype}")
    return a


def _pair(pred, label) -> tuple[np.ndarray, np.ndarray]:
    p, q = _as_ids(pred, "pred"), _as_ids(label, "label")
    if p.shape != q.shape:
        raise ValueError(f"pred and label must have the same shape, got {p.shape} and {q.shape}")
    if p.ndim < 1:
        raise ValueError(f"label maps need at least one spatial axis, got shape {p.shape}")
    return p, q


def _class_ids(class_ids: Iterable[int] | None, label: np.ndarray, pred: np.ndarray) -> tuple[int, ...]:
    if class_ids is None:
        ids = sorted(set(np.unique(label).tolist()) | set(np.unique(pred).tolist()))
        return tuple(int(c) for c in ids if c != 0)
    return tuple(int(c) for c in class_ids)


def _dice(p: np.ndarray, q: np.ndarray, both_empty: float) -> float:
    """Dice of two boolean maps of one class (MONAI ``compute_dice``); ``both_empty`` when both are empty."""
    pt = torch.from_numpy(np.ascontiguousarray(p))[None, None]
    qt = torch.from_numpy(np.ascontiguousarray(q))[None, None]
    if not qt.any() and not pt.any():
        return float(both_empty)
    return float(compute_dice(pt, qt, include_background=True, ignore_empty=False).reshape(-1)[0])


def dice_per_class(pred, label, class_ids: Iterable[int] | None = None,
                   both_empty: float = math.nan) -> dict[int, float]:
    """Dice = 2|P ∩ Q| / (|P| + |Q|) per class (the paper's Eq. 14).

    Args:
        pred: ``(X, Y, Z)`` predicted class ids.
        label: ``(X, Y, Z)`` ground-truth class ids, same shape.
        class_ids: the classes to score (default: every non-zero id in either map).
        both_empty: the score of a class absent from both maps (NaN: skipped by :func:`mean_score`).

    Returns:
        ``{class_id: dice}``.
    """
    p, q = _pair(pred, label)
    return {c: _dice(p == c, q == c, both_empty) for c in _class_ids(class_ids, q, p)}


@lru_cache(maxsize=16)
def ball(radius: int, ndim: int = 3) -> np.ndarray:
    """Boolean ball ``|d| <= radius`` (voxel units), shape ``(2 r + 1,) * ndim``."""
    r = int(radius)
    grid = np.mgrid[tuple(slice(-r, r + 1) for _ in range(ndim))]
    return (grid ** 2).sum(0) <= r * r


def dilate_ball(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``mask`` by a Euclidean ball of ``radius`` voxels (``radius=0``: a copy)."""
    mask = np.asarray(mask, dtype=bool)
    if radius == 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=ball(int(radius), mask.ndim))


def _restrict_to_band(p: np.ndarray, q: np.ndarray, radius: int) -> np.ndarray:
    """P' = P ∩ dilate(Q, radius), dilating only inside Q's bounding box padded by ``radius``."""
    out = np.zeros_like(p)
    if not q.any():
        return out
    idx = np.nonzero(q)
    box = tuple(slice(max(int(i.min()) - radius, 0), min(int(i.max()) + radius + 1, n))
                for i, n in zip(idx, q.shape))
    out[box] = p[box] & dilate_ball(q[box], radius)
    return out


def rdice_per_class(pred, label, class_ids: Iterable[int] | None = None, radius: int = 3,
                    both_empty: float = math.nan) -> dict[int, float]:
    """RDice (the paper's Eq. 15): Dice after restricting the prediction to the ground truth dilated by ``radius``.

    Args:
        pred: ``(X, Y, Z)`` predicted class ids.
        label: ``(X, Y, Z)`` ground-truth class ids, same shape.
        class_ids: the classes to score (default: every non-zero id in either map).
        radius: dilation radius in voxels (a Euclidean ball), ``>= 0``; 0 restricts P to Q itself.
        both_empty: the score when P' and Q are both empty (always the case for an absent ground truth).

    Returns:
        ``{class_id: rdice}``.
    """
    if int(radius) != radius or radius < 0:
        raise ValueError(f"RDice radius must be a non-negative integer (voxels), got {radius!r}")
    p, q = _pair(pred, label)
    out = {}
    for c in _class_ids(class_ids, q, p):
        qc = q == c
        out[c] = _dice(_restrict_to_band(p == c, qc, int(radius)), qc, both_empty)
    return out


def mean_score(scores: Mapping[int, float] | Iterable[float]) -> float:
    """Mean over classes skipping NaN (empty classes); NaN when nothing is left."""
    vals = np.asarray(list(scores.values()) if isinstance(scores, Mapping) else list(scores), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else math.nan
