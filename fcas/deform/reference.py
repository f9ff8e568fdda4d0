"""MGM as the paper writes it (Eq. 5-6), per class with SciPy: the reference the fast :func:`fcas.deform.mgm_deform`
is tested against voxel for voxel (tests/test_mgm.py) and timed against (benchmarks/mgm.py). Slow by design:
every class is warped on its own with ``scipy.ndimage.map_coordinates(order=0)``, closed, and unioned.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from fcas.deform.field import affine_matrix, check_geometry, node_counts, smooth_field_mm
from fcas.deform.params import MGMParams
from fcas.labels import LabelSchema, default_schema

__all__ = ["literal_coordinates", "literal_mgm"]


def literal_coordinates(params: MGMParams, shape, spacing) -> np.ndarray:
    """Full-resolution pull-back map ``(3, D, H, W)`` float32, computed per voxel (see fcas.deform.field).

    The affine part is exact per voxel; the smooth field is the same control-grid field as ours,
    upsampled by ``scipy.ndimage.zoom(order=1)`` (corner-aligned, i.e. the same trilinear map).
    """
    shape, sp = check_geometry(shape, spacing)
    c = (np.asarray(shape, float) - 1) / 2
    ainv = np.linalg.inv(affine_matrix(params)).astype(np.float32)
    nodes = node_counts(shape, sp, params)
    q = np.stack(np.meshgrid(*[((np.arange(n) - c[a]) * sp[a]).astype(np.float32) for a, n in enumerate(shape)],
                             indexing="ij"))
    if params.alpha_mm > 0:
        step = np.array([(n - 1) * s / (g - 1) if n > 1 else s for n, s, g in zip(shape, sp, nodes)])
        u = smooth_field_mm(params, nodes, step)
        q += np.stack([ndi.zoom(u[a], [n / g for n, g in zip(shape, nodes)], order=1, grid_mode=False)
                       for a in range(3)]).astype(np.float32)
    q -= np.asarray(params.translation_mm, np.float32)[:, None, None, None]
    p = np.einsum("ab,b...->a...", ainv, q)
    return p / sp.astype(np.float32)[:, None, None, None] + c.astype(np.float32)[:, None, None, None]


def literal_mgm(mask: np.ndarray, coords: np.ndarray, schema: LabelSchema | None = None,
                closing: str = "maxpool", overlap: str = "priority") -> np.ndarray:
    """Eq. 6 literally: each class warped on its own (order 0), closed, unioned by priority.

    ``closing="maxpool"``: ``maximum_filter(size=2)`` (the paper); ``"closing"``: then
    ``minimum_filter(size=2, origin=-1)`` with the border counted as set; ``"none"``: no closing.
    ``overlap="keep"``: a voxel some class was warped to keeps that class; the closed union only
    fills the rest.
    """
    schema = schema or default_schema()
    warped, closed = {}, {}
    for cid in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:]) + 1:
        w = ndi.map_coordinates((mask == cid).astype(np.uint8), coords, order=0, mode="constant", cval=0)
        warped[int(cid)] = w
        if closing in ("maxpool", "closing"):
            w = ndi.maximum_filter(w, size=2, mode="constant", cval=0)
        if closing == "closing":
            w = ndi.minimum_filter(w, size=2, origin=-1, mode="constant", cval=1)
        closed[int(cid)] = w
    out = schema.union(closed, coords.shape[1:])
    if overlap == "keep":
        plain = schema.union(warped, coords.shape[1:])
        out = np.where(plain != 0, plain, out)
    return out
