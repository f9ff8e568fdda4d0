"""Case preparation: validate one case, reorient, resample, crop around the heart.

A case is an image and one or more label sources (``{source name: file or folder}``), each mapped to
our ids by its label mapping and merged by the schema's union priority: e.g. the FCaS recipe for
ImageCAS (its coronaries + TotalSegmentator's heart chambers and surroundings, docs/data.md).
Images and label files are NIfTI, NRRD, MetaImage or a DICOM series folder (:mod:`fcas.io.volumes`);
a label folder holding volume files is a per-structure folder (``<structure>.nii.gz`` binary masks,
as TotalSegmentator writes), read by file name.

One case in, one :class:`PreparedCase` out, or a :class:`CaseRejected` with a one-line reason.
Validation refuses, in this order and before allocating voxel data where it can:
unreadable/truncated/unsupported file, a grid over the configured voxel limit (from the header),
not 3D, a source shape unlike the image's, non-finite image values, a source affine unlike the
image's, float label dtype, label ids (or folder files) outside the schema or the source mapping,
a binary mask for a multilabel mapping, no heart voxels, implausible HU range.

Reorientation, resampling, padding and cropping are MONAI transforms (``Orientationd``,
``Spacingd``, ``BorderPadd``, ``SpatialCropd``) on ``MetaTensor`` so the affine stays exact.
Split assignment and the per-case row are hand-written here (nothing in MONAI does them).
The Ray Data wiring is in :mod:`fcas.pipeline.prepare`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fcas.io import nifti, storage, volumes
from fcas.labels import LabelSchema, SourceMapping
from fcas.security import check_id, safe_child, sanitize_id

AIR_HU = -1024.0


class CaseRejected(ValueError):
    """A case refused by validation; ``str(err)`` is the one-line reason."""


@dataclass(frozen=True)
class PrepareSettings:
    """Grid and validation limits (from the preset and ``configs/prepare.yaml``)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    max_voxels: int = 512 * 512 * 1024
    hu_min: float = -3024.0          # below: not HU (or corrupt)
    hu_max: float = 8000.0
    min_hu_spread: float = 200.0     # p99 - p1 below this: not a CT in HU (normalised or blank)
    min_heart_voxels: int = 1
    affine_atol: float = 1e-3        # mm
    # mapping of configs/labels/<schema>.yaml per label source ((name, mapping) pairs or a dict), or one
    # for every source; None: ids are already ours
    label_mapping: str | tuple[tuple[str, str | None], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.label_mapping, Mapping):
            pairs = tuple((str(k), None if v is None else str(v)) for k, v in self.label_mapping.items())
            object.__setattr__(self, "label_mapping", pairs)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive floats, got {self.spacing}")
        if self.max_voxels < 1:
            raise ValueError(f"max_voxels must be positive, got {self.max_voxels}")

    def mapping_for(self, source: str) -> str | None:
        """The label mapping of label source ``source`` (None: its ids are already ours)."""
        if self.label_mapping is None or isinstance(self.label_mapping, str):
            return self.label_mapping
        return dict(self.label_mapping).get(source)


