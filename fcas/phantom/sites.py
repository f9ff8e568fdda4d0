"""Sites: families of phantoms that share an acquisition and a patient setup, as scans of one hospital do.

Real CT of one site shares scanner, protocol and patient position: the contrast levels, noise and
reconstruction kernel, the field of view's centring on the chest, and roughly the body habitus of
the population. Independently drawn phantoms share none of that, so a template pair (I_B, M_B) tells
nothing about a target I_A that its mask M_A does not. A site makes that context shared:
:class:`SiteDraws` stands in for the case's generator wherever :func:`~fcas.phantom.make_case`
draws the HU table and the surroundings, and returns ``site + spread * (case - site)`` for each
uniform draw, where ``site`` is the same draw from the site's own generator (seeded by
``(SITE_SALT, site)``) and ``case`` the case's own draw. ``spread=1`` gives the independent case
bit for bit, ``spread=0`` the site's values exactly; the heart, vessels, coronaries, pulmonary
vessels and noise stay the case's own at every spread.

Which seeds form a site is the caller's choice; the data sources use consecutive blocks of seeds
(:func:`site_of`). Hand-written: part of the project's own phantom generator.
"""
from __future__ import annotations

import numpy as np

SITE_SALT = 0x517E
DEFAULT_SPREAD = 0.3


def site_of(seed: int, site_size: int) -> int:
    """The site of phantom ``seed`` when sites are blocks of ``site_size`` consecutive seeds."""
    if int(site_size) < 1:
        raise ValueError(f"site size must be >= 1, got {site_size}")
    return int(seed) // int(site_size)


class SiteDraws:
    """A case generator whose uniform draws are pulled towards those of its site (module docstring).

    ``uniform(lo, hi)`` takes one draw from each generator, so the case's own stream advances exactly
    as without a site; every other method is the case generator's, and ``case`` is that generator.
    """

    def __init__(self, case: np.random.Generator, site: int, spread: float = DEFAULT_SPREAD):
        if not 0.0 <= float(spread) <= 1.0:
            raise ValueError(f"site spread must be in [0, 1], got {spread}")
        self.case = case
        self.site = int(site)
        self.spread = float(spread)
        self._site = np.random.default_rng([SITE_SALT, self.site])

    def uniform(self, lo, hi):
        own = self.case.uniform(lo, hi)
        shared = self._site.uniform(lo, hi)
        return own if self.spread == 1.0 else shared + self.spread * (own - shared)

    def __getattr__(self, name):
        return getattr(self.case, name)
