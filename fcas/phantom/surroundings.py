"""The chest around the heart: lungs with vessels, bone, soft tissue and the unlabelled mediastinum.

Vertebral body, ribs and sternum (bone, cortical shell), chest wall and liver below the diaphragm
(soft tissue), descending aorta, SVC, oesophagus, epicardial and mediastinal fat: the context a
segmentation net has to tell the heart from. Tissue the label schema has no class for is painted
into the ``extra`` HU volume only.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fcas.phantom.geometry import Grid, resample, unit


def surroundings(grid: Grid, rng, heart_env: np.ndarray, ves: dict, trees, hu: dict, extra: np.ndarray) -> dict:
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
                pts = resample(pts[near], 0.5 * min(rib_r, grid.spacing.min()))
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
    grid.splat(dsc, resample(dpts, 0.5 * grid.spacing.min()), r_da)
    grid.splat(med, resample(dpts, 1.0), r_da + 5)
    oes = np.zeros(grid.shape, bool)
    opts = resample(np.stack([np.full_like(zz, xs - 4 + u(-3, 3)), np.full_like(zz, ys + rv_y + 8), zz], -1), 1.0)
    grid.splat(oes, opts, 6.0)
    grid.splat(med, opts, 10.0)
    k = int(np.argmin(np.abs(ves["ao"][:, 2] - 30)))
    svc_top = ves["ao"][k] + [ves["r_ao"] + 9, -4, 60]
    svc_bot = ves["ao"][k] + [ves["r_ao"] + 10, -5, -20]
    svc = np.zeros(grid.shape, bool)
    spts = resample(np.stack([svc_top, svc_bot]), 0.5 * grid.spacing.min())
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
    # pulmonary vessels: a few bright branching tubes inside the lungs, the case's own at a site too
    rng = getattr(rng, "case", rng)
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    vmask = np.zeros(grid.shape, bool)
    for _ in range(int(rng.integers(30, 45))):
        side = rng.choice([-1, 1])
        p0 = np.array([xc + side * u(15, 35), yc + u(-25, 25), u(-20, 45)])
        d0 = unit(rng.normal(size=3) * 0.6 + [side, 0, -0.2])
        p1 = p0 + d0 * u(20, 45)
        r0 = u(1.5, 3.0)
        seg = resample(np.stack([p0, p1]), 0.5 * grid.spacing.min())
        grid.splat(vmask, seg, r0)
        for _ in range(2):
            d1 = unit(d0 + rng.normal(size=3) * 0.7)
            grid.splat(vmask, resample(np.stack([p1, p1 + d1 * u(15, 35)]), 0.5 * grid.spacing.min()), 0.7 * r0)
    extra[vmask & lung] = hu["lung_vessel"]
    extra[lung & ~vmask] = np.nan
    extra[bone & ~marrow] = hu["cortical"]
    return dict(lung=lung, bone=bone, soft=soft & ~bone)
