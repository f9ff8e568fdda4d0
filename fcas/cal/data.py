"""Training data of the CAL experiments: synthetic (image, mask, CM) samples and the labelled fine-tune set.

* Synthetic samples come from a synthesis run's manifest (:func:`fcas.synthesis.outputs.read_run_manifest`):
  one row per sample with ``image_uri`` (int16 HU), ``label_uri`` (uint8) and ``confidence_uri``
  ([0, 1]). :func:`load_synthetic_batch` turns manifest rows into arrays (the Ray Data map of
  :mod:`fcas.pipeline.pretrain_cal`); :func:`local_synthetic_batches` is the Ray-free reader with a
  deterministic order (used without Ray, and in tests).
* The fine-tune set is small and held in memory: a prepared ``cases.parquet`` (one split) or
  ``phantom:N[@OFFSET]``, with ``CM = 1``.

Labels are reduced to the net's classes: the schema's cardiac ids become ``1..K`` (``K = 8``; the
cardiac schema's ids 1..8 map to themselves) and every other id (lung, bone, soft tissue) becomes
background 0. Images are scaled HU -> [0, 1] (:func:`fcas.diffusion.conditioning.hu_to_unit`).
Augmentation uses MONAI dictionary transforms on tensors, seeded per sample. Hand-written glue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from fcas.diffusion.conditioning import hu_to_unit
from fcas.io.nifti import read_nifti
from fcas.labels import LabelSchema, load_schema
from fcas.settings import build

__all__ = [
    "SYN_COLUMNS",
    "class_lut",
    "num_classes",
    "synthetic_rows",
    "load_sample",
    "load_synthetic_batch",
    "local_synthetic_batches",
    "FinetuneSet",
    "load_finetune_set",
    "AugmentConfig",
    "build_augment",
    "augment_batch",
]

SYN_COLUMNS = ("sample_id", "image_uri", "label_uri", "confidence_uri")


def _schema(schema: str | LabelSchema) -> LabelSchema:
    return schema if isinstance(schema, LabelSchema) else load_schema(schema)


def class_lut(schema: str | LabelSchema = "cardiac") -> np.ndarray:
    """``(max_id + 1,)`` uint8 look-up table: cardiac id -> 1..K in schema order, anything else -> 0."""
    s = _schema(schema)
    lut = np.zeros(s.max_id + 1, dtype=np.uint8)
    for k, cid in enumerate(s.cardiac_ids, start=1):
        lut[cid] = k
    return lut


def num_classes(schema: str | LabelSchema = "cardiac") -> int:
    """Background + the schema's cardiac classes (9 for the cardiac schema)."""
    return 1 + len(_schema(schema).cardiac_ids)


def to_classes(label: np.ndarray, lut: np.ndarray, uri: str = "label") -> np.ndarray:
    """Label map (schema ids) -> net classes via ``lut``; ``ValueError`` naming ``uri`` on unknown ids."""
    a = np.asarray(label)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{uri}: label map holds non-integer values (dtype {a.dtype})")
        a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= len(lut):
        raise ValueError(f"{uri}: label ids in [{lo}, {hi}] outside the schema's 0..{len(lut) - 1}")
    return lut[a]


def synthetic_rows(run: str) -> pa.Table:
    """The run's manifest (duplicates dropped, URIs resolved against ``run``: a copied run trains where it is),
    only the columns training needs; ``ValueError`` if empty."""
    from fcas.synthesis.outputs import read_run_manifest

    table = read_run_manifest(run)
    if table.num_rows == 0:
        raise ValueError(f"synthesis run {run!r} has no manifest rows (no finished samples under {run}/manifest)")
    return table.select(list(SYN_COLUMNS))


