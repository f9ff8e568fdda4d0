"""Procedural contrast-enhanced cardiac CTA phantom: the bundled data of tests and ``make demo``.

:func:`make_case` draws one case from ``numpy.random.default_rng(seed)``: a CT image in HU and a
label map in the ids of ``configs/labels/cardiac.yaml`` on one grid, with a RAS+ affine (spacing on
the diagonal, volume centred on the origin). Array axes are the NIfTI (i, j, k) order: i runs to the
patient's right (+x), j to anterior (+y), k to superior (+z).

Anatomy is built in physical millimetres, so any (also anisotropic) spacing gives the same heart:

* ventricles in a heart frame whose long axis points left-anterior-inferior (about 45 deg):
  LV cavity as a truncated ellipsoid, LV myocardium as an offset shell around it (open at the valve
  plane), RV as a crescent against the septum with an outflow tract leading to the pulmonary valve;
* atria above/behind the valve plane (LA posterior, RA right), thin unlabelled atrial/RV walls;
* ascending aorta (LV outflow, going up) and pulmonary artery (RV outflow, going up-left-back in front
  of the aorta, with its bifurcation) as curved tubes (union of spheres along a spline);
* left (left main -> LAD + LCx, with diagonals / marginals) and right (RCA, marginals, PDA) coronary
  trees as thin tapering tubes projected onto the epicardial surface (outside myocardium and RV
  wall), each starting inside the aortic root; drawn last with the highest priority;
* surroundings: lungs with vessels, vertebral body, ribs, sternum (bone, cortical shell), chest
  wall and liver below the diaphragm (soft tissue), descending aorta, SVC, oesophagus, epicardial and
  mediastinal fat. Label 0 (background) marks tissue the schema has no class for: fat, RV and
  atrial walls, descending aorta, SVC, oesophagus, air outside the body.

Every surface is perturbed by a smooth random global warp plus per-structure low-frequency bumps
(sums of random plane waves: resolution independent). The image is a per-class HU table (drawn per
seed), blurred (partial volume) with correlated Gaussian noise, clipped to [-1024, 3071].

Connectivity is 26-connectivity throughout. Safety net: each single-component cardiac class keeps
its largest component and coronary components not touching the aorta are dropped;
``PhantomCase.info["fixed_voxels"]`` counts the voxels this moved (seeds 0..49 at 64^3: one voxel
on one seed, 0 on the others; over seeds 0..199 it acted on 4 seeds).

Hand-written: neither MONAI nor any other library ships an anatomical heart phantom with coronaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from fcas.labels import LabelSchema, default_schema

__all__ = ["PhantomCase", "make_case", "DOMAINS", "phantom_affine", "class_volumes", "check_topology"]

HU_MIN, HU_MAX = -1024, 3071
_IDS = dict(lv=1, rv=2, la=3, ra=4, myo=5, aorta=6, pa=7, cor=8, lung=9, bone=10, soft=11)
SINGLE_COMPONENT = ("left_ventricle", "right_ventricle", "left_atrium", "right_atrium",
                    "lv_myocardium", "ascending_aorta", "pulmonary_artery")
_CONN26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One phantom case.

    image: (X, Y, Z) int16 HU; label: (X, Y, Z) uint8 class ids; affine: (4, 4) float64 RAS+.
    info: the drawn parameters (scale, tilt, HU levels, ...) and ``fixed_voxels``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    seed: int
    info: Mapping = field(default_factory=dict)


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine with ``spacing`` on the diagonal and the volume centred on the origin."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = -(np.asarray(shape, float) - 1) / 2 * np.asarray(spacing, float)
    return aff


# ---- smooth random fields and geometry helpers ------------------------------------------------
class _Waves:
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


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rotation(axis, angle: float) -> np.ndarray:
    x, y, z = _unit(axis)
    c, s = np.cos(angle), np.sin(angle)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * k @ k


def _ellipsoid_sdf(q: np.ndarray, axes) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to an axis-aligned ellipsoid; q: (..., 3) centred."""
    axes = np.asarray(axes, np.float32)
    qa = q / axes
    rn = np.sqrt((qa * qa).sum(-1))
    grad = np.sqrt(((qa / axes) ** 2).sum(-1)) / np.maximum(rn, 1e-6)
    return (rn - 1) / np.maximum(grad, 1.0 / float(axes.max()))


def _spline(ctrl, step: float, radii=None):
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
    return _resample(dense, step, radii)


def _resample(pts, step: float, radii=None):
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    si = np.linspace(0, s[-1], n)
    out = np.stack([np.interp(si, s, pts[:, d]) for d in range(3)], -1)
    if radii is None:
        return out
    r = np.interp(si / max(s[-1], 1e-9), np.linspace(0, 1, len(radii)), radii)
    return out, r


class _Grid:
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


