"""Intensities: the per-seed HU table of every tissue and the scanner domains that alter it.

:func:`draw_hu` draws blood, myocardium, fat, lung, bone, ... levels plus the noise and kernel width
of one seed; :func:`apply_domain` turns that table into another acquisition without a random draw,
so a seed keeps its anatomy (and label map) in every domain. :func:`class_lut` is the table as a
lookup by the class ids the builder paints (:data:`IDS`, those of ``configs/labels/cardiac.yaml``).
:func:`fcas.phantom.make_case` calls ``intensities.draw_hu`` through this module, so
``fcas.evaluation.template_oracles`` can render a case with another seed's table.
"""
from __future__ import annotations

import numpy as np

HU_MIN, HU_MAX = -1024, 3071
IDS = dict(lv=1, rv=2, la=3, ra=4, myo=5, aorta=6, pa=7, cor=8, lung=9, bone=10, soft=11)


def draw_hu(rng) -> dict:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    blood_l = u(340, 430)
    hu = dict(blood_l=blood_l, blood_r=u(max(325.0, blood_l - 60), blood_l), myo=u(100, 135), fat=u(-115, -85),
              lung=u(-875, -825), soft=u(35, 55), liver=u(55, 75), cancellous=u(430, 520),
              cortical=u(900, 1300), aorta_boost=u(0, 20), noise=u(20, 35), psf=u(0.5, 0.8))
    hu["svc"] = u(hu["blood_r"] - 80, hu["blood_r"] + 150)
    hu["lung_vessel"] = u(120, 250)
    return hu


DOMAINS = ("standard", "lowdose")


def apply_domain(hu: dict, domain: str) -> dict:
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


def class_lut(hu: dict) -> np.ndarray:
    """(256,) float32 HU per class id of the HU table ``hu`` (background: fat)."""
    lut = np.zeros(256, np.float32)
    lut[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = [
        hu["fat"], hu["blood_l"], hu["blood_r"], hu["blood_l"], hu["blood_r"], hu["myo"],
        hu["blood_l"] + hu["aorta_boost"], hu["blood_r"], hu["blood_l"], hu["lung"], hu["cancellous"], hu["soft"]]
    return lut