@dataclass
class PreparedCase:
    """A case on the preset grid: ``image`` (D, H, W) float32 HU, ``label`` (D, H, W) uint8."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)


def safe_case_id(name: str) -> str:
    """A case id usable as a file name, derived from a source file name (:func:`fcas.security.sanitize_id`):
    the NIfTI stem, anything but ``[A-Za-z0-9_.-]`` and runs of dots -> ``_``, bounded length."""
    try:
        return sanitize_id(name)
    except ValueError:
        raise ValueError(f"cannot derive a case id from {name!r}") from None


# ---- validation --------------------------------------------------------------------------------
def _what(source: str) -> str:
    """A label source as reasons name it: ``label`` for the single source, ``<name> label`` otherwise."""
    return "label" if source == "label" else f"{source} label"


def _shape(uri: str, what: str, settings: PrepareSettings) -> tuple[int, ...]:
    try:
        shape = volumes.read_info(uri).shape
    except (ValueError, OSError) as err:
        raise CaseRejected(f"{what}: {err}") from None
    n = math.prod(shape)
    if n > settings.max_voxels:
        raise CaseRejected(f"{what} {uri}: grid {shape} has {n} voxels, over the limit of {settings.max_voxels}")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise CaseRejected(f"{what} {uri}: not a 3D volume (shape {shape})")
    return shape


def _load(uri: str, what: str) -> nifti.Volume:
    try:
        vol = volumes.read_volume(uri)
    except (ValueError, OSError) as err:
        raise CaseRejected(f"{what}: {err}") from None
    if vol.array.ndim == 4 and vol.array.shape[3] == 1:
        vol = nifti.Volume(vol.array[..., 0], vol.affine)
    return vol


def _load_label(uri: str, what: str, image: nifti.Volume, settings: PrepareSettings) -> np.ndarray:
    """A label volume on the image's grid, with an integer dtype."""
    lab = _load(uri, what)
    if lab.array.shape != image.array.shape:
        raise CaseRejected(f"{what} {uri}: shape {lab.array.shape} does not match image shape {image.array.shape}")
    if not np.allclose(image.affine, lab.affine, atol=settings.affine_atol):
        raise CaseRejected(f"{what} {uri}: affine differs from the image's (max diff "
                           f"{np.abs(image.affine - lab.affine).max():.4g} mm)")
    if np.issubdtype(lab.array.dtype, np.floating):
        raise CaseRejected(f"{what} {uri}: float dtype {lab.array.dtype}; label maps must be stored as integers")
    return lab.array


def _structure_files(uri: str, what: str, mapping: SourceMapping | None) -> list[tuple[int, str]] | None:
    """(our id, file) of each volume in a per-structure folder, by the mapping's structure names; None for a
    folder without volume files (a DICOM series)."""
    files = [(volumes.structure_name(u), u) for u in storage.listdir(uri)]
    files = [(name, u) for name, u in files if name is not None]
    if not files:
        return None
    if mapping is None or not mapping.files:
        why = "the source has no label mapping" if mapping is None else f"mapping {mapping.name!r} names no structures"
        raise CaseRejected(f"{what} {uri}: a per-structure folder, but {why} to read its files by name")
    for name, u in files:
        if name not in mapping.files:
            raise CaseRejected(f"{what} {u}: {name!r} is not a structure of mapping {mapping.name!r}")
    return [(mapping.files[name], u) for name, u in files]


def _structure_map(files: list[tuple[int, str]], what: str, image: nifti.Volume, schema: LabelSchema,
                   settings: PrepareSettings) -> np.ndarray:
    """One label map from a per-structure folder's binary masks (several files may share a class)."""
    masks: dict[int, np.ndarray] = {}
    for cid, uri in files:
        mask = _load_label(uri, what, image, settings)
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise CaseRejected(f"{what} {uri}: not a binary mask (values {mask.min()}..{mask.max()}); "
                               "a per-structure folder holds one 0/1 mask per structure")
        masks[cid] = masks[cid] | (mask != 0) if cid in masks else mask != 0
    return schema.union(masks, image.array.shape)