# ---- the heart -------------------------------------------------------------------------------
class _Heart:
    """Chambers as implicit surfaces in a tilted heart frame (u: base->apex, v: LV->RV, w = u x v)."""

    def __init__(self, rng, g: float):
        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
        # long axis: ~45 deg left, anterior and inferior, with a random tilt of up to ~12 deg
        a = _unit([-0.62, 0.52, -0.58])
        a = _rotation(rng.normal(size=3), np.deg2rad(u(-12, 12))) @ a
        s = np.array([1.0, 0.55, 0.05])
        s = _unit(s - (s @ a) * a)
        s = _rotation(a, np.deg2rad(u(-12, 12))) @ s
        self.R = np.stack([a, s, np.cross(a, s)]).astype(np.float32)  # rows: heart axes in body coords
        self.A = 40 * g * u(0.9, 1.1)       # LV cavity semi-axis along u
        self.Bv = 17 * g * u(0.9, 1.1)     # LV cavity semi-axes across
        self.Bw = self.Bv * u(0.9, 1.1)
        self.c = 0.25 * self.A              # LV ellipsoid centre on the u axis; base plane at u = 0
        self.T = 7.0 * g * u(0.85, 1.15)    # myocardial thickness
        self.utv = u(2.0, 5.0)              # tricuspid plane (RV starts below it)
        self.rv_c = np.array([0.1 * self.A, self.Bv + self.T - 2 * g, -0.1 * self.Bv]) * [1, u(0.95, 1.1), u(0.5, 1.5)]
        self.rv_ax = np.array([0.75 * self.A, 13 * g, 1.7 * self.Bv]) * [u(0.9, 1.05), u(0.85, 1.15), u(0.9, 1.1)]
        self.la_ax = np.array([15.0, 22.0, 15.0]) * g * [u(0.9, 1.1), u(0.9, 1.1), u(0.9, 1.1)]
        self.la_c = np.array([-0.75 * self.la_ax[0], -0.15 * self.Bv, 0.5 * self.Bv + 0.5 * self.la_ax[2]])
        self.ra_ax = np.array([16.0, 16.0, 18.0]) * g * [u(0.9, 1.1), u(0.9, 1.1), u(0.9, 1.1)]
        rv_mid = 0.5 * (self.Bv + self.T + self.rv_c[1] + self.rv_ax[1])
        self.ra_c = np.array([self.utv - 0.75 * self.ra_ax[0], rv_mid + 2.0, 0.35 * self.ra_ax[2]])
        self.wall_rv, self.wall_a = 2.5, 2.0
        # heart position: centre of the heart near the origin, jittered
        ax = self.R
        self.B = (-0.1 * self.A * ax[0] - 0.45 * self.Bv * ax[1] + rng.uniform(-5, 5, 3) + [-6, 6, -6]).astype(np.float32)
        self.warp = _Waves(rng, 6, (60, 140), 3.0 * g, dim=3)
        # papillary muscles (inside the LV label, myocardium HU): anterolateral and posteromedial
        L = self.c + self.A
        self.pap = [(np.array([0.55 * L, *(0.62 * self.Bv * np.array([np.cos(t), np.sin(t)]))]),
                     np.array([0.2 * L, 3.5 * g, 3.5 * g]) * u(0.8, 1.2))
                    for t in np.deg2rad([180 - u(30, 50), 180 + u(30, 50)])]
        self.bumps = {k: _Waves(rng, 5, (35, 90), amp) for k, amp in
                      (("lv", 1.6), ("myo", 1.0), ("rv", 2.2), ("la", 2.0), ("ra", 2.0))}

    # coordinates
    def local(self, p: np.ndarray) -> np.ndarray:
        """Body points p (..., 3) mm -> warped heart-frame coordinates (..., 3)."""
        p = np.asarray(p, np.float32)
        return (p + self.warp(p) - self.B) @ self.R.T

    def body(self, l) -> np.ndarray:
        """Heart-frame point(s) -> body mm, undoing the warp (two fixed-point steps)."""
        q = self.B + np.asarray(l, np.float32) @ self.R
        p = q - self.warp(q)
        return q - self.warp(p)

    def fields(self, p: np.ndarray, grid_axes=None) -> dict:
        """Signed distances (mm, < 0 inside) of every chamber at body points p (..., 3).

        With ``grid_axes`` (p is then that grid's points), the smooth fields use the separable fast path.
        """
        p = np.asarray(p, np.float32)
        if grid_axes is not None:
            w = self.warp.grid(grid_axes)
            bumps = {k: b.grid(grid_axes) for k, b in self.bumps.items()}
        else:
            w = self.warp(p)
            bumps = {k: b(p) for k, b in self.bumps.items()}
        return self._fields((p + w - self.B) @ self.R.T, bumps)

    def fields_local(self, l: np.ndarray, ventricles_only: bool = False) -> dict:
        """Signed distances at heart-frame (warped) points l (..., 3)."""
        l = np.asarray(l, np.float32)
        p = self.body(l)
        keys = ("lv", "myo", "rv") if ventricles_only else tuple(self.bumps)
        return self._fields(l, {k: self.bumps[k](p) for k in keys})

    def _fields(self, l: np.ndarray, bumps: dict) -> dict:
        uu = l[..., 0]
        lv = _ellipsoid_sdf(l - np.float32([self.c, 0, 0]), (self.A, self.Bv, self.Bw)) - bumps["lv"]
        taper = 1 - 0.35 * np.clip(uu / (self.c + self.A), 0, 1)
        myo = lv - self.T * taper * (1 + 0.2 * bumps["myo"])
        rv = _ellipsoid_sdf(l - self.rv_c.astype(np.float32), self.rv_ax) - bumps["rv"]
        epi = np.minimum(np.maximum(myo, -uu), np.maximum(rv - self.wall_rv, self.utv - self.wall_rv - uu))
        out = dict(u=uu, lv=lv, myo=myo, rv=rv, epi=epi)
        if "la" in bumps:
            out["la"] = _ellipsoid_sdf(l - self.la_c.astype(np.float32), self.la_ax) - bumps["la"]
            out["ra"] = _ellipsoid_sdf(l - self.ra_c.astype(np.float32), self.ra_ax) - bumps["ra"]
            out["pap"] = np.minimum(*(_ellipsoid_sdf(l - c.astype(np.float32), ax) for c, ax in self.pap))
        return out

    def regions(self, f: dict) -> dict:
        uu = f["u"]
        lv = (f["lv"] < 0) & (uu >= 0)
        myo = (f["myo"] < 0) & (uu >= 0) & ~lv
        out_myo = f["myo"] >= 0
        rv = (f["rv"] < 0) & (uu >= self.utv) & out_myo
        la = (f["la"] < 0) & (uu < 0)
        ra = (f["ra"] < 0) & (uu < self.utv) & out_myo & ~la
        walls = (((f["rv"] < self.wall_rv) & (uu >= self.utv - self.wall_rv) & out_myo)
                 | (f["la"] < self.wall_a) | (f["ra"] < self.wall_a)) & ~(lv | myo | rv | la | ra)
        return dict(lv=lv, myo=myo, rv=rv, la=la, ra=ra, walls=walls)

    def surface(self, uu, theta, rho_max: float = 70.0, step: float = 0.75):
        """Outermost epicardial radius along heart-frame rays from the LV axis at (u, theta) -> (K,) mm.

        Returns (rho, directions (K, 2) in the (v, w) plane); rho is NaN where the ray meets no epicardium.
        """
        uu, theta = np.atleast_1d(uu).astype(float), np.atleast_1d(theta).astype(float)
        rho = np.arange(rho_max, 0, -step)
        d = np.stack([np.cos(theta), np.sin(theta)], -1)
        l = np.concatenate([np.broadcast_to(uu[:, None, None], (len(uu), len(rho), 1)),
                            rho[None, :, None] * d[:, None, :]], -1)
        inside = self.fields_local(l, ventricles_only=True)["epi"] < 0
        hit = inside.any(1)
        return np.where(hit, rho[np.argmax(inside, 1)], np.nan), d

    def on_surface(self, way, offset):
        """Waypoints (u, theta) (K, 2) -> dense body points hugging the epicardium ``offset`` mm outside.

        Returns (points (N, 3) body mm, (u, theta) (N, 2)); stops where a ray misses the heart.
        """
        way = np.asarray(way, float)
        n = max(2, int(np.ceil(np.abs(np.diff(way[:, 0])).sum() + 25 * np.abs(np.diff(way[:, 1])).sum())))
        t = np.linspace(0, len(way) - 1, n)
        uu = np.interp(t, np.arange(len(way)), way[:, 0])
        th = np.interp(t, np.arange(len(way)), way[:, 1])
        rho, d = self.surface(uu, th)
        ok = np.isfinite(rho)
        stop = len(rho) if ok.all() else int(np.argmin(ok))
        off = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(offset)), offset)
        l = np.concatenate([uu[:, None], (rho + off)[:, None] * d], -1)[:stop]
        return self.body(l), np.stack([uu, th], 1)[:stop]

    def groove(self, uu: float, side: int, depth: float = 2.0) -> float:
        """Angle (rad) where the RV crescent ends on the anterior (side=-1) or inferior (side=+1) wall."""
        th = np.deg2rad(np.arange(0, 150, 3.0)) * side
        rho, d = self.surface(np.full(th.shape, uu), th)
        rho = np.where(np.isfinite(rho), rho, self.Bv + self.T)
        l = np.concatenate([np.full((len(th), 1), uu), (rho - depth)[:, None] * d], -1)
        f = self.fields_local(l, ventricles_only=True)
        is_rv = (f["rv"] < self.wall_rv) & (f["myo"] >= 0)
        if not is_rv[:5].any():
            return float("nan")  # no RV at this level (near the apex)
        idx = int(np.argmin(is_rv)) if not is_rv.all() else len(th) - 1
        return float(th[idx])

    def grooves(self, us, side: int, shift_deg: float) -> list[float]:
        """:meth:`groove` at several levels, NaNs (no RV) replaced by the last valid angle."""
        out, last = [], np.deg2rad(-70.0 if side < 0 else 65.0)
        for x in us:
            t = self.groove(x, side)
            last = t if np.isfinite(t) else last
            out.append(last + np.deg2rad(shift_deg))
        return out


