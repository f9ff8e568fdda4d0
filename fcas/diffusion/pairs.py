"""Pair sampling for bidirectional training (the paper's §3.1.2): random ordered pairs ``(a, b)``, ``a != b``,
from ``N`` training cases (N(N-1) ordered pairs; with both directions trained per pair, the paper's
"(N^tr)^2 training pairs"). Each draw comes from ``numpy.random.default_rng([seed, step, rank])`` so a
resumed run sees the same pairs as an uninterrupted one. When the cases name sites (scans of one
hospital: :mod:`fcas.phantom.sites`), the template ``b`` is drawn from ``a``'s site, as the paper's
template library and references come from one dataset. Hand-written (a few lines of NumPy).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["sample_pairs", "held_out_partner", "step_rng", "refill_rng", "refill_due"]


def step_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(rank)])


def refill_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The draw of the case-buffer slot a streamed step replaces (apart from the step's own draws)."""
    return np.random.default_rng([int(seed), int(step), int(rank), 1])


def refill_due(refill_every: int, step: int) -> bool:
    """Whether streamed step ``step`` (1-based) replaces a buffer slot: every ``refill_every``-th step, never at 0."""
    return refill_every > 0 and int(step) % int(refill_every) == 0


def sample_pairs(n_cases: int, n_pairs: int, rng: np.random.Generator,
                 sites: Sequence[str] | None = None) -> np.ndarray:
    """``(n_pairs, 2)`` int64 case indices with ``a != b`` in every row (uniform over ordered pairs).

    ``sites`` (one per case, "" for none): ``b`` is drawn uniformly from the other cases of ``a``'s site;
    where that site has no other case here (or ``a`` names none), from all other cases. The draws of
    ``a`` and of the fallback are those without sites.
    """
    if n_cases < 2:
        raise ValueError(f"pair sampling needs at least 2 cases, got {n_cases}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    a = rng.integers(0, n_cases, size=n_pairs)
    b = (a + rng.integers(1, n_cases, size=n_pairs)) % n_cases  # uniform over the other cases
    if sites is not None:
        if len(sites) != n_cases:
            raise ValueError(f"sites names {len(sites)} cases, expected {n_cases}")
        u = rng.random(n_pairs)
        for k, (ak, uk) in enumerate(zip(a, u)):
            if sites[ak]:
                mates = [j for j, sj in enumerate(sites) if sj == sites[ak] and j != ak]
                if mates:
                    b[k] = mates[int(uk * len(mates))]
    return np.stack([a, b], axis=1).astype(np.int64)


def held_out_partner(i: int, n_cases: int, sites: Sequence[str] | None = None) -> int:
    """The template of held-out case ``i`` (Table 1's fixed pairs): the next case of its site in case order
    (cyclic within the site), or ``i + 1 mod n_cases`` without sites or when ``i`` is alone in its site."""
    if n_cases < 2:
        raise ValueError(f"held-out pairs need at least 2 cases, got {n_cases}")
    i = int(i) % n_cases
    if sites is not None and sites[i]:
        mates = [j for j, sj in enumerate(sites) if sj == sites[i]]
        if len(mates) > 1:
            return mates[(mates.index(i) + 1) % len(mates)]
    return (i + 1) % n_cases
