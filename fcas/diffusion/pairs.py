"""Pair sampling for bidirectional training (the paper's §3.1.2): random ordered pairs ``(a, b)``, ``a != b``,
from ``N`` training cases (N(N-1) ordered pairs; with both directions trained per pair, the paper's
"(N^tr)^2 training pairs"). Each draw comes from ``numpy.random.default_rng([seed, step, rank])`` so a
resumed run sees the same pairs as an uninterrupted one. Hand-written (a few lines of NumPy).
"""
from __future__ import annotations

import numpy as np

__all__ = ["sample_pairs", "step_rng", "refill_rng", "refill_due"]


def step_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(rank)])


def refill_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The draw of the case-buffer slot a streamed step replaces (apart from the step's own draws)."""
    return np.random.default_rng([int(seed), int(step), int(rank), 1])


def refill_due(refill_every: int, step: int) -> bool:
    """Whether streamed step ``step`` (1-based) replaces a buffer slot: every ``refill_every``-th step, never at 0."""
    return refill_every > 0 and int(step) % int(refill_every) == 0


def sample_pairs(n_cases: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_pairs, 2)`` int64 case indices with ``a != b`` in every row (uniform over ordered pairs)."""
    if n_cases < 2:
        raise ValueError(f"pair sampling needs at least 2 cases, got {n_cases}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    a = rng.integers(0, n_cases, size=n_pairs)
    b = (a + rng.integers(1, n_cases, size=n_pairs)) % n_cases  # uniform over the other cases
    return np.stack([a, b], axis=1).astype(np.int64)
