"""Training cases for TCDM, held in memory: images scaled to [0, 1] and label maps on one grid.

Sources: a prepared ``cases.parquet`` (file, or the folder holding it; rows of the requested split)
or ``phantom:N`` / ``phantom:N@OFFSET`` (N procedural phantoms with seeds OFFSET..OFFSET+N-1,
generated at the preset grid; what tests use). Pair batches take the same random crop window in
both cases of a pair (the volumes share one grid). Hand-written (indexing only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fcas.diffusion.conditioning import hu_to_unit
from fcas.io import storage

__all__ = ["CaseArrays", "load_cases", "crop_slices", "pair_batch"]

_PHANTOM = re.compile(r"phantom:(\d+)(?:@(\d+))?$")


@dataclass
class CaseArrays:
    """``images (N, 1, D, H, W)`` float32 in [0, 1]; ``labels (N, D, H, W)`` uint8; ``case_ids``; ``affines``."""

    case_ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    affines: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape[1:])


def _stack(ids, imgs, labs, affs) -> CaseArrays:
    shapes = {tuple(a.shape) for a in imgs} | {tuple(a.shape) for a in labs}
    if len(shapes) != 1:
        raise ValueError(f"training cases must share one grid; found shapes {sorted(shapes)}")
    images = torch.stack([hu_to_unit(a) for a in imgs]).unsqueeze(1)
    labels = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in labs]))
    return CaseArrays(list(ids), images, labels, list(affs))


def load_cases(
    source: str,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    split: str | None = "train",
) -> CaseArrays:
    """Load cases from ``phantom:N[@OFFSET]`` (needs ``shape``/``spacing``) or a cases.parquet URI."""
    m = _PHANTOM.match(str(source))
    if m:
        from fcas.phantom import make_case

        n, offset = int(m.group(1)), int(m.group(2) or 0)
        if n < 1 or shape is None or spacing is None:
            raise ValueError(f"{source!r}: phantom source needs N >= 1 and the preset shape and spacing")
        cases = [make_case(seed=offset + i, shape=tuple(shape), spacing=tuple(spacing)) for i in range(n)]
        return _stack(
            [f"phantom_{offset + i:05d}" for i in range(n)],
            [c.image for c in cases],
            [c.label for c in cases],
            [np.asarray(c.affine) for c in cases],
        )
    from fcas.io.manifest import read_cases
    from fcas.io.nifti import read_nifti

    uri = str(source)
    if not uri.endswith(".parquet"):
        uri = storage.join(uri, "cases.parquet")
    if not storage.exists(uri):
        raise ValueError(f"data source {source!r}: no cases manifest at {uri} (or use phantom:N)")
    rows = read_cases(uri, schema=None).to_pylist()   # files resolved against the manifest's folder
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise ValueError(f"data source {uri} has no cases in split {split!r}")
    ids, imgs, labs, affs = [], [], [], []
    for r in rows:
        img, lab = read_nifti(r["image_uri"]), read_nifti(r["label_uri"])
        ids.append(r["case_id"])
        imgs.append(img.array)
        labs.append(lab.array)
        affs.append(img.affine)
    return _stack(ids, imgs, labs, affs)


def crop_slices(shape: Sequence[int], crop: Sequence[int] | None, rng: np.random.Generator) -> tuple[slice, ...]:
    """Random window of size ``crop`` inside ``shape``, start aligned to multiples of 4 (latent grid)."""
    if crop is None:
        return tuple(slice(0, s) for s in shape)
    if len(crop) != len(shape) or any(c % 4 or c < 4 for c in crop):
        raise ValueError(f"crop {tuple(crop)} must have {len(shape)} sizes, each a positive multiple of 4")
    out = []
    for s, c in zip(shape, crop):
        c = min(c, s)
        start = 4 * int(rng.integers(0, (s - c) // 4 + 1))
        out.append(slice(start, start + c))
    return tuple(out)


def pair_batch(
    cases: CaseArrays, pairs: np.ndarray, crop: Sequence[int] | None, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Batch for pairs ``(P, 2)``: ``image_a/image_b (P, 1, d, h, w)``, ``label_a/label_b (P, d, h, w)``.

    Each pair gets its own crop window, shared by its two cases.
    """
    out: dict[str, list] = {"image_a": [], "label_a": [], "image_b": [], "label_b": []}
    for a, b in pairs:
        sl = crop_slices(cases.shape, crop, rng)
        for key, idx in (("a", a), ("b", b)):
            out[f"image_{key}"].append(cases.images[idx][(slice(None), *sl)])
            out[f"label_{key}"].append(cases.labels[idx][sl])
    return {k: torch.stack(v) for k, v in out.items()}
