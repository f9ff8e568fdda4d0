"""MGM deformation (the paper's §3.1.3, Eq. 5-6): warp a label map, close each class, union the classes.

``mgm_deform(mask, spacing, params)`` computes

    M~ = U_i  Close_2x2x2( Λ(M^i, Ω, Ψ) )          (Eq. 6, union over the classes)

where Λ is a nearest-neighbour pull-back warp through the composed field of
:mod:`fcas.deform.field`. It is computed without ever materialising the per-class masks and
gives the same voxels as the literal per-class formulation (tests/test_mgm.py checks it bit for
bit against ``scipy.ndimage.map_coordinates(order=0)`` + ``maximum_filter(size=2)`` + union):

1. *Warp once.* For order 0 the warp of the one-hot class ``i`` is the indicator of class ``i`` in
   the warped label map, so all classes are warped by ONE gather. Each class is first given one bit
   of a small integer code (uint8 for <= 8 classes), and the codes are gathered.
2. *Close all classes at once.* A 2x2x2 max-pool of a binary mask is an OR over the 8 window
   voxels, a min-pool an AND; on bit codes one bitwise OR / AND does it for every class together,
   separably along the three axes (3 ops each).
3. *Union* is a lookup table from bit pattern to the label of its highest-priority class
   (``configs/labels/*.yaml``: thin structures win). Where closed classes overlap, ``overlap=``
   decides: ``"keep"`` (default) -- a voxel the warp gave a class keeps it, and the closing only
   claims background voxels (by priority among the claimants); ``"priority"`` -- the
   highest-priority closed class wins everywhere, the literal "union by priority" of the design.
   With ``"priority"`` a thin high-priority class's closing can cut a low-priority chamber in two
   (measured on phantoms: docs/benchmarks.md); with ``"keep"`` no class ever loses a warped
   voxel, so closing can only merge components, never split one.

The gather runs slab by slab (a few planes of axis 0 at a time, in cache) with the pull-back
coordinates interpolated from the control grid on the fly, optionally on two threads (numpy
releases the GIL). Nearest-neighbour rounding is ``floor(x' + 0.5)`` like scipy's ``order=0``;
a coordinate that rounds outside the grid reads background (scipy's ``mode="constant"`` also
drops the half voxel ``[-0.5, 0)`` and ``(n-1, n-0.5]``; we keep it, so a near-identity
transform does not erase the border planes -- the only place the two can differ).

Closing variants (``closing=``):

* ``"maxpool"`` -- the paper's Eq. 6: a 2x2x2 max-pool, stride 1, same size. An even kernel has
  no centre; we align it as ``scipy.ndimage.maximum_filter(size=2)`` does: output voxel ``x`` is
  the max over ``x - {0, 1}^3`` (zero padding at the low border). It dilates every class by one
  voxel towards +i, +j, +k (class centroids move by +0.5 voxel per axis).
* ``"closing"`` -- size-preserving morphological closing with the same 2x2x2 element: the
  max-pool above, then a min-pool over ``x + {0, 1}^3`` (padding counts as set). It fills the
  one-voxel gaps the max-pool fills, but gives back the one-voxel growth and the half-voxel shift.
* ``"none"`` -- the raw nearest-neighbour warp (for measurements).

With identity parameters (:attr:`MGMParams.is_identity`) the warp reads every voxel from itself
and there are no discretisation fractures to repair, so the input is returned unchanged (no
closing): identity is bit-exact for every variant.

The default is ``closing="closing"``, ``overlap="keep"``: of the five variants it has the best QC pass
rate at unbiased class volumes, while the paper's max-pool triples the coronaries and, unioned by
priority, splits the LV (``python benchmarks/mgm.py --study``; the table and the speed figures are in
``docs/benchmarks.md``, "MGM closing variants"). ``configs/mgm/paper.yaml`` selects the literal Eq. 6.

The warp and closing are hand-written on numpy (the per-class scipy route is the reference);
MONAI has no priority-union label warp.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from fcas.deform.field import ControlGrid, lerp_weights, check_geometry, control_coordinates, upsample_axes12
from fcas.deform.params import MGMParams
from fcas.labels import LabelSchema, default_schema

__all__ = ["CLOSINGS", "OVERLAPS", "OFFSET", "mgm_deform", "warp_labels", "validate_mask", "class_counts"]

CLOSINGS = ("closing", "maxpool", "none")
OVERLAPS = ("keep", "priority")
_PAD_MAX = 64
OFFSET = _PAD_MAX + 0.5  # the gather truncates x' + 64.5 (> 0 on the padded grid): trunc == floor(x' + 0.5) + 64
_CHUNK_VOXELS = 1 << 15


def class_counts(mask: np.ndarray) -> np.ndarray:
    """Voxel count of every id 0..255 (``(256,)`` int64) of a uint8 label map."""
    return np.bincount(mask.reshape(-1), minlength=256)


def validate_mask(mask, schema: LabelSchema | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check an MGM input and return ``(mask uint8 (D, H, W) C-contiguous, class_counts)``.

    Raises ``ValueError`` for a non-integer (float, bool) dtype, a non-3D array, ids the schema does
    not define, and a mask with no foreground voxel.
    """
    schema = schema or default_schema()
    if hasattr(mask, "detach"):  # torch tensor
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"MGM needs an integer label map, got dtype {mask.dtype}")
    if mask.ndim != 3:
        raise ValueError(f"MGM needs a 3D label map (D, H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"MGM got an empty array of shape {mask.shape}")
    if mask.dtype != np.uint8:
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"label ids must be in 0..255, got range [{lo}, {hi}]")
        mask = mask.astype(np.uint8)
    mask = np.ascontiguousarray(mask)
    counts = class_counts(mask)
    valid = schema.valid_ids_lut()
    bad = [int(v) for v in np.flatnonzero(counts) if not valid[v]]
    if bad:
        raise ValueError(f"label ids {bad} are not in schema {schema.name!r} ({sorted(schema.classes.values())})")
    if counts[1:].sum() == 0:
        raise ValueError("MGM got an empty mask (no foreground voxel)")
    return mask, counts


