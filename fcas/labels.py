"""Label schema and mask encodings (the condition contract of TCDM).

A :class:`LabelSchema` holds stable integer ids for the eight cardiac classes of the seed
paper plus surrounding tissues, a union priority (thin structures win; :meth:`LabelSchema.union` of
per-class masks, :meth:`LabelSchema.merge` of several sources' label maps), and per-source-dataset
mappings by id and, for per-structure folders, by structure name. It is loaded from
``configs/labels/<name>.yaml``.

Encodings, each with an exact inverse:

* :func:`to_bits` / :func:`from_bits` -- channel-wise bit-plane binarization as MAISI does it:
  label id ``l`` becomes ``n_bits = ceil(log2(max_id + 1))`` binary channels, channel ``k`` holding
  bit ``k`` (least significant first).
* :func:`to_onehot` / :func:`from_onehot` -- one channel per class id.

Hand-written here because MONAI has no schema object; the one-hot uses ``torch.nn.functional``. torch is
imported by the encodings only, so reading a schema (every job's input checks) does not load it.
"""
from __future__ import annotations

import fnmatch
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from fcas.config_files import CONFIG_DIR, read_config  # noqa: F401  (re-exported from here too)

if TYPE_CHECKING:   # annotations only
    import torch

CARDIAC_CLASSES = (
    "left_ventricle",
    "right_ventricle",
    "left_atrium",
    "right_atrium",
    "lv_myocardium",
    "ascending_aorta",
    "pulmonary_artery",
    "coronary_arteries",
)


@dataclass(frozen=True)
class SourceMapping:
    """Source dataset ids -> our ids. ``default`` (our id) applies to unlisted source ids.

    ``files``: structure name -> our id, for a per-structure folder (``<name>.nii.gz``, one binary mask
    each, as TotalSegmentator writes). ``multilabel``: a label map holding a single structure id is
    refused as a binary mask (it cannot tell the structures apart) instead of becoming that class.
    """

    name: str
    ids: Mapping[int, int]
    default: int | None = None
    files: Mapping[str, int] = field(default_factory=dict)
    multilabel: bool = False

    def lut(self, max_source_id: int) -> np.ndarray:
        """Lookup table of length ``max_source_id + 1``; -1 marks an id the mapping refuses."""
        fill = -1 if self.default is None else self.default
        table = np.full(max_source_id + 1, fill, dtype=np.int16)
        for src, dst in self.ids.items():
            if src <= max_source_id:
                table[src] = dst
        return table


