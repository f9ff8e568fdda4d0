"""The case builder: one seed's draws, in a fixed order, from anatomy to labelled CT image.

:func:`make_case` is the only place that knows the order of the random draws (scale, HU table, heart,
vessels, coronaries, heart envelope, surroundings, image): that order is what makes a seed give
bit-identical arrays, so it must not change. Labels are the union of the structures' masks by the
schema's priority, then :func:`~fcas.phantom.topology.enforce_topology`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fcas.labels import default_schema
from fcas.phantom import intensities
from fcas.phantom.geometry import Grid, Waves
from fcas.phantom.heart import Heart
from fcas.phantom.image import render_image
from fcas.phantom.intensities import IDS
from fcas.phantom.sites import DEFAULT_SPREAD, SiteDraws
from fcas.phantom.surroundings import surroundings
from fcas.phantom.topology import enforce_topology
from fcas.phantom.vessels import coronary_trees, great_vessels


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


def _validate(shape, spacing):
    shape, spacing = tuple(shape), tuple(spacing)
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise ValueError(f"shape must be three integers >= 8, got {shape}")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive finite mm values, got {spacing}")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)


def make_case(seed: int, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0), noise: bool = True,
              domain: str = "standard", site: int | None = None, site_spread: float = DEFAULT_SPREAD) -> PhantomCase:
    """Draw phantom case ``seed`` on a ``shape`` grid with ``spacing`` mm (see :mod:`fcas.phantom`).

    ``domain``: the acquisition (:data:`~fcas.phantom.intensities.DOMAINS`, see
    :func:`~fcas.phantom.intensities.apply_domain`); the label map of a seed is the same in every domain.

    ``site``: the site the case belongs to (:mod:`fcas.phantom.sites`): its HU table and surroundings
    are pulled towards the site's, ``site_spread`` of the population's spread left to the case; None
    (default): an independent case. The heart, vessels and noise are the seed's own either way.

    ``noise=False`` leaves out the final correlated noise (the last draw, so everything else is the
    same case): the noise-free reference a denoising reconstruction is scored against.

    Returns image (X, Y, Z) int16 HU, label (X, Y, Z) uint8, RAS+ affine; same seed -> identical arrays.
    """
    shape, spacing = _validate(shape, spacing)
    rng = np.random.default_rng(seed)
    grid = Grid(shape, spacing)
    g = float(rng.uniform(0.95, 1.15))
    shared = rng if site is None else SiteDraws(rng, site, site_spread)   # HU table and surroundings
    hu = intensities.apply_domain(intensities.draw_hu(shared), domain)   # via the module: template_oracles swaps it
    heart = Heart(rng, g)
    ves = great_vessels(heart, rng, g)
    step = 0.5 * min(spacing)
    trees = coronary_trees(heart, ves, rng, g, r_min=max(spacing), step=step)

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
                 < rng.uniform(2, 5) + Waves(rng, 4, (30, 80), 2.0).grid(grid.axes))
    sur = surroundings(grid, shared, heart_env, ves, trees, hu, extra)
    extra[reg["walls"]] = hu["myo"]

    schema = default_schema()
    binaries = {IDS["lv"]: reg["lv"], IDS["rv"]: reg["rv"] | (tubes["ot"] & ~reg["myo"]), IDS["la"]: reg["la"],
                IDS["ra"]: reg["ra"], IDS["myo"]: reg["myo"], IDS["aorta"]: tubes["ao"], IDS["pa"]: tubes["pa"],
                IDS["cor"]: tubes["cor"], IDS["lung"]: sur["lung"], IDS["bone"]: sur["bone"],
                IDS["soft"]: sur["soft"]}
    label = schema.union(binaries, shape)
    fixed = enforce_topology(label, schema)

    # image: class HU table, unlabelled tissue and sub-tissues from `extra`, blur, correlated noise
    image = render_image(label, extra, f["pap"], grid, hu, rng, schema, noise)
    info = dict(scale=g, apex_dir=heart.R[0].tolist(), hu={k: round(v, 1) for k, v in hu.items()},
                fixed_voxels=fixed, spacing=spacing, domain=domain,
                site=None if site is None else int(site))
    return PhantomCase(image=image, label=label, affine=grid.affine, seed=int(seed), info=info)