# ---- warp ----------------------------------------------------------------------------------------
class _Gather:
    """Slab-wise nearest-neighbour gather of ``padded`` codes through a control grid.

    ``c12`` holds the control coordinates plus ``OFFSET`` (64.5), interpolated along axes 1, 2;
    for output plane ``i`` the coordinates are ``c12[:, k] + (c12[:, k+1] - c12[:, k]) * w`` and
    ``trunc`` of them is ``floor(x' + 0.5) + 64``. ``padded`` has ``pad_lo[a]`` zero voxels before
    axis ``a``, so the flat index is ``sum(trunc_a * stride_a) - base``.
    """

    def __init__(self, padded, pad_lo, c12, k0, w0, out, clip_bounds):
        self.flat = padded.reshape(-1)
        self.c12 = c12
        self.dif = c12[:, 1:] - c12[:, :-1]
        self.k0, self.w0, self.out = k0, w0, out
        d, h, w = out.shape
        self.hw = (h, w)
        self.strides = (padded.shape[1] * padded.shape[2], padded.shape[2])
        shift = [_PAD_MAX - p for p in pad_lo]
        self.base = shift[0] * self.strides[0] + shift[1] * self.strides[1] + shift[2]
        self.clip_bounds = clip_bounds
        self.chunk = max(1, _CHUNK_VOXELS // (h * w))

    def run(self, starts: Sequence[int], counter=None) -> None:
        """Gather the chunks beginning at ``starts``; with a shared ``counter`` (``itertools.count``)
        each worker takes the next free chunk, so a descheduled thread does not hold the others up."""
        if counter is not None:
            starts = _claim(starts, counter)
        h, w = self.hw
        m = self.chunk
        cb = np.empty((3, m, h, w), np.float32)
        ib = np.empty((3, m, h, w), np.intp)
        idx = np.empty((m, h, w), np.intp)
        s0, s1 = self.strides
        d = self.out.shape[0]
        for s in starts:
            e = min(d, s + m)
            n = e - s
            c, ii, ix = cb[:, :n], ib[:, :n], idx[:n]
            for j in range(n):  # == a + (b - a) * w of field.dense_coordinates, bit for bit
                k = self.k0[s + j]
                np.multiply(self.dif[:, k], self.w0[s + j], out=c[:, j])
                np.add(c[:, j], self.c12[:, k], out=c[:, j])
            if self.clip_bounds is not None:
                for a, (lo, hi) in enumerate(self.clip_bounds):
                    np.clip(c[a], lo, hi, out=c[a])
            np.copyto(ii, c, casting="unsafe")  # truncation == floor: values are > 0
            np.multiply(ii[0], s0, out=ix)
            np.multiply(ii[1], s1, out=ii[1])
            np.add(ix, ii[1], out=ix)
            np.add(ix, ii[2], out=ix)
            if self.base:
                np.subtract(ix, self.base, out=ix)
            np.take(self.flat, ix, out=self.out[s:e], mode="clip")


def _claim(starts: Sequence[int], counter):
    while True:
        i = next(counter)  # atomic under the GIL
        if i >= len(starts):
            return
        yield starts[i]


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        num_threads = int(os.environ.get("FCAS_MGM_THREADS", "0")) or 1
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return num_threads


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fcas-mgm")
        return _POOLS[n]


def _pads(grid: ControlGrid) -> tuple[list[int], list[int], bool]:
    """Zero padding that holds every coordinate of the grid (or 1 voxel and clipping)."""
    cmin = grid.coords.reshape(3, -1).min(axis=1)
    cmax = grid.coords.reshape(3, -1).max(axis=1)
    lo = [max(1, int(math.ceil(-v)) + 2) for v in cmin]  # +2: float32 slack of the interpolation
    hi = [max(1, int(math.ceil(v - (n - 1))) + 2) for v, n in zip(cmax, grid.shape)]
    padded = np.prod([n + a + b for n, a, b in zip(grid.shape, lo, hi)])
    if max(lo + hi) > _PAD_MAX or padded > 2 * np.prod(grid.shape) + (1 << 20):
        return [1, 1, 1], [1, 1, 1], True
    return lo, hi, False


def warp_labels(codes: np.ndarray, grid: ControlGrid, num_threads: int | None = None) -> np.ndarray:
    """Nearest-neighbour pull-back warp of an integer volume through a control grid.

    Args:
        codes: ``(D, H, W)`` integer array (labels or class bit codes); read as 0 outside the grid.
        grid: :func:`fcas.deform.field.control_coordinates` for the same ``(D, H, W)``.
        num_threads: gather threads (default ``$FCAS_MGM_THREADS`` or 1; numpy releases the GIL).

    Returns:
        ``(D, H, W)`` array of ``codes.dtype``: ``out[x] = codes[floor(x'(x) + 0.5)]``, 0 where that
        voxel is outside the grid.
    """
    if codes.shape != grid.shape:
        raise ValueError(f"codes shape {codes.shape} != control grid shape {grid.shape}")
    d = codes.shape[0]
    lo, hi, clip = _pads(grid)
    padded = np.zeros(tuple(n + a + b for n, a, b in zip(codes.shape, lo, hi)), dtype=codes.dtype)
    padded[lo[0]:lo[0] + codes.shape[0], lo[1]:lo[1] + codes.shape[1], lo[2]:lo[2] + codes.shape[2]] = codes
    bounds = None
    if clip:  # out-of-grid reads land on the one-voxel zero border
        bounds = [(np.float32(_PAD_MAX - 1), np.float32(_PAD_MAX + n)) for n in codes.shape]
    c12 = upsample_axes12(grid, OFFSET)
    k0, w0 = lerp_weights(d, grid.nodes[0])
    out = np.empty(codes.shape, dtype=codes.dtype)
    g = _Gather(padded, lo, c12, k0, w0, out, bounds)
    starts = list(range(0, d, g.chunk))
    n = min(_threads(num_threads), len(starts))
    if n == 1:
        g.run(starts)
    else:
        counter = itertools.count()
        futures = [_pool(n).submit(g.run, starts, counter) for _ in range(n)]
        for f in futures:
            f.result()
    return out


# ---- closing on bit codes ------------------------------------------------------------------------
def _axis_slices(axis: int):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis] = slice(None, -1)
    hi[axis] = slice(1, None)
    return tuple(lo), tuple(hi)