def load_sample(image_uri: str, label_uri: str, confidence_uri: str | None = None,
                lut: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One sample's arrays: ``image (1, D, H, W)`` float32 in [0, 1], ``label (1, D, H, W)`` uint8 net
    classes, ``cm (1, D, H, W)`` float32 in [0, 1] (ones when ``confidence_uri`` is None).

    A damaged file raises ``NiftiError``/``ValueError`` whose one-line message names it.
    """
    lut = class_lut() if lut is None else lut
    img = read_nifti(image_uri)
    lab = read_nifti(label_uri)
    if img.shape != lab.shape or img.array.ndim != 3:
        raise ValueError(f"{label_uri}: shape {lab.shape} does not match image {image_uri} {img.shape} (3D expected)")
    image = hu_to_unit(img.array).numpy()[None]
    label = to_classes(lab.array, lut, label_uri).astype(np.uint8)[None]
    if confidence_uri is None:
        cm = np.ones_like(image)
    else:
        c = read_nifti(confidence_uri).array
        if c.shape != img.shape:
            raise ValueError(f"{confidence_uri}: shape {c.shape} does not match image {image_uri} {img.shape}")
        c = np.asarray(c, dtype=np.float32)
        if not np.all(np.isfinite(c)) or c.min() < 0.0 or c.max() > 1.0:
            raise ValueError(f"{confidence_uri}: confidence must be finite and in [0, 1], got "
                             f"[{np.nanmin(c):.3g}, {np.nanmax(c):.3g}]")
        cm = c[None]
    return {"image": image, "label": label, "cm": cm}


def load_synthetic_batch(batch: Mapping[str, Any], schema: str = "cardiac") -> dict[str, np.ndarray]:
    """Manifest rows (columns :data:`SYN_COLUMNS`, ``(B,)`` each) -> ``sample_id (B,)``,
    ``image (B, 1, D, H, W)`` float32, ``label (B, 1, D, H, W)`` uint8, ``cm (B, 1, D, H, W)`` float32."""
    lut = class_lut(schema)
    ids = np.asarray(batch["sample_id"], dtype=np.int64)
    samples = [load_sample(str(i), str(l), str(c), lut)
               for i, l, c in zip(batch["image_uri"], batch["label_uri"], batch["confidence_uri"])]
    shapes = {s["image"].shape for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"synthetic samples {ids.tolist()} have different grids {sorted(shapes)}")
    return {"sample_id": ids, **{k: np.stack([s[k] for s in samples]) for k in ("image", "label", "cm")}}


def local_synthetic_batches(rows: pa.Table, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                            world_size: int = 1, schema: str = "cardiac") -> Iterator[dict[str, np.ndarray]]:
    """Ray-free reader: batches for steps ``start_step + 1, ...`` in a deterministic order.

    Global position ``p = ((step - 1) * world_size + rank) * batch_size + j`` reads sample
    ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation from ``rng([seed, e])``, so a
    resumed run reads exactly what an uninterrupted one would.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = rows.num_rows
    if n == 0:
        raise ValueError("no synthetic samples to read")
    cols = {c: rows.column(c).to_pylist() for c in SYN_COLUMNS}
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        step += 1
        idx = []
        for j in range(batch_size):
            p = ((step - 1) * world_size + rank) * batch_size + j
            e = p // n
            if e not in perms:
                perms = {e: np.random.default_rng([seed, e]).permutation(n)}
            idx.append(int(perms[e][p % n]))
        yield load_synthetic_batch({c: [cols[c][i] for i in idx] for c in SYN_COLUMNS}, schema)


@dataclass
class FinetuneSet:
    """``image (N, 1, D, H, W)`` float32 in [0, 1]; ``label (N, 1, D, H, W)`` uint8 net classes; ``case_ids``."""

    case_ids: list[str]
    image: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.case_ids)

    def batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A random batch (with replacement across steps, without inside one batch when possible)."""
        idx = rng.choice(len(self), size=batch_size, replace=batch_size > len(self))
        idx_t = torch.as_tensor(idx)
        return {"image": self.image[idx_t], "label": self.label[idx_t],
                "cm": torch.ones_like(self.image[idx_t])}


def load_finetune_set(source: str, shape: Sequence[int], spacing: Sequence[float], split: str | None = "train",
                      schema: str = "cardiac") -> FinetuneSet:
    """``phantom:N[@OFFSET]`` (generated at ``shape``/``spacing``) or a prepared cases.parquet (rows of ``split``;
    None = all rows) -> :class:`FinetuneSet` with labels reduced to the net classes."""
    from fcas.diffusion.data import load_cases

    cases = load_cases(source, shape, spacing, split=split)
    lut = class_lut(schema)
    label = torch.from_numpy(to_classes(cases.labels.numpy(), lut, str(source)).astype(np.uint8)).unsqueeze(1)
    return FinetuneSet(list(cases.case_ids), cases.images.float(), label)


# ---- augmentation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """MONAI dictionary transforms on ``image``/``label``/``cm``; probabilities per sample."""

    enabled: bool = True
    flip_prob: float = 0.0          # per axis. Off: a mirrored heart swaps the left/right classes (LA/RA,
                                    # LV/RV, aorta/PA), and nets trained with flips of all axes reached
                                    # held-out Dice 0.19 where the same 300-750 steps without reach 0.60-0.88
    affine_prob: float = 0.3
    rotate_deg: float = 10.0        # +- per axis
    scale: float = 0.1              # +- relative
    intensity_prob: float = 0.3     # scale and shift of the [0, 1] image
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    noise_prob: float = 0.1
    noise_std: float = 0.01

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "AugmentConfig":
        return build(cls, d)


def build_augment(cfg: AugmentConfig):
    """``monai.transforms.Compose`` over ``{"image", "label", "cm"}`` ``(C, D, H, W)`` tensors (label as float)."""
    import math

    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised, RandScaleIntensityd,
                                  RandShiftIntensityd)

    keys = ("image", "label", "cm")
    r = math.radians(cfg.rotate_deg)
    return Compose([
        *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=a) for a in range(3)],
        RandAffined(keys, prob=cfg.affine_prob, rotate_range=(r, r, r), scale_range=(cfg.scale,) * 3,
                    mode=("bilinear", "nearest", "bilinear"), padding_mode="border"),
        RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob),
        RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
        RandGaussianNoised("image", prob=cfg.noise_prob, std=cfg.noise_std),
    ])


def augment_batch(batch: Mapping[str, torch.Tensor], transform, seed: Sequence[int]) -> dict[str, torch.Tensor]:
    """Augment each sample of ``{"image", "label", "cm"}`` ``(B, 1, D, H, W)``; sample ``j`` is seeded by
    ``rng([*seed, j])``. ``transform=None`` returns the batch unchanged (as tensors)."""
    image = torch.as_tensor(batch["image"]).float()
    label = torch.as_tensor(batch["label"])
    cm = torch.as_tensor(batch["cm"]).float()
    if transform is None:
        return {"image": image, "label": label.long(), "cm": cm}
    out = {"image": [], "label": [], "cm": []}
    for j in range(image.shape[0]):
        transform.set_random_state(seed=int(np.random.default_rng([*map(int, seed), j]).integers(0, 2**31 - 1)))
        d = transform({"image": image[j], "label": label[j].float(), "cm": cm[j]})
        for k in out:
            v = d[k]
            out[k].append(v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v))
    return {"image": torch.stack(out["image"]).float(),
            "label": torch.stack(out["label"]).round().long(),
            "cm": torch.stack(out["cm"]).float().clamp(0.0, 1.0)}
