"""Label topology: the builder's safety net and the measurements of tests and the QC report.

Connectivity is 26-connectivity throughout. :func:`enforce_topology` keeps the largest component of
each single-component cardiac class and drops coronary components not touching the aorta;
:func:`check_topology` measures the same properties (and the myocardial wrap) on any label map.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fcas.labels import LabelSchema, default_schema

SINGLE_COMPONENT = ("left_ventricle", "right_ventricle", "left_atrium", "right_atrium",
                    "lv_myocardium", "ascending_aorta", "pulmonary_artery")
_CONN26 = np.ones((3, 3, 3), dtype=bool)


def enforce_topology(label: np.ndarray, schema: LabelSchema) -> int:
    """Safety net (in place): one 26-component per chamber/vessel, coronaries attached to the aorta.

    Returns the number of voxels moved to background.
    """
    moved = 0
    for name in SINGLE_COMPONENT:
        m = label == schema.id(name)
        cc, n = ndimage.label(m, _CONN26)
        if n > 1:
            keep = np.argmax(np.bincount(cc.ravel())[1:]) + 1
            drop = m & (cc != keep)
            moved += int(drop.sum())
            label[drop] = 0
    cor = label == schema.id("coronary_arteries")
    cc, n = ndimage.label(cor, _CONN26)
    if n:
        near = ndimage.binary_dilation(label == schema.id("ascending_aorta"), _CONN26)
        attached = np.unique(cc[near & cor])
        drop = cor & ~np.isin(cc, attached)
        moved += int(drop.sum())
        label[drop] = 0
    return moved


# ---- measurements used by the tests and the QC report ------------------------------------------
def class_volumes(label: np.ndarray, schema: LabelSchema | None = None) -> dict[str, int]:
    """Voxel count per non-background class of ``schema`` (default: the cardiac schema)."""
    schema = schema or default_schema()
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=256)
    return {n: int(counts[i]) for n, i in schema.classes.items() if i != 0}


def check_topology(label: np.ndarray, schema: LabelSchema | None = None, min_wrap: float = 0.7) -> dict:
    """Topology figures of a label map (components with 26-connectivity).

    Returns ``components`` per single-component class, ``missing`` cardiac classes, ``coronary_components``,
    ``coronary_attached`` (every coronary component touches the aorta dilated by one voxel),
    ``myo_wrap`` (fraction of LV boundary voxels with myocardium among their 26 neighbours) and ``ok``.
    """
    schema = schema or default_schema()
    label = np.asarray(label)
    missing = [n for n in schema.cardiac if not (label == schema.id(n)).any()]
    comps = {n: int(ndimage.label(label == schema.id(n), _CONN26)[1]) for n in SINGLE_COMPONENT}
    cor = label == schema.id("coronary_arteries")
    cc, n_cor = ndimage.label(cor, _CONN26)
    near = ndimage.binary_dilation(label == schema.id("ascending_aorta"), _CONN26)
    attached = bool(n_cor) and len(set(np.unique(cc[near & cor])) - {0}) == n_cor
    lv = label == schema.id("left_ventricle")
    edge = lv & ~ndimage.binary_erosion(lv)
    by_myo = ndimage.binary_dilation(label == schema.id("lv_myocardium"), _CONN26)
    wrap = float((edge & by_myo).sum() / max(int(edge.sum()), 1))
    ok = (not missing and all(v == 1 for v in comps.values()) and n_cor in (1, 2) and attached
          and wrap >= min_wrap)
    return dict(components=comps, missing=missing, coronary_components=int(n_cor),
                coronary_attached=attached, myo_wrap=wrap, ok=bool(ok))