def _maxpool_low(a: np.ndarray) -> None:
    """In place: ``a[x] = OR a[x - {0,1}^3]`` (zero padding) -- maximum_filter(size=2) per bit."""
    for axis in range(3):
        lo, hi = _axis_slices(axis)
        np.bitwise_or(a[hi], a[lo], out=a[hi])


def _minpool_high(a: np.ndarray) -> None:
    """In place: ``a[x] = AND a[x + {0,1}^3]`` (padding counts as set)."""
    for axis in range(3):
        lo, hi = _axis_slices(axis)
        np.bitwise_and(a[lo], a[hi], out=a[lo])


def _code_tables(present_ids: Sequence[int], closed_ids: set[int], schema: LabelSchema):
    """Bit per present class (priority order), id->code LUT, code->id LUT, mask of closed bits."""
    order = [c for c in schema.priority_ids if c in present_ids]  # highest priority first
    nb = len(order)
    dtype = np.uint8 if nb <= 8 else np.uint16 if nb <= 16 else np.uint32
    if nb > 16:
        raise ValueError(f"MGM closes at most 16 classes at once, got {nb}")
    enc = np.zeros(256, dtype=dtype)
    closed = 0
    for bit, cid in enumerate(order):
        enc[cid] = 1 << bit
        if cid in closed_ids:
            closed |= 1 << bit
    dec = np.zeros(1 << nb, dtype=np.uint8)
    patterns = np.arange(1 << nb)
    for bit in range(nb - 1, -1, -1):  # lowest priority first, higher ones overwrite
        dec[(patterns >> bit) & 1 == 1] = order[bit]
    return enc, dec, dtype(closed)