def _vessels(h: _Heart, rng, g: float) -> dict:
    """Centrelines (body mm) and radii of the aorta, RV outflow tract and pulmonary artery."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    j = lambda s: rng.uniform(-s, s, 3)  # noqa: E731
    r_ao, r_pa = 9.0 * g * u(0.9, 1.1), 8.5 * g * u(0.9, 1.1)
    ao_vw = np.array([0.3, -0.4]) * h.Bv
    c0 = h.body([4.0, *ao_vw])
    c1 = h.body([-9.0 * g, *ao_vw])
    c2 = c1 + np.array([3, 3, 15]) * g + j(2)
    c3 = c2 + np.array([3, 0, 18]) * g + j(3)
    c4 = c3 + np.array([1, -3, 30]) + j(4)
    c5 = c4 + np.array([0, -3, 40])
    ao, ao_r = _spline([c0, c1, c2, c3, c4, c5], 0.5, [1.12 * r_ao, 1.12 * r_ao, r_ao, r_ao, r_ao, r_ao])
    # RV outflow: from inside the RV crescent to the pulmonary valve (anterior-superior-left of the aortic root)
    th_ot = np.deg2rad(u(-60, -40))
    uu = h.utv + 8
    rho = np.arange(h.Bv, h.Bv + 45, 0.5)
    d = np.array([np.cos(th_ot), np.sin(th_ot)])
    f = h.fields_local(np.concatenate([np.full((len(rho), 1), uu), rho[:, None] * d], -1), ventricles_only=True)
    inside = (f["rv"] < 0) & (f["myo"] >= 0)
    rho_in = float(np.median(rho[inside])) if inside.any() else h.Bv + h.T + 6
    th_pv = np.deg2rad(u(-105, -90))
    pv_l = [-6.0 * g, *(np.array([np.cos(th_pv), np.sin(th_pv)]) * (h.Bv + h.T + 0.5 * r_pa))]
    pv = h.body(pv_l)
    ot_mid = h.body([0.5 * uu - 3, *(np.array([np.cos(0.5 * (th_ot + th_pv)), np.sin(0.5 * (th_ot + th_pv))])
                                    * (h.Bv + h.T + 0.9 * r_pa))])
    ot, ot_r = _spline([h.body([uu, *(rho_in * d)]), ot_mid, pv], 0.5, [0.8 * r_pa, 0.9 * r_pa, r_pa])
    # pulmonary trunk: up, left and back, in front of and then left of the aorta; bifurcation
    t1 = pv + np.array([-5, 1, 13]) * g + j(2)
    bif = t1 + np.array([-7, -12, 10]) * g + j(3)
    lpa = [bif + np.array([-14, -12, 1]) + j(3), bif + np.array([-30, -22, -4]) + j(4),
           bif + np.array([-60, -30, -8])]
    pa, pa_r = _spline([pv - 1.5 * (t1 - pv) / np.linalg.norm(t1 - pv), pv, t1, bif, *lpa], 0.5,
                       [r_pa, r_pa, r_pa, 0.95 * r_pa, 0.75 * r_pa, 0.7 * r_pa, 0.7 * r_pa])
    # right PA passes behind the ascending aorta
    z = bif[2] + 3
    k = int(np.argmin(np.abs(ao[:, 2] - z)))
    y_behind = min(bif[1] - 6, ao[k, 1] - r_ao - 0.75 * r_pa - 4.0)
    rpa_c = [bif, np.array([0.5 * (bif[0] + ao[k, 0]), y_behind + 2, z]),
             np.array([ao[k, 0], y_behind, z + 1]), np.array([ao[k, 0] + 35, y_behind - 4, z - 2]),
             np.array([ao[k, 0] + 70, y_behind - 8, z - 6])]
    rpa, rpa_r = _spline(rpa_c, 0.5, [0.8 * r_pa, 0.72 * r_pa, 0.7 * r_pa, 0.65 * r_pa, 0.6 * r_pa])
    return dict(ao=ao, ao_r=ao_r, r_ao=r_ao, ot=ot, ot_r=ot_r, pa=np.vstack([pa, rpa]),
                pa_r=np.concatenate([pa_r, rpa_r]), r_pa=r_pa)


def _coronaries(h: _Heart, ves: dict, rng, g: float, r_min: float, step: float):
    """Left and right coronary trees as (points (N, 3) mm, radii (N,) mm) lists of branches."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    L = h.c + h.A
    gap = 0.5

    def branch(way, r0, r1):
        way = np.asarray(way, float)
        r = np.array([max(r0, r_min), max(r1, r_min)])
        pts, ut = h.on_surface(way, r + gap)
        if len(pts) < 2:
            return None
        pts = ndimage.uniform_filter1d(pts, 5, axis=0, mode="nearest")
        n = len(pts)
        return pts, np.linspace(r[0], r[1], n), ut

    def ostium(target, frac_r):
        k = int(np.argmin(np.abs(np.cumsum(np.r_[0, np.linalg.norm(np.diff(ves["ao"], axis=0), axis=1)]) - 12 * g)))
        c = ves["ao"][k]
        tan = _unit(ves["ao"][k + 1] - ves["ao"][k - 1])
        v = target - c
        v = _unit(v - (v @ tan) * tan)
        return c + v * frac_r * ves["r_ao"]

    def connector(p0, p1, p2, r0, r1):
        pts, r = _spline([p0, p1, p2], step, [max(r0, r_min), max(r1, r_min)])
        return pts, r

    trees = []
    for side in ("left", "right"):
        out = []
        if side == "left":
            u_av = u(4.0, 6.0)
            th_lm = np.deg2rad(u(-145, -125))
            lm_end = branch([[u_av, th_lm], [u_av, th_lm]], 2.4 * g, 2.4 * g)
            e = lm_end[0][0]
            os_ = ostium(e, 0.6)
            mid = 0.5 * (os_ + e) - 4.0 * h.R[0]
            out.append(connector(os_, mid, e, 2.4 * g, 2.2 * g))
            gro = h.grooves((8, 0.35 * L, 0.65 * L, 0.9 * L), -1, -4)
            lad = branch([[u_av, th_lm], [8, gro[0]], [0.35 * L, gro[1]], [0.65 * L, gro[2]],
                          [0.93 * L, gro[3] - np.deg2rad(10)]], 2.0 * g, 1.1 * g)
            lcx_end = np.deg2rad(u(-240, -220))
            lcx = branch([[u_av, th_lm], [u_av + 1, th_lm - np.deg2rad(35)], [u_av + 2, lcx_end]], 1.9 * g, 1.2 * g)
            kids = []
            for par, fracs, du, dth in ((lad, (u(0.2, 0.3), u(0.45, 0.6)), 16, -35), (lcx, (u(0.35, 0.5), u(0.7, 0.85)), 22, -8)):
                if par is None:
                    continue
                for fr in fracs[: 1 + int(rng.integers(0, 2)) + (1 if par is lcx else 0)]:
                    u0, t0 = par[2][int(fr * (len(par[2]) - 1))]
                    kids.append(branch([[u0, t0], [u0 + du * g, t0 + np.deg2rad(dth)]], 1.3 * g, 0.9 * g))
            out += [b[:2] for b in (lad, lcx, *kids) if b is not None]
        else:
            u_rc = h.utv + u(3.0, 5.0)
            th0 = np.deg2rad(u(-50, -35))
            gp = h.grooves((u_rc + 3, 0.35 * L, 0.6 * L), +1, 5)
            rca = branch([[u_rc, th0], [u_rc, 0.0], [u_rc + 1, 0.5 * gp[0]], [u_rc + 3, gp[0]]], 2.1 * g, 1.5 * g)
            e = rca[0][0]
            os_ = ostium(e, 0.6)
            mid = 0.5 * (os_ + e) - 3.0 * h.R[0]
            out.append(connector(os_, mid, e, 2.2 * g, 2.1 * g))
            pda = branch([[u_rc + 3, gp[0]], [0.35 * L, gp[1]], [0.6 * L, gp[2]]], 1.4 * g, 1.0 * g)
            kids = []
            for fr in (u(0.3, 0.45), u(0.6, 0.75))[: 1 + int(rng.integers(0, 2))]:
                u0, t0 = rca[2][int(fr * (len(rca[2]) - 1))]
                kids.append(branch([[u0, t0], [u0 + 20 * g, t0 + np.deg2rad(5)]], 1.2 * g, 0.9 * g))
            out += [b[:2] for b in (rca, pda, *kids) if b is not None]
        trees.append([(_resample(p, step, r)) for p, r in out])
    return trees


