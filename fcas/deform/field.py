"""The composed MGM sampling field (the paper's Eq. 5): affine T_a then non-rigid T_nr, in mm.

Convention (pull-back, as every resampler): output voxel ``x`` (array index) reads the template at

    q   = (x - c) * s                      # mm about the grid centre c = (shape - 1) / 2, spacing s
    p   = A^-1 (q + u(q) - t)              # undo the affine of MGMParams, after the smooth field u
    x'  = p / s + c                        # template index read by output voxel x

so the template is first moved by the affine ``p -> A p + t`` (T_a) and the result is then warped by
the smooth displacement ``u`` (T_nr). Everything is in millimetres, so anisotropic spacing rotates
and scales physically, not in index units.

The non-rigid field u (α, ζ): white Gaussian noise on a control grid with a node every ζ/2 mm
(with a margin of 3 Gaussian sigmas so the borders are not special), smoothed with a Gaussian of
standard deviation ζ mm (``scipy.ndimage.gaussian_filter``), cropped, and rescaled so that the RMS
displacement length over the grid is exactly α mm. Its noise comes from
``default_rng(params.field_seed)``, so the field is a pure function of (params, shape, spacing).

Speed: the whole map x -> x' is evaluated only on the control grid (:func:`control_coordinates`,
``(3, g0, g1, g2)`` float64, nodes at ``linspace(0, n_a - 1, g_a)``) and upsampled trilinearly to the
voxels. Trilinear interpolation reproduces the affine part exactly (it is linear), up to float32
rounding (~1e-5 voxel); the smooth field is sampled at half its correlation length, where linear
interpolation keeps its statistics. :func:`dense_coordinates` gives the full ``(3, D, H, W)``
float32 map for references and tests; :mod:`fcas.deform.mgm` streams it slab by slab instead.

Hand-written here (numpy/scipy): MONAI's ``Rand3DElastic`` builds a full-resolution field, which is
what made it slow (see benchmarks/mgm.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from fcas.deform.params import MGMParams

__all__ = [
    "affine_matrix",
    "index_affine",
    "smooth_field_mm",
    "control_coordinates",
    "dense_coordinates",
    "ControlGrid",
    "check_geometry",
]


def check_geometry(shape, spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """Validate a 3D ``shape`` and positive ``spacing`` (mm); returns (shape, spacing float64)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"MGM needs a 3D grid, got shape {shape}")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    return shape, sp