@dataclass(frozen=True)
class LabelSchema:
    """Stable class ids, the cardiac subset and the union priority (highest first)."""

    name: str
    classes: Mapping[str, int]
    cardiac: tuple[str, ...]
    priority: tuple[str, ...]
    sources: Mapping[str, SourceMapping] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = list(self.classes.values())
        if self.classes.get("background") != 0:
            raise ValueError(f"label schema {self.name!r}: 'background' must have id 0")
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) > 255:
            raise ValueError(f"label schema {self.name!r}: ids must be unique and in 0..255, got {ids}")
        for group, names in (("cardiac", self.cardiac), ("priority", self.priority)):
            unknown = [n for n in names if n not in self.classes]
            if unknown:
                raise ValueError(f"label schema {self.name!r}: {group} names unknown classes {unknown}")
        missing = set(self.classes) - {"background"} - set(self.priority)
        if missing:
            raise ValueError(f"label schema {self.name!r}: priority misses classes {sorted(missing)}")

    # ---- ids -------------------------------------------------------------------------------
    def id(self, name: str) -> int:
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"unknown class {name!r}; schema {self.name!r} has {list(self.classes)}") from None

    @property
    def names(self) -> dict[int, str]:
        return {v: k for k, v in self.classes.items()}

    @property
    def max_id(self) -> int:
        return max(self.classes.values())

    @property
    def n_bits(self) -> int:
        """Bit planes needed for every id: ceil(log2(max_id + 1))."""
        return max(1, math.ceil(math.log2(self.max_id + 1)))

    @property
    def cardiac_ids(self) -> tuple[int, ...]:
        return tuple(self.classes[n] for n in self.cardiac)

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        return tuple(sorted(v for v in self.classes.values() if v != 0))

    @property
    def priority_ids(self) -> tuple[int, ...]:
        """Class ids, highest union priority first."""
        return tuple(self.classes[n] for n in self.priority)

    def valid_ids_lut(self) -> np.ndarray:
        """Boolean table over 0..255: True where the id belongs to the schema."""
        table = np.zeros(256, dtype=bool)
        table[list(self.classes.values())] = True
        return table

    def unknown_ids(self, mask: np.ndarray) -> list[int]:
        """Ids present in ``mask`` that the schema does not define (sorted)."""
        present = np.unique(mask)
        return [int(v) for v in present if v < 0 or v > 255 or not self.valid_ids_lut()[int(v)]]

    # ---- mappings --------------------------------------------------------------------------
    def map_source(self, mask: np.ndarray, source: str | SourceMapping | None) -> np.ndarray:
        """Map a source dataset's label ids to ours (uint8). ``None`` means ids are already ours.

        Raises ``ValueError`` listing the ids the mapping (or schema) does not know.
        """
        mask = np.asarray(mask)
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"label map must have an integer dtype, got {mask.dtype}")
        if source is None:
            bad = self.unknown_ids(mask)
            if bad:
                raise ValueError(f"label ids {bad[:10]} are not in schema {self.name!r}")
            return mask.astype(np.uint8, copy=False)
        mapping = source if isinstance(source, SourceMapping) else self.source(source)
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0:
            raise ValueError(f"negative label id {lo} has no mapping in {mapping.name!r}")
        lut = mapping.lut(hi)
        out = lut[mask]
        if (out < 0).any():
            bad = sorted(int(v) for v in np.unique(mask[out < 0]))
            raise ValueError(f"label ids {bad[:10]} are not in mapping {mapping.name!r}")
        if mapping.multilabel:
            present = np.flatnonzero(np.bincount(mask.ravel())[1:]) + 1
            if len(present) == 1:
                raise ValueError(f"a binary mask (one structure id, {int(present[0])}), but mapping {mapping.name!r} "
                                 f"expects a multilabel map of {len(set(mapping.ids) - {0})} structures or a "
                                 "per-structure folder; refusing to guess the classes")
        return out.astype(np.uint8)

    def source(self, name: str) -> SourceMapping:
        try:
            return self.sources[name]
        except KeyError:
            raise ValueError(f"unknown label mapping {name!r}; schema {self.name!r} has {list(self.sources)}") from None

    # ---- class subsets and unions -----------------------------------------------------------
    def cardiac_only(self, mask: np.ndarray | torch.Tensor):
        """Zero every voxel that is not one of the eight cardiac classes (same type and dtype)."""
        ids = list(self.cardiac_ids)
        torch = sys.modules.get("torch")   # a tensor exists only once torch is imported
        if torch is not None and isinstance(mask, torch.Tensor):
            keep = torch.isin(mask, torch.tensor(ids, device=mask.device, dtype=mask.dtype))
            return torch.where(keep, mask, torch.zeros_like(mask))
        mask = np.asarray(mask)
        return np.where(np.isin(mask, ids), mask, 0).astype(mask.dtype, copy=False)

    def union(self, binaries: Mapping[int, np.ndarray], shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Union of per-class binary masks into one label map; higher priority wins overlaps."""
        if not binaries and shape is None:
            raise ValueError("union of no classes needs a shape")
        shape = shape or next(iter(binaries.values())).shape
        out = np.zeros(shape, dtype=np.uint8)
        for cid in reversed(self.priority_ids):  # lowest priority first, so higher ones overwrite
            b = binaries.get(cid)
            if b is not None:
                out[np.asarray(b, dtype=bool)] = cid
        return out

    def merge(self, maps: Sequence[np.ndarray]) -> np.ndarray:
        """Label maps in our ids (one per label source, same shape) merged voxel-wise by the union priority:
        where sources disagree the higher-priority class wins, and background never overrides a class.
        The same result as :meth:`union` of every map's per-class masks, at one pass per map."""
        if not maps:
            raise ValueError("merge of no label maps")
        rank = np.full(256, len(self.priority_ids), dtype=np.uint8)   # background: below every class
        rank[list(self.priority_ids)] = np.arange(len(self.priority_ids))
        out = np.array(maps[0], dtype=np.uint8)
        for m in maps[1:]:
            take = rank[m] < rank[out]
            out[take] = m[take]
        return out


def _source_from_dict(sname: str, sdef: Mapping, classes: Mapping[str, int]) -> SourceMapping:
    """``ids`` (source id -> class) and/or ``names`` (source id -> structure name) with ``classes``
    (structure name or glob -> class, the first matching pattern wins)."""
    def our(dst, what):
        if dst not in classes:
            raise ValueError(f"mapping {sname!r}: {what} maps to unknown class {dst!r}")
        return classes[dst]

    ids = {int(src): our(dst, f"source id {src}") for src, dst in (sdef.get("ids") or {}).items()}
    patterns = {str(p): our(dst, f"pattern {p!r}") for p, dst in (sdef.get("classes") or {}).items()}
    files = {}
    for src, name in (sdef.get("names") or {}).items():
        match = next((cid for p, cid in patterns.items() if fnmatch.fnmatchcase(str(name), p)), None)
        if match is None:
            raise ValueError(f"mapping {sname!r}: structure {name!r} (id {src}) matches no pattern of its classes")
        files[str(name)] = match
        ids.setdefault(int(src), match)
    if files:
        ids.setdefault(0, 0)
    default = sdef.get("default")
    return SourceMapping(sname, ids, None if default is None else our(default, "default"), files,
                         bool(sdef.get("multilabel", False)))


def _schema_from_dict(d: Mapping) -> LabelSchema:
    classes = {str(k): int(v) for k, v in d["classes"].items()}
    sources = {sname: _source_from_dict(sname, sdef, classes) for sname, sdef in (d.get("sources") or {}).items()}
    return LabelSchema(
        name=str(d.get("name", "custom")),
        classes=classes,
        cardiac=tuple(d.get("cardiac", CARDIAC_CLASSES)),
        priority=tuple(d["priority"]),
        sources=sources,
    )


@lru_cache(maxsize=8)
def load_schema(name_or_path: str = "cardiac") -> LabelSchema:
    """Load a schema by name (``configs/labels/<name>.yaml``) or from a YAML path."""
    return _schema_from_dict(read_config("labels", name_or_path, "label schema"))


def default_schema() -> LabelSchema:
    return load_schema("cardiac")


# ---- encodings ------------------------------------------------------------------------------
def _as_long(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    import torch
    t = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    if t.is_floating_point():
        raise ValueError(f"label map must be integer, got {t.dtype}")
    return t.long()


def to_bits(labels: torch.Tensor | np.ndarray, n_bits: int, channel_dim: int = 0) -> torch.Tensor:
    """Bit-plane binarization (MAISI style).

    labels: integer ids, e.g. ``(D, H, W)`` or ``(B, D, H, W)``; returns float32 with a new
    channel axis of size ``n_bits`` inserted at ``channel_dim`` (LSB first), e.g. ``(n_bits, D, H, W)``
    or, with ``channel_dim=1``, ``(B, n_bits, D, H, W)``.
    """
    import torch
    t = _as_long(labels)
    if t.numel() and (t.min() < 0 or t.max() >= 2**n_bits):
        raise ValueError(f"label ids must be in [0, {2**n_bits - 1}] for {n_bits} bits, got [{int(t.min())}, {int(t.max())}]")
    weights = 2 ** torch.arange(n_bits, device=t.device)
    planes = (t.unsqueeze(-1) & weights).ne(0).to(torch.float32)  # (..., n_bits)
    return torch.movedim(planes, -1, channel_dim)


def from_bits(planes: torch.Tensor, channel_dim: int = 0, threshold: float = 0.5) -> torch.Tensor:
    """Inverse of :func:`to_bits`: planes ``> threshold`` are set bits; returns int64 ids."""
    import torch
    n_bits = planes.shape[channel_dim]
    bits = (torch.movedim(planes, channel_dim, -1) > threshold).long()
    weights = 2 ** torch.arange(n_bits, device=planes.device)
    return (bits * weights).sum(-1)


def to_onehot(labels: torch.Tensor | np.ndarray, num_classes: int, channel_dim: int = 0) -> torch.Tensor:
    """One-hot: ids ``(...)`` -> float32 with ``num_classes`` channels inserted at ``channel_dim``."""
    import torch
    t = _as_long(labels)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"label ids must be in [0, {num_classes - 1}], got [{int(t.min())}, {int(t.max())}]")
    return torch.movedim(torch.nn.functional.one_hot(t, num_classes).to(torch.float32), -1, channel_dim)


def from_onehot(onehot: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`to_onehot` (argmax over the channel axis); returns int64 ids."""
    return onehot.argmax(dim=channel_dim)


def encode(labels, schema: LabelSchema, mode: str = "bits", channel_dim: int = 0) -> torch.Tensor:
    """Encode a label map for conditioning: ``mode`` is ``bits`` or ``onehot``."""
    if mode == "bits":
        return to_bits(labels, schema.n_bits, channel_dim)
    if mode == "onehot":
        return to_onehot(labels, schema.max_id + 1, channel_dim)
    raise ValueError(f"unknown mask encoding {mode!r}; use 'bits' or 'onehot'")


def encoded_channels(schema: LabelSchema, mode: str = "bits") -> int:
    if mode == "bits":
        return schema.n_bits
    if mode == "onehot":
        return schema.max_id + 1
    raise ValueError(f"unknown mask encoding {mode!r}; use 'bits' or 'onehot'")
