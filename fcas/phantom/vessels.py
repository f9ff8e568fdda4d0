"""Tubular structures: the great vessels and the coronary trees, as centrelines with radii.

Ascending aorta (LV outflow, going up), RV outflow tract and pulmonary artery (going up-left-back in
front of the aorta, with its bifurcation) as splines; left (left main -> LAD + LCx, with diagonals /
marginals) and right (RCA, marginals, PDA) coronary trees as thin tapering tubes projected onto the
epicardium of :class:`~fcas.phantom.heart.Heart`, each starting inside the aortic root.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fcas.phantom.geometry import resample, spline, unit
from fcas.phantom.heart import Heart


def great_vessels(h: Heart, rng, g: float) -> dict:
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
    ao, ao_r = spline([c0, c1, c2, c3, c4, c5], 0.5, [1.12 * r_ao, 1.12 * r_ao, r_ao, r_ao, r_ao, r_ao])
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
    ot, ot_r = spline([h.body([uu, *(rho_in * d)]), ot_mid, pv], 0.5, [0.8 * r_pa, 0.9 * r_pa, r_pa])
    # pulmonary trunk: up, left and back, in front of and then left of the aorta; bifurcation
    t1 = pv + np.array([-5, 1, 13]) * g + j(2)
    bif = t1 + np.array([-7, -12, 10]) * g + j(3)
    lpa = [bif + np.array([-14, -12, 1]) + j(3), bif + np.array([-30, -22, -4]) + j(4),
           bif + np.array([-60, -30, -8])]
    pa, pa_r = spline([pv - 1.5 * (t1 - pv) / np.linalg.norm(t1 - pv), pv, t1, bif, *lpa], 0.5,
                       [r_pa, r_pa, r_pa, 0.95 * r_pa, 0.75 * r_pa, 0.7 * r_pa, 0.7 * r_pa])
    # right PA passes behind the ascending aorta
    z = bif[2] + 3
    k = int(np.argmin(np.abs(ao[:, 2] - z)))
    y_behind = min(bif[1] - 6, ao[k, 1] - r_ao - 0.75 * r_pa - 4.0)
    rpa_c = [bif, np.array([0.5 * (bif[0] + ao[k, 0]), y_behind + 2, z]),
             np.array([ao[k, 0], y_behind, z + 1]), np.array([ao[k, 0] + 35, y_behind - 4, z - 2]),
             np.array([ao[k, 0] + 70, y_behind - 8, z - 6])]
    rpa, rpa_r = spline(rpa_c, 0.5, [0.8 * r_pa, 0.72 * r_pa, 0.7 * r_pa, 0.65 * r_pa, 0.6 * r_pa])
    return dict(ao=ao, ao_r=ao_r, r_ao=r_ao, ot=ot, ot_r=ot_r, pa=np.vstack([pa, rpa]),
                pa_r=np.concatenate([pa_r, rpa_r]), r_pa=r_pa)


def coronary_trees(h: Heart, ves: dict, rng, g: float, r_min: float, step: float):
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
        tan = unit(ves["ao"][k + 1] - ves["ao"][k - 1])
        v = target - c
        v = unit(v - (v @ tan) * tan)
        return c + v * frac_r * ves["r_ao"]

    def connector(p0, p1, p2, r0, r1):
        pts, r = spline([p0, p1, p2], step, [max(r0, r_min), max(r1, r_min)])
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
        trees.append([(resample(p, step, r)) for p, r in out])
    return trees