def _rot(axis: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_matrix(params: MGMParams) -> np.ndarray:
    """``A = R_2 R_1 R_0 @ H @ S`` of :class:`MGMParams` (3x3, float64, acts on mm vectors)."""
    r = _rot(2, params.rotation_deg_2) @ _rot(1, params.rotation_deg_1) @ _rot(0, params.rotation_deg_0)
    h = np.array([[1.0, params.shear_01, params.shear_02], [0.0, 1.0, params.shear_12], [0.0, 0.0, 1.0]])
    return r @ h @ np.diag(params.scale)


def index_affine(params: MGMParams, shape, spacing) -> np.ndarray:
    """The affine part of the pull-back map in index space, ``x' = M[:3, :3] x + M[:3, 3]`` (4x4).

    This is exactly what a literal resampler (``scipy.ndimage.map_coordinates``) would be given.
    """
    shape, sp = check_geometry(shape, spacing)
    c = (np.asarray(shape, dtype=np.float64) - 1) / 2
    ainv = np.linalg.inv(affine_matrix(params))
    m = np.diag(1 / sp) @ ainv @ np.diag(sp)
    t = np.asarray(params.translation_mm)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = c - m @ c - (np.diag(1 / sp) @ ainv @ t)
    return out


def node_counts(shape, sp: np.ndarray, params: MGMParams) -> tuple[int, int, int]:
    if params.alpha_mm == 0.0:
        return (2, 2, 2)
    step = params.zeta_mm / 2
    return tuple(max(2, math.ceil((n - 1) * s / step) + 1) for n, s in zip(shape, sp))


def smooth_field_mm(params: MGMParams, nodes: tuple[int, int, int], node_step_mm: np.ndarray) -> np.ndarray:
    """Smooth random displacement on a grid of ``nodes`` spaced ``node_step_mm``: ``(3, *nodes)`` mm.

    RMS displacement length == ``params.alpha_mm`` exactly; zero field when α = 0.
    """
    if params.alpha_mm == 0.0:
        return np.zeros((3, *nodes))
    sigma = params.zeta_mm / np.maximum(node_step_mm, 1e-12)  # Gaussian sigma in nodes, per axis
    margin = [int(math.ceil(3 * s)) for s in sigma]
    big = tuple(n + 2 * m for n, m in zip(nodes, margin))
    rng = np.random.default_rng(int(params.field_seed))
    noise = rng.standard_normal((3, *big))
    crop = tuple(slice(m, m + n) for n, m in zip(nodes, margin))
    u = np.stack([ndi.gaussian_filter(noise[a], sigma, mode="nearest", truncate=3.0)[crop] for a in range(3)])
    rms = math.sqrt(float(np.mean(np.sum(u * u, axis=0))))
    if rms == 0.0:
        return np.zeros((3, *nodes))
    return u * (params.alpha_mm / rms)


@dataclass(frozen=True)
class ControlGrid:
    """Pull-back coordinates on the control grid.

    Attributes:
        coords: ``(3, g0, g1, g2)`` float64 template indices read at the nodes.
        shape: the voxel grid ``(D, H, W)``; node ``k`` of axis ``a`` sits at index
            ``k * (shape[a] - 1) / (g_a - 1)``.
    """

    coords: np.ndarray
    shape: tuple[int, int, int]

    @property
    def nodes(self) -> tuple[int, int, int]:
        return tuple(self.coords.shape[1:])


def control_coordinates(params: MGMParams, shape, spacing) -> ControlGrid:
    """The pull-back map of Eq. 5 evaluated on the control grid (see module docstring)."""
    shape, sp = check_geometry(shape, spacing)
    nodes = node_counts(shape, sp, params)
    c = (np.asarray(shape, dtype=np.float64) - 1) / 2
    axes = [np.linspace(0.0, n - 1, g) if n > 1 else np.zeros(g) for n, g in zip(shape, nodes)]
    step_mm = np.array([((n - 1) * s / (g - 1)) if n > 1 else s for n, s, g in zip(shape, sp, nodes)])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, g0, g1, g2) output indices
    q = (grid - c[:, None, None, None]) * sp[:, None, None, None]  # mm
    q = q + smooth_field_mm(params, nodes, step_mm)
    q = q - np.asarray(params.translation_mm)[:, None, None, None]
    ainv = np.linalg.inv(affine_matrix(params))
    p = np.einsum("ab,b...->a...", ainv, q)
    x = p / sp[:, None, None, None] + c[:, None, None, None]
    return ControlGrid(coords=x, shape=shape)


def lerp_weights(n: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node and weight (float32) of each of ``n`` voxels on ``g`` nodes spanning ``[0, n-1]``."""
    if n == 1:
        return np.zeros(1, dtype=np.intp), np.zeros(1, dtype=np.float32)
    pos = np.arange(n, dtype=np.float64) * ((g - 1) / (n - 1))
    k = np.minimum(np.floor(pos).astype(np.intp), g - 2)
    return k, (pos - k).astype(np.float32)


def upsample_axes12(grid: ControlGrid, offset: float = 0.0) -> np.ndarray:
    """Interpolate the control coordinates along axes 1 and 2: ``(3, g0, H, W)`` float32 (+ offset)."""
    _, h, w = grid.shape
    c = grid.coords.astype(np.float32) + np.float32(offset)
    for axis, n in ((3, w), (2, h)):
        k, wt = lerp_weights(n, c.shape[axis])
        a = np.take(c, k, axis=axis)
        b = np.take(c, np.minimum(k + 1, c.shape[axis] - 1), axis=axis)
        shp = [1, 1, 1, 1]
        shp[axis] = n
        c = a + (b - a) * wt.reshape(shp)
    return np.ascontiguousarray(c)


def dense_coordinates(params: MGMParams, shape, spacing, offset: float = 0.0) -> np.ndarray:
    """The full pull-back map ``(3, D, H, W)`` float32 (plus ``offset``).

    With ``offset=fcas.deform.mgm.OFFSET`` (64.5) these are bit for bit the values
    :func:`fcas.deform.mgm.warp_labels` truncates (``x' + 64.5`` is positive on its zero-padded
    template, so truncation is ``floor(x' + 0.5) + 64``); subtracting the offset again is exact.
    """
    grid = control_coordinates(params, shape, spacing)
    c = upsample_axes12(grid, offset)
    k, wt = lerp_weights(grid.shape[0], c.shape[1])
    a = np.take(c, k, axis=1)
    b = np.take(c, np.minimum(k + 1, c.shape[1] - 1), axis=1)
    return a + (b - a) * wt.reshape(1, -1, 1, 1)
