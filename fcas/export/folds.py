"""Group k-fold splits for nnU-Net's ``splits_final.json``: every group (a template and the samples drawn from
it) in one validation fold, groups shuffled by a seed and dealt largest first to the lightest fold (greedy
balancing as scikit-learn's ``GroupKFold`` does; hand-written, the project does not depend on scikit-learn).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["group_kfold_splits"]


def group_kfold_splits(cases: Sequence[str], groups: Sequence[str], n_folds: int = 5,
                       seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net ``splits_final.json`` content with every group inside one validation fold.

    Args:
        cases: case names.
        groups: the group of each case (same length); cases of one group never straddle folds.
        n_folds: number of folds.
        seed: groups are shuffled by ``numpy.random.default_rng(seed)`` before the greedy dealing,
            so ties between equal-sized groups depend on the seed only.

    Returns:
        ``[{"train": [...], "val": [...]}] * n_folds``, names sorted; each case is in exactly one
        ``val`` list and in the ``train`` list of every other fold.

    Raises:
        ValueError: mismatched lengths, duplicate case names, or fewer groups than folds.
    """
    cases, groups = [str(c) for c in cases], [str(g) for g in groups]
    if len(cases) != len(groups):
        raise ValueError(f"{len(cases)} cases but {len(groups)} groups")
    if len(set(cases)) != len(cases):
        dup = sorted({c for c in cases if cases.count(c) > 1})
        raise ValueError(f"duplicate case names: {dup[:5]}")
    members: dict[str, list[str]] = {}
    for c, g in zip(cases, groups):
        members.setdefault(g, []).append(c)
    names = sorted(members)
    if len(names) < n_folds:
        raise ValueError(f"{len(names)} groups (templates / cases) cannot fill {n_folds} validation folds; "
                         f"export more, or set folds <= {len(names)}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    order.sort(key=lambda g: -len(members[g]))          # stable: shuffled order among equal sizes
    load = np.zeros(n_folds, dtype=np.int64)
    val: list[list[str]] = [[] for _ in range(n_folds)]
    for g in order:
        f = int(np.argmin(load))                         # first lightest fold
        val[f].extend(members[g])
        load[f] += len(members[g])
    everyone = sorted(cases)
    splits = []
    for f in range(n_folds):
        held = set(val[f])
        splits.append({"train": [c for c in everyone if c not in held], "val": sorted(held)})
    return splits