# ---- surroundings ------------------------------------------------------------------------------
def _surroundings(grid: _Grid, rng, heart_env: np.ndarray, ves: dict, trees, hu: dict, extra: np.ndarray) -> dict:
    """Masks of lung, bone and soft tissue; paints unlabelled tissue HU into ``extra`` (NaN = class HU)."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    x, y, z = (grid.pts[..., d] for d in range(3))
    xc, yc = u(-4, 4), u(-8, -2)
    ax, ay = u(74, 88), u(58, 66)
    wall = u(12, 18)
    taper = 1 - 0.0015 * z
    e_in = np.sqrt(((x - xc) / (ax * taper)) ** 2 + ((y - yc) / ay) ** 2)
    e_out = np.sqrt(((x - xc) / (ax * taper + wall)) ** 2 + ((y - yc) / (ay + wall)) ** 2)
    e_skin = np.sqrt(((x - xc) / (ax * taper + wall + 10)) ** 2 + ((y - yc) / (ay + wall + 10)) ** 2)
    body = e_skin < 1
    soft = (e_in >= 1) & body
    extra[(e_out >= 1) & body] = hu["fat"]
    extra[~body] = -1000.0
    # diaphragm dome (right higher) with the liver below it
    zh = float(z[heart_env].min()) if heart_env.any() else -40.0
    zd = (zh + u(3, 8) + 8 * np.clip((x - xc) / 40, -1, 1) - 0.006 * ((x - xc) ** 2 + (y - yc + 10) ** 2))
    below = (z < zd) & (e_in < 1)
    soft |= below
    extra[below] = hu["liver"]
    bone = np.zeros(grid.shape, bool)
    marrow = np.zeros(grid.shape, bool)
    # vertebral body with discs, sternum
    xs, ys = xc + u(-3, 3), yc - ay + u(4, 9)
    rv_x, rv_y = u(14, 18), u(12, 15)
    ev = np.sqrt(((x - xs) / rv_x) ** 2 + ((y - ys) / rv_y) ** 2)
    period, z0 = u(22, 26), u(0, 25)
    disc = np.mod(z - z0, period) < 5
    vert = (ev < 1) & ~disc
    bone |= vert
    marrow |= (ev < 1 - 2.0 / rv_y) & ~disc
    soft |= (ev < 1) & disc
    xst = xc + u(-3, 3)
    es = np.maximum(np.abs(x - xst) / u(11, 15), np.abs(y - (yc + ay + 4)) / 5)
    bone |= es < 1
    marrow |= (es < 1) & (np.abs(x - xst) < 9) & (np.abs(y - (yc + ay + 4)) < 3)
    # ribs: arcs in the chest wall, descending anteriorly
    rib_r = u(3.5, 4.5)
    phi = np.linspace(-np.pi, np.pi, 720)
    for z_rib in np.arange(u(-90, -70), 90, u(22, 27)):
        for sgn in (-1, 1):
            ph = phi[(phi * sgn >= 0)]
            ang = np.abs(ph)  # 0 at posterior midline (through the side) -> pi anterior
            px = xc + sgn * 0 + (ax + wall / 2) * np.sin(ph)
            py = yc - (ay + wall / 2) * np.cos(ph)
            keep = (ang > 0.25) & (ang < 2.7)
            pz = z_rib - 28 * ang / np.pi
            pts = np.stack([px, py, pz], -1)[keep]
            near = np.all(np.abs(pts - grid.origin - grid.spacing * (np.asarray(grid.shape) - 1) / 2)
                          < (np.asarray(grid.shape) * grid.spacing / 2 + rib_r), axis=1)
            if near.any():
                pts = _resample(pts[near], 0.5 * min(rib_r, grid.spacing.min()))
                grid.splat(bone, pts, rib_r)
                grid.splat(marrow, pts, rib_r - 1.5)
    bone &= body
    # posterior mediastinum: descending aorta, oesophagus; SVC beside the ascending aorta
    med = np.zeros(grid.shape, bool)
    dsc = np.zeros(grid.shape, bool)
    zz = np.linspace(-90, 90, 50)
    dx, dy = xs + u(-24, -16), ys + rv_y + u(4, 9)
    r_da = u(7.5, 9.5)
    dpts = np.stack([dx + 3 * np.sin(zz / 60), np.full_like(zz, dy) + 2 * np.cos(zz / 50), zz], -1)
    grid.splat(dsc, _resample(dpts, 0.5 * grid.spacing.min()), r_da)
    grid.splat(med, _resample(dpts, 1.0), r_da + 5)
    oes = np.zeros(grid.shape, bool)
    opts = _resample(np.stack([np.full_like(zz, xs - 4 + u(-3, 3)), np.full_like(zz, ys + rv_y + 8), zz], -1), 1.0)
    grid.splat(oes, opts, 6.0)
    grid.splat(med, opts, 10.0)
    k = int(np.argmin(np.abs(ves["ao"][:, 2] - 30)))
    svc_top = ves["ao"][k] + [ves["r_ao"] + 9, -4, 60]
    svc_bot = ves["ao"][k] + [ves["r_ao"] + 10, -5, -20]
    svc = np.zeros(grid.shape, bool)
    spts = _resample(np.stack([svc_top, svc_bot]), 0.5 * grid.spacing.min())
    grid.splat(svc, spts, u(7, 9))
    grid.splat(med, spts, 12)
    grid.splat(med, ves["ao"], ves["ao_r"] + 5)
    grid.splat(med, ves["pa"], ves["pa_r"] + 4)
    for tree in trees:  # coronaries run in epicardial fat
        for pts, r in tree:
            grid.splat(med, pts[::2], r[::2] + 3.0)
    med |= heart_env | (ev < 1.4)
    # fill the lung slivers between mediastinum, chest wall and diaphragm (closing by distance maps)
    shell = med | (e_in >= 1) | below
    r_close = u(7, 11)
    grown = ndimage.distance_transform_edt(~shell, sampling=grid.spacing) <= r_close
    shell |= ndimage.distance_transform_edt(grown, sampling=grid.spacing) > r_close
    lung = ~shell & ~bone
    extra[oes] = hu["soft"]
    air = np.zeros(grid.shape, bool)
    grid.splat(air, opts, 1.5)
    extra[air] = -900.0
    extra[svc] = hu["svc"]
    extra[dsc] = hu["blood_l"]
    # pulmonary vessels: a few bright branching tubes inside the lungs
    vmask = np.zeros(grid.shape, bool)
    for _ in range(int(rng.integers(30, 45))):
        side = rng.choice([-1, 1])
        p0 = np.array([xc + side * u(15, 35), yc + u(-25, 25), u(-20, 45)])
        d0 = _unit(rng.normal(size=3) * 0.6 + [side, 0, -0.2])
        p1 = p0 + d0 * u(20, 45)
        r0 = u(1.5, 3.0)
        seg = _resample(np.stack([p0, p1]), 0.5 * grid.spacing.min())
        grid.splat(vmask, seg, r0)
        for _ in range(2):
            d1 = _unit(d0 + rng.normal(size=3) * 0.7)
            grid.splat(vmask, _resample(np.stack([p1, p1 + d1 * u(15, 35)]), 0.5 * grid.spacing.min()), 0.7 * r0)
    extra[vmask & lung] = hu["lung_vessel"]
    extra[lung & ~vmask] = np.nan
    extra[bone & ~marrow] = hu["cortical"]
    return dict(lung=lung, bone=bone, soft=soft & ~bone)


# ---- the case ----------------------------------------------------------------------------------
def _draw_hu(rng) -> dict:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    blood_l = u(340, 430)
    hu = dict(blood_l=blood_l, blood_r=u(max(325.0, blood_l - 60), blood_l), myo=u(100, 135), fat=u(-115, -85),
              lung=u(-875, -825), soft=u(35, 55), liver=u(55, 75), cancellous=u(430, 520),
              cortical=u(900, 1300), aorta_boost=u(0, 20), noise=u(20, 35), psf=u(0.5, 0.8))
    hu["svc"] = u(hu["blood_r"] - 80, hu["blood_r"] + 150)
    hu["lung_vessel"] = u(120, 250)
    return hu


def _validate(shape, spacing):
    shape, spacing = tuple(shape), tuple(spacing)
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise ValueError(f"shape must be three integers >= 8, got {shape}")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive finite mm values, got {spacing}")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)


DOMAINS = ("standard", "lowdose")


def _apply_domain(hu: dict, domain: str) -> dict:
    """The acquisition of ``domain`` applied to a drawn HU table (no random draw: the anatomy and every
    other draw of the seed stay those of the standard case).

    ``lowdose``: a second scanner and protocol, harder to segment -- a late, weak contrast bolus (the
    blood's enhancement over myocardium at 55 %), 2.8x the noise (56-98 HU) and a softer reconstruction
    kernel (psf x 1.8), so thin coronaries and the blood/myocardium borders blur into the noise.
    """
    if domain == "standard":
        return hu
    if domain != "lowdose":
        raise ValueError(f"unknown phantom domain {domain!r}; known: {', '.join(DOMAINS)}")
    out = dict(hu)
    for k in ("blood_l", "blood_r", "svc"):
        out[k] = hu["myo"] + 0.55 * (hu[k] - hu["myo"])
    out["noise"], out["psf"] = 2.8 * hu["noise"], 1.8 * hu["psf"]
    return out


def make_case(seed: int, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0), noise: bool = True,
              domain: str = "standard") -> PhantomCase:
    """Draw phantom case ``seed`` on a ``shape`` grid with ``spacing`` mm (see the module docstring).

    ``domain``: the acquisition (:data:`DOMAINS`, see :func:`_apply_domain`); the label map of a seed is
    the same in every domain.

    ``noise=False`` leaves out the final correlated noise (the last draw, so everything else is the
    same case): the noise-free reference a denoising reconstruction is scored against.

    Returns image (X, Y, Z) int16 HU, label (X, Y, Z) uint8, RAS+ affine; same seed -> identical arrays.
    """
    shape, spacing = _validate(shape, spacing)
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    g = float(rng.uniform(0.95, 1.15))
    hu = _apply_domain(_draw_hu(rng), domain)
    heart = _Heart(rng, g)
    ves = _vessels(heart, rng, g)
    step = 0.5 * min(spacing)
    trees = _coronaries(heart, ves, rng, g, r_min=max(spacing), step=step)

    f = heart.fields(grid.pts, grid.axes)
    reg = heart.regions(f)
    tubes = {k: np.zeros(shape, bool) for k in ("ao", "ot", "pa", "cor")}
    grid.splat(tubes["ao"], ves["ao"], ves["ao_r"])
    grid.splat(tubes["ot"], ves["ot"], ves["ot_r"])
    grid.splat(tubes["pa"], ves["pa"], ves["pa_r"])
    for tree in trees:
        for pts, r in tree:
            grid.splat(tubes["cor"], pts, r)
    extra = np.full(shape, np.nan, np.float32)
    heart_env = (np.minimum(f["epi"], np.minimum(f["la"], f["ra"]) - heart.wall_a)
                 < rng.uniform(2, 5) + _Waves(rng, 4, (30, 80), 2.0).grid(grid.axes))
    sur = _surroundings(grid, rng, heart_env, ves, trees, hu, extra)
    extra[reg["walls"]] = hu["myo"]

    schema = default_schema()
    binaries = {_IDS["lv"]: reg["lv"], _IDS["rv"]: reg["rv"] | (tubes["ot"] & ~reg["myo"]), _IDS["la"]: reg["la"],
                _IDS["ra"]: reg["ra"], _IDS["myo"]: reg["myo"], _IDS["aorta"]: tubes["ao"], _IDS["pa"]: tubes["pa"],
                _IDS["cor"]: tubes["cor"], _IDS["lung"]: sur["lung"], _IDS["bone"]: sur["bone"],
                _IDS["soft"]: sur["soft"]}
    label = schema.union(binaries, shape)
    fixed = _enforce_topology(label, schema)

    # image: class HU table, unlabelled tissue and sub-tissues from `extra`, blur, correlated noise
    lut = np.zeros(256, np.float32)
    lut[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = [
        hu["fat"], hu["blood_l"], hu["blood_r"], hu["blood_l"], hu["blood_r"], hu["myo"],
        hu["blood_l"] + hu["aorta_boost"], hu["blood_r"], hu["blood_l"], hu["lung"], hu["cancellous"], hu["soft"]]
    mod = _Waves(rng, 4, (50, 120), 12.0).grid(grid.axes)  # smooth contrast inhomogeneity
    mix = _Waves(rng, 3, (20, 50), 35.0).grid(grid.axes)  # inflow mixing of contrast in the right atrium
    img = lut[label] + np.where(np.isin(label, schema.cardiac_ids), mod, 0) + np.where(label == _IDS["ra"], mix, 0)
    pap = (f["pap"] < 0) & (label == _IDS["lv"])
    img[pap] = hu["myo"]
    lung = label == _IDS["lung"]  # gravity-dependent density and smooth parenchymal variation
    img[lung] += (35 * np.clip(-grid.pts[..., 1][lung] / 60, 0, 1)
                  + _Waves(rng, 4, (25, 60), 15.0).grid(grid.axes)[lung])
    cardiac = np.isin(label, schema.cardiac_ids)
    use = np.isfinite(extra) & ~cardiac
    img[use] = extra[use]
    sp = np.asarray(spacing)
    img = ndimage.gaussian_filter(img, np.sqrt(0.45 ** 2 + (hu["psf"] / sp) ** 2), mode="nearest")
    if noise:
        grain = rng.standard_normal(shape, dtype=np.float32)
        grain = ndimage.gaussian_filter(grain, np.maximum(0.7 / sp, 0.4), mode="wrap")
        img += grain * (hu["noise"] / max(float(grain.std()), 1e-6))
    image = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
    info = dict(scale=g, apex_dir=heart.R[0].tolist(), hu={k: round(v, 1) for k, v in hu.items()},
                fixed_voxels=fixed, spacing=spacing, domain=domain)
    return PhantomCase(image=image, label=label, affine=grid.affine, seed=int(seed), info=info)


def _enforce_topology(label: np.ndarray, schema: LabelSchema) -> int:
    """Safety net (in place): one 26-component per chamber/vessel, coronaries attached to the aorta.

    Returns the number of voxels moved to background.
    """
    moved = 0
    for name in SINGLE_COMPONENT:
        m = label == schema.id(name)
        cc, n = ndimage.label(m, _CONN26)
        if n > 1:
            keep = np.argmax(np.bincount(cc.ravel())[1:]) + 1
            drop = m & (cc != keep)
            moved += int(drop.sum())
            label[drop] = 0
    cor = label == schema.id("coronary_arteries")
    cc, n = ndimage.label(cor, _CONN26)
    if n:
        near = ndimage.binary_dilation(label == schema.id("ascending_aorta"), _CONN26)
        attached = np.unique(cc[near & cor])
        drop = cor & ~np.isin(cc, attached)
        moved += int(drop.sum())
        label[drop] = 0
    return moved


# ---- measurements used by the tests and the QC report ------------------------------------------
def class_volumes(label: np.ndarray, schema: LabelSchema | None = None) -> dict[str, int]:
    """Voxel count per non-background class of ``schema`` (default: the cardiac schema)."""
    schema = schema or default_schema()
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=256)
    return {n: int(counts[i]) for n, i in schema.classes.items() if i != 0}


def check_topology(label: np.ndarray, schema: LabelSchema | None = None, min_wrap: float = 0.7) -> dict:
    """Topology figures of a label map (components with 26-connectivity).

    Returns ``components`` per single-component class, ``missing`` cardiac classes, ``coronary_components``,
    ``coronary_attached`` (every coronary component touches the aorta dilated by one voxel),
    ``myo_wrap`` (fraction of LV boundary voxels with myocardium among their 26 neighbours) and ``ok``.
    """
    schema = schema or default_schema()
    label = np.asarray(label)
    missing = [n for n in schema.cardiac if not (label == schema.id(n)).any()]
    comps = {n: int(ndimage.label(label == schema.id(n), _CONN26)[1]) for n in SINGLE_COMPONENT}
    cor = label == schema.id("coronary_arteries")
    cc, n_cor = ndimage.label(cor, _CONN26)
    near = ndimage.binary_dilation(label == schema.id("ascending_aorta"), _CONN26)
    attached = bool(n_cor) and len(set(np.unique(cc[near & cor])) - {0}) == n_cor
    lv = label == schema.id("left_ventricle")
    edge = lv & ~ndimage.binary_erosion(lv)
    by_myo = ndimage.binary_dilation(label == schema.id("lv_myocardium"), _CONN26)
    wrap = float((edge & by_myo).sum() / max(int(edge.sum()), 1))
    ok = (not missing and all(v == 1 for v in comps.values()) and n_cor in (1, 2) and attached
          and wrap >= min_wrap)
    return dict(components=comps, missing=missing, coronary_components=int(n_cor),
                coronary_attached=attached, myo_wrap=wrap, ok=bool(ok))
