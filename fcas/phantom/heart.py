"""The heart: chambers as implicit surfaces in a tilted, warped heart frame, and its epicardium.

Ventricles in a heart frame whose long axis points left-anterior-inferior (about 45 deg): LV cavity
as a truncated ellipsoid, LV myocardium as an offset shell around it (open at the valve plane), RV
as a crescent against the septum; atria above/behind the valve plane (LA posterior, RA right) with
thin unlabelled atrial/RV walls. The epicardial ray casts (:meth:`Heart.on_surface`) are what the
coronary trees of :mod:`fcas.phantom.vessels` are laid along.
"""
from __future__ import annotations

import numpy as np

from fcas.phantom.geometry import Waves, ellipsoid_sdf, rotation, unit


class Heart:
    """Chambers as implicit surfaces in a tilted heart frame (u: base->apex, v: LV->RV, w = u x v)."""

    def __init__(self, rng, g: float):
        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
        # long axis: ~45 deg left, anterior and inferior, with a random tilt of up to ~12 deg
        a = unit([-0.62, 0.52, -0.58])
        a = rotation(rng.normal(size=3), np.deg2rad(u(-12, 12))) @ a
        s = np.array([1.0, 0.55, 0.05])
        s = unit(s - (s @ a) * a)
        s = rotation(a, np.deg2rad(u(-12, 12))) @ s
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
        self.warp = Waves(rng, 6, (60, 140), 3.0 * g, dim=3)
        # papillary muscles (inside the LV label, myocardium HU): anterolateral and posteromedial
        L = self.c + self.A
        self.pap = [(np.array([0.55 * L, *(0.62 * self.Bv * np.array([np.cos(t), np.sin(t)]))]),
                     np.array([0.2 * L, 3.5 * g, 3.5 * g]) * u(0.8, 1.2))
                    for t in np.deg2rad([180 - u(30, 50), 180 + u(30, 50)])]
        self.bumps = {k: Waves(rng, 5, (35, 90), amp) for k, amp in
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
        lv = ellipsoid_sdf(l - np.float32([self.c, 0, 0]), (self.A, self.Bv, self.Bw)) - bumps["lv"]
        taper = 1 - 0.35 * np.clip(uu / (self.c + self.A), 0, 1)
        myo = lv - self.T * taper * (1 + 0.2 * bumps["myo"])
        rv = ellipsoid_sdf(l - self.rv_c.astype(np.float32), self.rv_ax) - bumps["rv"]
        epi = np.minimum(np.maximum(myo, -uu), np.maximum(rv - self.wall_rv, self.utv - self.wall_rv - uu))
        out = dict(u=uu, lv=lv, myo=myo, rv=rv, epi=epi)
        if "la" in bumps:
            out["la"] = ellipsoid_sdf(l - self.la_c.astype(np.float32), self.la_ax) - bumps["la"]
            out["ra"] = ellipsoid_sdf(l - self.ra_c.astype(np.float32), self.ra_ax) - bumps["ra"]
            out["pap"] = np.minimum(*(ellipsoid_sdf(l - c.astype(np.float32), ax) for c, ax in self.pap))
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
