"""How much can a template tell about the target on phantoms? Model-free oracles for Table 1.

Table 1 compares a TCDM that sees the template pair (I_B, M_B) with one that sees the reference mask
M_A only. A template can only help where it carries information about I_A that M_A does not, and
procedural phantoms are drawn independently, so :func:`template_information` measures that
information directly, with no model, on held-out pairs ``(i, held_out_partner(i))`` (the next case, of
the same site when the phantoms come in sites: :mod:`fcas.phantom.sites`):

under the cardiac mask of M_A (how Table 1 scores), SSIM against the true I_A of
  * ``own_hu_of_B``:     I_A re-rendered with B's HU table (same anatomy, same noise): the most that
                         perfect use of B's intensities could change (1.0: the HU table does not matter);
  * ``noise_free``:      I_A without its noise: the best any deterministic prediction can score;
  * ``noise_free_hu_B``: both: a perfect mask-to-image map that took its intensities from B;
  * ``A_heart_in_mean_region``: I_A inside its cardiac mask (exact, noise included), the population mean
                         outside: the SSIM window of a voxel near the heart's border also sees A's
                         surroundings, which M_A does not describe, so even an exact heart scores well
                         below 1 here (the region reading's ceiling for a model that is not told them);
  * ``A_heart_in_B_region``: the same with I_B's surroundings (a model that copies the template's);
over the whole volume (A's surroundings, which M_A does not describe):
  * ``B_image``:         I_B itself;
  * ``A_heart_in_B``:    I_A inside its cardiac mask, I_B outside: a model that copies B's surroundings;
  * ``A_heart_in_mean``: I_A inside, the mean of 16 other phantoms outside: a model that draws the
                         population mean, which a mask-only model can learn;
with sites (``site_size``), also, over the whole volume and (``*_region``) under the mask:
  * ``A_heart_in_site_mean``: I_A inside, the mean of 16 other phantoms *of A's site* outside: the
                         surroundings a model that knew A's site could draw, the most the template's
                         site context can give (a template model sees one member of the site, B).

Hand-written (an analysis of the project's own phantom generator; no library has it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import fcas.phantom as phantom
from fcas.labels import default_schema
from fcas.metrics.image import ssim
from fcas.diffusion.pairs import held_out_partner
from fcas.phantom import intensities
from fcas.phantom.sites import SiteDraws, site_of

__all__ = ["template_information", "population_mean", "MASKED", "WHOLE", "SITE"]

MASKED = ("own_hu_of_B", "noise_free", "noise_free_hu_B", "A_heart_in_mean_region", "A_heart_in_B_region")
WHOLE = ("B_image", "A_heart_in_B", "A_heart_in_mean")
SITE = ("A_heart_in_site_mean_region", "A_heart_in_site_mean")   # with sites only
SITE_MEAN_SEEDS = 1_000_000   # the extra members of a site for its mean: seeds 1e6 + 16 * site + j


def _unit(case) -> np.ndarray:
    return np.clip((case.image.astype(np.float32) + 1000.0) / 2000.0, 0.0, 1.0)


def _case(seed: int, shape, spacing, site_size, noise: bool = True):
    return phantom.make_case(seed, shape, spacing, noise=noise,
                             site=None if site_size is None else site_of(seed, site_size))


def _hu_table(seed: int, site_size) -> dict:
    """The HU table case ``seed`` draws (make_case: the heart scale first, then the table, pulled to its site's)."""
    rng = np.random.default_rng(seed)
    rng.uniform(0.95, 1.15)
    return intensities.draw_hu(rng if site_size is None else SiteDraws(rng, site_of(seed, site_size)))


def _with_hu_of(seed: int, hu_seed: int, shape, spacing, noise: bool = True, site_size=None):
    """Case ``seed`` (its anatomy and noise) rendered with the HU table of case ``hu_seed``."""
    table = _hu_table(hu_seed, site_size)
    draw = intensities.draw_hu   # make_case looks it up on fcas.phantom.intensities

    def patched(rng):
        draw(rng)          # the same number of draws: every later draw of the seed is unchanged
        return dict(table)

    intensities.draw_hu = patched
    try:
        return _case(seed, shape, spacing, site_size, noise=noise)
    finally:
        intensities.draw_hu = draw


def population_mean(seeds: Sequence[int], shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0), site_size=None) -> np.ndarray:
    """The voxel-wise mean image of phantoms ``seeds`` on the [0, 1] scale: the surroundings of ``*_in_mean``
    (with ``site_size``: phantoms of their sites, as the test pairs are; other seeds, so other sites)."""
    return np.mean([_unit(_case(int(s), shape, spacing, site_size)) for s in seeds], axis=0)