def mgm_deform(
    mask,
    spacing,
    params: MGMParams,
    closing: str = "closing",
    schema: LabelSchema | None = None,
    closed_classes: Sequence[int] | str = "all",
    num_threads: int | None = None,
    overlap: str = "keep",
) -> np.ndarray:
    """MGM, Eq. 5-6: warp ``mask`` by ``params`` and close every class, unioned by priority.

    Args:
        mask: ``(D, H, W)`` integer label map (ids of ``schema``) in NIfTI (i, j, k) order.
        spacing: voxel size in mm along (i, j, k) (a scalar means isotropic).
        params: the transform (:func:`fcas.deform.params.draw_params`).
        closing: ``"closing"`` (size-preserving), ``"maxpool"`` (the paper's Eq. 6) or ``"none"``.
        schema: label schema (union priority); default ``configs/labels/cardiac.yaml``.
        closed_classes: ``"all"`` present classes, ``"cardiac"`` (the eight of the seed; surrounding
            tissues are warped but not closed) or explicit ids.
        num_threads: gather threads (see :func:`warp_labels`).
        overlap: where closed classes overlap: ``"keep"`` -- a voxel the warp gave a class keeps
            it and closing only claims background voxels (highest priority first); ``"priority"``
            -- the highest-priority closed class wins everywhere (a thin class's closing may then
            cut through a lower-priority neighbour).

    Returns:
        ``(D, H, W)`` uint8 label map on the same grid.
    """
    if closing not in CLOSINGS:
        raise ValueError(f"unknown closing {closing!r}; use one of {CLOSINGS}")
    if overlap not in OVERLAPS:
        raise ValueError(f"unknown overlap rule {overlap!r}; use one of {OVERLAPS}")
    schema = schema or default_schema()
    mask, counts = validate_mask(mask, schema)
    shape, sp = check_geometry(mask.shape, spacing)
    if not isinstance(params, MGMParams):
        raise ValueError(f"params must be MGMParams, got {type(params).__name__}")
    if params.is_identity:
        return mask.copy()
    grid = control_coordinates(params, shape, sp)
    if closing == "none":
        return warp_labels(mask, grid, num_threads)
    present = [int(v) for v in np.flatnonzero(counts[1:]) + 1]
    if isinstance(closed_classes, str):
        if closed_classes == "all":
            closed = set(present)
        elif closed_classes == "cardiac":
            closed = set(schema.cardiac_ids)
        else:
            raise ValueError(f"closed_classes must be 'all', 'cardiac' or a list of ids, got {closed_classes!r}")
    else:
        closed = {int(c) for c in closed_classes}
    enc, dec, closed_bits = _code_tables(present, closed, schema)
    codes = warp_labels(enc[mask], grid, num_threads)
    if closed_bits == 0:
        return dec[codes]
    full = closed_bits == (1 << len(present)) - 1
    work = codes.copy() if full else codes & closed_bits
    _maxpool_low(work)
    if closing == "closing":
        _minpool_high(work)
    if overlap == "keep":
        np.copyto(work, codes, where=codes != 0)  # warped voxels keep their class; closing fills background
    elif not full:
        work |= codes & ~closed_bits
    return np.take(dec, work)