def validate_case(image_uri: str, labels: Mapping[str, str], schema: LabelSchema, settings: PrepareSettings):
    """Read and check one case: an image and its label sources ``{source name: file or per-structure folder}``.

    Each source is mapped to our ids by ``settings.mapping_for(name)``, must lie on the image's grid and
    the sources are merged by the schema's union priority (:meth:`LabelSchema.merge`). Returns
    ``(image float32 HU, label uint8 in our ids, affine)``.
    """
    if not labels:
        raise ValueError(f"image {image_uri}: a case needs at least one label source")
    shape = _shape(image_uri, "image", settings)
    sources = []    # (what, uri, mapping, per-structure files or None)
    for name, uri in labels.items():
        what, mname = _what(name), settings.mapping_for(name)
        mapping = None if mname is None else schema.source(mname)
        files = _structure_files(uri, what, mapping) if storage.isdir(uri) else None
        for f in [uri] if files is None else [u for _, u in files]:
            lshape = _shape(f, what, settings)
            if lshape != shape:
                raise CaseRejected(f"{what} {f}: shape {lshape} does not match image shape {shape}")
        sources.append((what, uri, mapping, files))
    img = _load(image_uri, "image")
    image = np.asarray(img.array, dtype=np.float32)
    if not np.isfinite(image).all():
        raise CaseRejected(f"image {image_uri}: {int((~np.isfinite(image)).sum())} non-finite voxels (NaN/inf)")
    maps = []
    for what, uri, mapping, files in sources:
        if files is not None:
            maps.append(_structure_map(files, what, img, schema, settings))
            continue
        array = _load_label(uri, what, img, settings)
        try:
            maps.append(schema.map_source(array, mapping))
        except ValueError as err:
            raise CaseRejected(f"{what} {uri}: {err}") from None
    label = maps[0] if len(maps) == 1 else schema.merge(maps)
    heart = int(np.isin(label, schema.cardiac_ids).sum())
    if heart < settings.min_heart_voxels:
        where = " + ".join(f"{what} {uri}" for what, uri, _, _ in sources)
        raise CaseRejected(f"{where}: no heart voxels (none of the eight cardiac classes present)")
    sample = image.ravel()[:: max(1, image.size // 1_000_000)]
    lo, hi = float(image.min()), float(image.max())
    p1, p99 = np.percentile(sample, [1, 99])
    if lo < settings.hu_min or hi > settings.hu_max or p99 - p1 < settings.min_hu_spread:
        raise CaseRejected(f"image {image_uri}: implausible HU range [{lo:.1f}, {hi:.1f}] "
                           f"(p1..p99 {p1:.1f}..{p99:.1f}); expected CT in Hounsfield units")
    return image, label, img.affine


def validate_pair(image_uri: str, label_uri: str, schema: LabelSchema, settings: PrepareSettings):
    """:func:`validate_case` of an image and its single label file (source ``label``)."""
    return validate_case(image_uri, {"label": label_uri}, schema, settings)


def load_case(image_uri: str, label_uri: str, schema: LabelSchema, max_voxels: int = 512 * 512 * 1024,
              label_mapping: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A validated image/label pair for readers outside prepare (synthesis templates, CAL data).

    Every check of :func:`validate_pair` with the default limits; returns ``(image (D, H, W) float32
    HU, label (D, H, W) uint8, affine (4, 4))``. Raises :class:`CaseRejected` (a ``ValueError``)
    with a one-line reason naming the file. :func:`fcas.io.nifti.read_nifti` alone only refuses
    what is not a readable NIfTI; this also refuses 2D/4D grids, NaN/inf, float or unknown labels,
    a missing heart and pairs that do not share a grid.
    """
    settings = PrepareSettings(shape=(1, 1, 1), spacing=(1.0, 1.0, 1.0),  # the grid is not used here
                               max_voxels=max_voxels, label_mapping=label_mapping)
    return validate_pair(image_uri, label_uri, schema, settings)


# ---- geometry ----------------------------------------------------------------------------------
def to_preset_grid(image: np.ndarray, label: np.ndarray, affine: np.ndarray, schema: LabelSchema,
                   settings: PrepareSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS orientation, preset spacing, and a crop/pad of the preset shape centred on the heart.

    image: (D, H, W) float HU; label: (D, H, W) uint8 -> the same on ``settings.shape``, plus
    the new affine (4, 4) float64.
    """
    import torch   # here: the settings and the input checks of `prepare` need neither torch nor MONAI
    from monai.data import MetaTensor
    from monai.transforms import BorderPadd, Compose, Orientationd, SpatialCropd, Spacingd

    aff = torch.as_tensor(affine, dtype=torch.float64)
    data = {
        "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image))[None], affine=aff),
        "label": MetaTensor(torch.from_numpy(label.astype(np.int16))[None], affine=aff),
    }
    data = Compose([
        Orientationd(keys=("image", "label"), axcodes="RAS"),
        Spacingd(keys=("image", "label"), pixdim=settings.spacing, mode=("bilinear", "nearest"),
                 padding_mode=("border", "zeros"), dtype=(np.float32, np.float32)),
    ])(data)
    lab = data["label"][0]
    heart = torch.isin(lab.round().to(torch.int16), torch.tensor(schema.cardiac_ids, dtype=torch.int16))
    if not heart.any():  # can vanish only if resampling erased a tiny heart
        raise CaseRejected("no heart voxels left after resampling to the preset spacing")
    idx = heart.nonzero()
    centre = ((idx.min(0).values + idx.max(0).values) // 2).tolist()
    size = settings.shape
    start = [c - s // 2 for c, s in zip(centre, size)]
    dims = lab.shape
    lo = [max(0, -s) for s in start]
    hi = [max(0, s + n - d) for s, n, d in zip(start, size, dims)]
    if any(lo) or any(hi):
        border = [v for pair in zip(lo, hi) for v in pair]
        data = BorderPadd(keys="image", spatial_border=border, mode="constant", value=AIR_HU)(data)
        data = BorderPadd(keys="label", spatial_border=border, mode="constant", value=0)(data)
        start = [s + l for s, l in zip(start, lo)]
    data = SpatialCropd(keys=("image", "label"), roi_start=start, roi_end=[s + n for s, n in zip(start, size)])(data)
    out_affine = np.asarray(data["image"].affine, dtype=np.float64)
    return (data["image"][0].numpy().astype(np.float32),
            data["label"][0].round().numpy().astype(np.uint8),
            out_affine)


def prepare_case(case_id: str, image_uri: str, labels: Mapping[str, str], schema: LabelSchema,
                 settings: PrepareSettings) -> PreparedCase:
    """Validate one case (:func:`validate_case`) and bring it onto the preset grid; raises :class:`CaseRejected`."""
    image, label, affine = validate_case(image_uri, labels, schema, settings)
    image, label, affine = to_preset_grid(image, label, affine, schema, settings)
    return PreparedCase(case_id, image, label, affine, source=image_uri)


def prepare_pair(case_id: str, image_uri: str, label_uri: str, schema: LabelSchema,
                 settings: PrepareSettings) -> PreparedCase:
    """:func:`prepare_case` of an image and its single label file."""
    return prepare_case(case_id, image_uri, {"label": label_uri}, schema, settings)


def prepare_phantom(seed: int, schema: LabelSchema, settings: PrepareSettings) -> PreparedCase:
    """A procedural phantom (``phantom:N`` source), generated directly on the preset grid."""
    from fcas.phantom import make_case

    case = make_case(seed, shape=settings.shape, spacing=settings.spacing)
    return PreparedCase(f"phantom_{seed:05d}", case.image.astype(np.float32), case.label, case.affine,
                        source=f"phantom:{seed}")


# ---- outputs -----------------------------------------------------------------------------------
def class_voxels(label: np.ndarray, schema: LabelSchema) -> dict[str, int]:
    counts = np.bincount(label.ravel(), minlength=256)
    return {name: int(counts[cid]) for name, cid in schema.classes.items() if cid != 0}


def write_case(case: PreparedCase, out: str, schema: LabelSchema) -> dict:
    """Write image (int16 HU) and label (uint8) under ``out/cases/`` and return the manifest row, whose
    ``image_uri`` / ``label_uri`` are relative to ``out`` (``cases/<id>_image.nii.gz``): a copied library reads
    from its new place (:func:`fcas.io.manifest.read_cases`)."""
    # refuses a case id that is not a plain file name (from a caller that skipped safe_case_id)
    image_uri = f"cases/{check_id(case.case_id, 'case id')}_image.nii.gz"
    label_uri = f"cases/{case.case_id}_label.nii.gz"
    nifti.write_nifti(safe_child(out, image_uri), case.image, case.affine, kind="image")
    nifti.write_nifti(safe_child(out, label_uri), case.label, case.affine, kind="label")
    spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(0))
    return {
        "case_id": case.case_id,
        "image_uri": image_uri,
        "label_uri": label_uri,
        "shape": [int(s) for s in case.label.shape],
        "spacing": [float(s) for s in spacing],
        "class_voxels": class_voxels(case.label, schema),
        "split": "",
        "source": case.source,
    }


def assign_splits(case_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Deterministic split per case id: a seeded permutation cut by largest-remainder counts.

    Fractions must be non-negative and sum to 1 (within 1e-6).
    """
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    ids = sorted(case_ids)
    n = len(ids)
    raw = {k: f * n for k, f in fractions.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    order = np.random.default_rng(seed).permutation(n)
    out, pos = {}, 0
    for k in fractions:
        for i in order[pos: pos + counts[k]]:
            out[ids[i]] = k
        pos += counts[k]
    return out