def template_information(seeds: Sequence[int], shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0),
                         mean_seeds: Sequence[int] = range(100, 116), site_size: int | None = None) -> dict:
    """The oracles of the module docstring on the pairs ``(seeds[i], seeds[held_out_partner(i)])``; with
    ``site_size`` the phantoms come in sites of that many consecutive seeds and B is from A's site.

    Returns ``{"pairs", "seeds", "table": {oracle: {"mean", "sd", "per_pair"}}, "hu_table_effect",
    "surroundings_copy_minus_mean"}``.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ValueError(f"need at least 2 seeds for pairs, got {seeds}")
    cardiac = default_schema().cardiac_ids
    cases = {s: _case(s, shape, spacing, site_size) for s in seeds}
    sites = None if site_size is None else [str(site_of(s, site_size)) for s in seeds]
    mean_img = population_mean(mean_seeds, shape, spacing, site_size)
    rows: dict[str, list[float]] = {k: [] for k in MASKED + WHOLE + (SITE if site_size else ())}
    site_means: dict[int, np.ndarray] = {}
    for i, sa in enumerate(seeds):
        sb = seeds[held_out_partner(i, len(seeds), sites)]
        A, B = _unit(cases[sa]), _unit(cases[sb])
        m = np.isin(cases[sa].label, cardiac)
        rows["own_hu_of_B"].append(ssim(_unit(_with_hu_of(sa, sb, shape, spacing, site_size=site_size)), A, m))
        rows["noise_free"].append(ssim(_unit(_case(sa, shape, spacing, site_size, noise=False)), A, m))
        rows["noise_free_hu_B"].append(ssim(_unit(_with_hu_of(sa, sb, shape, spacing, False, site_size)), A, m))
        rows["A_heart_in_mean_region"].append(ssim(np.where(m, A, mean_img), A, m))
        rows["A_heart_in_B_region"].append(ssim(np.where(m, A, B), A, m))
        rows["B_image"].append(ssim(B, A))
        rows["A_heart_in_B"].append(ssim(np.where(m, A, B), A))
        rows["A_heart_in_mean"].append(ssim(np.where(m, A, mean_img), A))
        if site_size:
            k = site_of(sa, site_size)
            if k not in site_means:
                site_means[k] = np.mean([_unit(phantom.make_case(SITE_MEAN_SEEDS + 16 * k + j, shape, spacing, site=k))
                                         for j in range(len(mean_seeds))], axis=0)
            rows["A_heart_in_site_mean_region"].append(ssim(np.where(m, A, site_means[k]), A, m))
            rows["A_heart_in_site_mean"].append(ssim(np.where(m, A, site_means[k]), A))
    table = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "per_pair": [round(x, 4) for x in v]}
             for k, v in rows.items()}
    return {"pairs": len(seeds), "seeds": seeds, "site_size": site_size, "table": table,
            "hu_table_effect": 1.0 - table["own_hu_of_B"]["mean"],
            "surroundings_copy_minus_mean": table["A_heart_in_B"]["mean"] - table["A_heart_in_mean"]["mean"]}
