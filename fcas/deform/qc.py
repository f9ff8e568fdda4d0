"""Topology QC of an MGM mask against its template: components, volumes, coronary tree, adjacency.

:func:`mask_stats` measures one label map (computed once per template and cached by the stage):

* per class: voxel count and number of connected components (``connectivity`` 6/18/26, default 26
  as in :func:`fcas.phantom.check_topology`);
* ``coronary_attached``: the fraction of coronary voxels whose component touches the ascending aorta
  (the aorta dilated by one voxel, 26-neighbourhood) -- the coronary tree still hangs on the root;
* ``wrap[(a, b)]``: the fraction of the boundary voxels of class ``a`` (voxels with a 6-neighbour
  outside ``a``) that have class ``b`` among their 26 neighbours -- e.g. (LV, LV myocardium): the
  myocardium still wraps the left ventricle.

:func:`qc_compare` turns the stats before and after into a :class:`QCResult` with pass/fail against
:class:`QCThresholds` (``configs/mgm/*.yaml``, key ``qc``):

* every checked class of the template is still present, with ``volume_ratio[0] <= after/before <=
  volume_ratio[1]``;
* no class gains components: ``components_after <= components_before + max_extra_components``;
* ``coronary_attached_after >= min(coronary_attached_before, coronary_attached_min)``;
* ``wrap_after >= adjacency_min_ratio * wrap_before`` for each configured pair (pairs that do not
  touch in the template are skipped).

Each check is computed inside the bounding box of the classes it needs (``scipy.ndimage``).
Hand-written here; the connected components and morphology are scipy's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from fcas.labels import LabelSchema, default_schema
from fcas.settings import build

__all__ = ["QCThresholds", "MaskStats", "QCResult", "mask_stats", "qc_compare"]

_STRUCTURES = {6: ndi.generate_binary_structure(3, 1), 18: ndi.generate_binary_structure(3, 2),
               26: ndi.generate_binary_structure(3, 3)}


@dataclass(frozen=True)
class QCThresholds:
    """Pass/fail thresholds of the MGM topology QC (see the module docstring)."""

    classes: str | tuple[str, ...] = "cardiac"
    connectivity: int = 26
    max_extra_components: int = 0
    volume_ratio: tuple[float, float] = (0.6, 1.6)
    coronary: str = "coronary_arteries"
    aorta: str = "ascending_aorta"
    coronary_attached_min: float = 0.99
    adjacency: tuple[tuple[str, str], ...] = (("left_ventricle", "lv_myocardium"),)
    adjacency_min_ratio: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            if self.classes not in ("cardiac", "all"):
                raise ValueError(f"mgm.qc.classes must be 'cardiac', 'all' or a list of names, got {self.classes!r}")
        else:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.connectivity not in _STRUCTURES:
            raise ValueError(f"mgm.qc.connectivity must be 6, 18 or 26, got {self.connectivity!r}")
        if int(self.max_extra_components) != self.max_extra_components or self.max_extra_components < 0:
            raise ValueError(f"mgm.qc.max_extra_components must be an integer >= 0, got {self.max_extra_components!r}")
        vr = self.volume_ratio
        if isinstance(vr, str) or not hasattr(vr, "__len__") or len(vr) != 2:
            raise ValueError(f"mgm.qc.volume_ratio must be a [low, high] pair, got {vr!r}")
        lo, hi = float(vr[0]), float(vr[1])
        if not (0 <= lo <= 1 <= hi) or not math.isfinite(hi):
            raise ValueError(f"mgm.qc.volume_ratio must satisfy 0 <= low <= 1 <= high < inf, got {vr!r}")
        object.__setattr__(self, "volume_ratio", (lo, hi))
        for name in ("coronary_attached_min", "adjacency_min_ratio"):
            v = float(getattr(self, name))
            if not 0 <= v <= 1:
                raise ValueError(f"mgm.qc.{name} must be in [0, 1], got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        pairs = []
        for p in self.adjacency:
            if isinstance(p, str) or len(p) != 2:
                raise ValueError(f"mgm.qc.adjacency entries must be [class_a, class_b] pairs, got {p!r}")
            pairs.append((str(p[0]), str(p[1])))
        object.__setattr__(self, "adjacency", tuple(pairs))

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "QCThresholds":
        return build(cls, d, where="mgm.qc")

    def class_ids(self, schema: LabelSchema) -> tuple[int, ...]:
        """The checked class ids (validated against ``schema``)."""
        if self.classes == "cardiac":
            return schema.cardiac_ids
        if self.classes == "all":
            return schema.foreground_ids
        return tuple(schema.id(n) for n in self.classes)

    def check_schema(self, schema: LabelSchema) -> None:
        """Raise ``ValueError`` if a class named here is not in ``schema``."""
        self.class_ids(schema)
        for n in (self.coronary, self.aorta, *(c for p in self.adjacency for c in p)):
            schema.id(n)


@dataclass(frozen=True)
class MaskStats:
    """Topology figures of one label map (ids as keys)."""

    volumes: Mapping[int, int]
    components: Mapping[int, int]
    coronary_attached: float  # NaN without coronaries or aorta
    wrap: Mapping[tuple[int, int], float]  # NaN where class a is absent


def _bbox(slices: Sequence, ids: Sequence[int], shape, margin: int = 1):
    boxes = [slices[i - 1] for i in ids if i - 1 < len(slices) and slices[i - 1] is not None]
    if not boxes:
        return None
    return tuple(slice(max(0, min(b[a].start for b in boxes) - margin), min(shape[a], max(b[a].stop for b in boxes) + margin))
                 for a in range(3))


def mask_stats(mask: np.ndarray, thresholds: QCThresholds | None = None, schema: LabelSchema | None = None) -> MaskStats:
    """Measure ``mask`` ``(D, H, W)`` uint8 for :func:`qc_compare`."""
    th = thresholds or QCThresholds()
    schema = schema or default_schema()
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"QC needs a 3D label map, got shape {mask.shape}")
    structure = _STRUCTURES[th.connectivity]
    counts = np.bincount(mask.reshape(-1), minlength=256)
    slices = ndi.find_objects(mask)
    volumes, components = {}, {}
    for cid in th.class_ids(schema):
        volumes[cid] = int(counts[cid])
        if counts[cid] == 0:
            components[cid] = 0
            continue
        box = _bbox(slices, [cid], mask.shape)
        components[cid] = int(ndi.label(mask[box] == cid, structure)[1])

    cor, ao = schema.id(th.coronary), schema.id(th.aorta)
    attached = math.nan
    if counts[cor] and counts[ao]:
        box = _bbox(slices, [cor, ao], mask.shape)
        sub = mask[box]
        cmask = sub == cor
        cc, n = ndi.label(cmask, _STRUCTURES[26])
        near = ndi.binary_dilation(sub == ao, _STRUCTURES[26])
        hit = np.unique(cc[near & cmask])
        attached = float(np.isin(cc, hit[hit > 0]).sum() / counts[cor])

    wrap = {}
    for a_name, b_name in th.adjacency:
        a, b = schema.id(a_name), schema.id(b_name)
        if not counts[a]:
            wrap[(a, b)] = math.nan
            continue
        box = _bbox(slices, [a, b] if counts[b] else [a], mask.shape, margin=2)
        sub = mask[box]
        am = sub == a
        edge = am & ~ndi.binary_erosion(am, _STRUCTURES[6], border_value=1)
        by_b = ndi.binary_dilation(sub == b, _STRUCTURES[26]) if counts[b] else np.zeros_like(am)
        wrap[(a, b)] = float((edge & by_b).sum() / max(int(edge.sum()), 1))
    return MaskStats(volumes=volumes, components=components, coronary_attached=attached, wrap=wrap)


@dataclass(frozen=True)
class QCResult:
    """MGM QC of one sample: ``passed`` and the reasons it failed, with the figures behind them."""

    passed: bool
    failures: tuple[str, ...]
    volume_ratio: Mapping[str, float]
    components_before: Mapping[str, int]
    components_after: Mapping[str, int]
    coronary_attached_before: float
    coronary_attached_after: float
    wrap_before: Mapping[str, float]
    wrap_after: Mapping[str, float]
    extras: Mapping[str, float] = field(default_factory=dict)

    def to_flat(self, prefix: str = "qc_") -> dict[str, float]:
        """Flat ``{name: float}`` with a fixed key set per (schema, thresholds): one manifest row."""
        out = {prefix + "passed": float(self.passed), prefix + "n_failures": float(len(self.failures))}
        for name, v in self.volume_ratio.items():
            out[f"{prefix}volume_ratio_{name}"] = float(v)
        for name in self.components_after:
            out[f"{prefix}components_before_{name}"] = float(self.components_before[name])
            out[f"{prefix}components_after_{name}"] = float(self.components_after[name])
        out[prefix + "coronary_attached_before"] = float(self.coronary_attached_before)
        out[prefix + "coronary_attached_after"] = float(self.coronary_attached_after)
        for pair in self.wrap_after:
            out[f"{prefix}wrap_{pair}_before"] = float(self.wrap_before[pair])
            out[f"{prefix}wrap_{pair}_after"] = float(self.wrap_after[pair])
        out.update({prefix + k: float(v) for k, v in self.extras.items()})
        return out


def qc_compare(before: MaskStats, after: MaskStats, thresholds: QCThresholds | None = None,
               schema: LabelSchema | None = None) -> QCResult:
    """Compare the stats of a template (``before``) and its MGM mask (``after``); see module doc."""
    th = thresholds or QCThresholds()
    schema = schema or default_schema()
    names = schema.names
    lo, hi = th.volume_ratio
    failures: list[str] = []
    ratios, cb, ca = {}, {}, {}
    for cid in th.class_ids(schema):
        name = names[cid]
        vb, va = before.volumes.get(cid, 0), after.volumes.get(cid, 0)
        ratios[name] = va / vb if vb else math.nan
        cb[name], ca[name] = before.components.get(cid, 0), after.components.get(cid, 0)
        if not vb:
            continue
        if not va:
            failures.append(f"{name} missing")
            continue
        if not lo <= ratios[name] <= hi:
            failures.append(f"{name} volume ratio {ratios[name]:.3f} not in [{lo}, {hi}]")
        if ca[name] > cb[name] + th.max_extra_components:
            failures.append(f"{name} components {cb[name]} -> {ca[name]}")
    ab, aa = before.coronary_attached, after.coronary_attached
    if not math.isnan(ab):
        need = min(ab, th.coronary_attached_min)
        if math.isnan(aa) or aa < need - 1e-12:
            failures.append(f"coronary attached fraction {aa:.3f} < {need:.3f}")
    wb, wa = {}, {}
    for (a, b), v in before.wrap.items():
        key = f"{names[a]}__{names[b]}"
        wb[key], wa[key] = v, after.wrap.get((a, b), math.nan)
        if math.isnan(v) or v == 0:
            continue
        need = th.adjacency_min_ratio * v
        if math.isnan(wa[key]) or wa[key] < need - 1e-12:
            failures.append(f"{names[b]} wraps {names[a]}: {wa[key]:.3f} < {need:.3f}")
    return QCResult(passed=not failures, failures=tuple(failures), volume_ratio=ratios,
                    components_before=cb, components_after=ca, coronary_attached_before=ab,
                    coronary_attached_after=aa, wrap_before=wb, wrap_after=wa)
