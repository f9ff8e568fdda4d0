"""Geometry of the phantom: smooth random fields, rotations, implicit surfaces, tubes and the voxel grid.

Everything is in physical millimetres (so any, also anisotropic, spacing draws the same anatomy);
:class:`Waves` is the resolution-independent randomness every warp and bump of the phantom is made
of, and :class:`Grid` turns mm shapes into voxel masks. Used by the heart, the vessels and the
surroundings alike.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine with ``spacing`` on the diagonal and the volume centred on the origin."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = -(np.asarray(shape, float) - 1) / 2 * np.asarray(spacing, float)
    return aff


class Waves:
    """Smooth random field: ``sum_k amp_k cos(<w_k, x> + phi_k)``, ``dim`` components, x in mm."""

    def __init__(self, rng, n: int, wavelength: tuple[float, float], amp: float, dim: int = 1):
        d = rng.normal(size=(dim, n, 3))
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        lam = rng.uniform(*wavelength, size=(dim, n, 1))
        self.k = (2 * np.pi * d / lam).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(dim, n)).astype(np.float32)
        self.amp = (amp * rng.uniform(0.5, 1.0, size=(dim, n)) / np.sqrt(n / 2)).astype(np.float32)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """p: (..., 3) -> (..., dim), or (...) when dim == 1."""
        out = np.stack([np.cos(p @ k.T + ph) @ a for k, ph, a in zip(self.k, self.phase, self.amp)], -1)
        return out[..., 0] if out.shape[-1] == 1 else out

    def grid(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """The field on the grid ``axes`` (x (X,), y (Y,), z (Z,)) mm: a separable sum, one matrix product."""
        out = []
        for k, ph, a in zip(self.k, self.phase, self.amp):
            ex, ey, ez = (np.exp(1j * (np.outer(k[:, d], axes[d]))).astype(np.complex64) for d in range(3))
            ex *= (a * np.exp(1j * ph))[:, None]
            exy = ex[:, :, None] * ey[:, None, :]
            out.append(np.tensordot(exy, ez, axes=(0, 0)).real.astype(np.float32))
        return out[0] if len(out) == 1 else np.stack(out, -1)


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def rotation(axis, angle: float) -> np.ndarray:
    x, y, z = unit(axis)
    c, s = np.cos(angle), np.sin(angle)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * k @ k


def ellipsoid_sdf(q: np.ndarray, axes) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to an axis-aligned ellipsoid; q: (..., 3) centred."""
    axes = np.asarray(axes, np.float32)
    qa = q / axes
    rn = np.sqrt((qa * qa).sum(-1))
    grad = np.sqrt(((qa / axes) ** 2).sum(-1)) / np.maximum(rn, 1e-6)
    return (rn - 1) / np.maximum(grad, 1.0 / float(axes.max()))


def spline(ctrl, step: float, radii=None):
    """Catmull-Rom spline through ``ctrl`` (K, 3) resampled every ``step`` mm; radii interpolated."""
    ctrl = np.asarray(ctrl, float)
    pad = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    t = np.linspace(0, 1, 24, endpoint=False)[:, None]
    dense = []
    for i in range(len(ctrl) - 1):
        p0, p1, p2, p3 = pad[i:i + 4]
        dense.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                            + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    dense.append(ctrl[-1:])
    dense = np.vstack(dense)
    return resample(dense, step, radii)


def resample(pts, step: float, radii=None):
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    si = np.linspace(0, s[-1], n)
    out = np.stack([np.interp(si, s, pts[:, d]) for d in range(3)], -1)
    if radii is None:
        return out
    r = np.interp(si / max(s[-1], 1e-9), np.linspace(0, 1, len(radii)), radii)
    return out, r


class Grid:
    def __init__(self, shape, spacing):
        self.shape = tuple(int(v) for v in shape)
        self.spacing = np.asarray(spacing, float)
        self.affine = phantom_affine(self.shape, self.spacing)
        self.origin = self.affine[:3, 3]
        axes = [(self.origin[d] + self.spacing[d] * np.arange(self.shape[d])).astype(np.float32) for d in range(3)]
        self.axes = axes
        self.pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)  # (X, Y, Z, 3) mm

    def splat(self, mask: np.ndarray, pts, radii, chunk: int = 12) -> None:
        """OR balls (centres ``pts`` (N, 3) mm, ``radii`` (N,) mm) into ``mask`` (X, Y, Z), a chunk at a time."""
        pts = np.asarray(pts, np.float32)
        radii = np.broadcast_to(np.asarray(radii, np.float32), (len(pts),))
        sh = np.asarray(self.shape)
        for i in range(0, len(pts), chunk):
            p, r = pts[i:i + chunk], radii[i:i + chunk]
            lo = np.maximum(np.ceil(((p - r[:, None]).min(0) - self.origin) / self.spacing), 0).astype(int)
            hi = np.minimum(np.floor(((p + r[:, None]).max(0) - self.origin) / self.spacing) + 1, sh).astype(int)
            if (hi <= lo).any():
                continue
            dx, dy, dz = ((self.axes[d][lo[d]:hi[d], None] - p[None, :, d]) ** 2 for d in range(3))
            d2 = dx[:, None, None, :] + dy[None, :, None, :] + dz[None, None, :, :]
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= (d2 <= r * r).any(-1)

