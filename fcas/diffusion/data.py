"""Training cases of TCDM and the VAE: images scaled to [0, 1] and label maps on one grid.

Sources: a prepared ``cases.parquet`` (file, or the folder holding it; rows of the requested split)
or ``phantom:N`` / ``phantom:N@OFFSET`` (N procedural phantoms with seeds OFFSET..OFFSET+N-1,
generated at the preset grid; what tests use). ``phantom:N[@OFFSET]/K``: the phantoms come in sites of
K consecutive seeds (site ``seed // K``, :mod:`fcas.phantom.sites`) that share HU table and
surroundings as the scans of one hospital do; a cases.parquet names sites in an optional ``site``
column. Each case carries its site (``CaseArrays.sites``; "" for none), and TCDM pairs are drawn
within a site where the cases name one (:func:`fcas.diffusion.pairs.sample_pairs`). Pair batches take the same random crop window in
both cases of a pair (the volumes share one grid). Hand-written (indexing only).

Two ways to feed a training loop:

* in memory (:func:`load_cases`): every case at once, float32 -- the Ray-free loops of tests and
  benchmarks; memory grows with the number of cases.
* streamed (:func:`case_rows` -> :func:`load_case_batch` -> :class:`CaseBuffer`): the Ray Train jobs
  hand the rows (a few bytes per case) to Ray Data, which loads the volumes in small tasks; each
  worker keeps a bounded buffer of ``K = train.buffer_cases`` cases. Every ``train.refill_every``-th
  step one buffer slot, drawn from ``rng([seed, step, rank, 1])``, is replaced by the next case of the
  worker's shard, and the step's pairs (TCDM) or crops (VAE) are drawn uniformly from the buffer with
  ``rng([seed, step, rank])``. Memory is ``K`` cases whatever ``N``. A single worker whose buffer holds
  all ``N`` cases is never refilled (the job sets ``refill_every=0``): a pull through Ray Data costs more
  than a step on a small machine and would bring no new case. The first fill is stored in case-id order,
  whatever order the stream delivered it in (Ray Data's parallel tasks finish in any order), so such a
  run repeats itself draw for draw; refilled slots take whatever the stream gives next.

How the N^2 pairing survives the buffer: the stream's block order (one case per block) is reshuffled
every epoch (``randomize_block_order`` with ``RandomSeedConfig(seed, reseed_after_execution=True)``),
and because the evicted slot is random, a case stays in the buffer ``j`` more steps with probability
``(1 - 1/K)^j > 0``. So any two cases A, B of a shard are in the buffer together with non-zero
probability in every epoch (even with a fixed order), and then ``(A, B)`` and ``(B, A)`` are each drawn
with probability ``1 / (K (K - 1))`` per pair; with the shards re-split each epoch, every ordered pair
of the N cases has non-zero probability. Pairs are local to a buffer, so nearby cases in the stream
pair more often than far ones; the per-epoch reshuffle evens that out over epochs.

With a latent cache (``train.latent_cache``, :mod:`fcas.diffusion.latent_cache`) each case also carries
``latent (C, D/4, H/4, W/4)``, the frozen VAE's posterior mean, and :func:`pair_batch` crops it at the
image window divided by the VAE's downsampling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from fcas.diffusion.conditioning import hu_to_unit
from fcas.io import storage

__all__ = ["CaseArrays", "load_cases", "case_rows", "load_raw_case", "load_case_batch", "CaseBuffer", "crop_slices",
           "pair_batch"]

_PHANTOM = re.compile(r"phantom:(\d+)(?:@(\d+))?(?:/(\d+))?(?::([a-z]+))?$")   # phantom:N[@OFFSET][/SITE][:DOMAIN]


def parse_phantom_source(source: str) -> tuple[int, int, int | None, str] | None:
    """``phantom:N[@OFFSET][/SITE][:DOMAIN]`` -> ``(N, OFFSET, SITE or None, DOMAIN)``; None for any other
    source. Raises ValueError naming the source for N < 1, a site size < 1 or an unknown domain."""
    m = _PHANTOM.match(str(source))
    if not m:
        return None
    from fcas.phantom import DOMAINS

    n, offset = int(m.group(1)), int(m.group(2) or 0)
    site = None if m.group(3) is None else int(m.group(3))
    domain = m.group(4) or "standard"
    if n < 1:
        raise ValueError(f"{source!r}: phantom source needs N >= 1")
    if site is not None and site < 1:
        raise ValueError(f"{source!r}: phantom sites need at least 1 case each (/K with K >= 1)")
    if domain not in DOMAINS:
        raise ValueError(f"{source!r}: unknown phantom domain {domain!r}; known: {', '.join(DOMAINS)}")
    return n, offset, site, domain


def phantom_site(seed: int, site_size: int | None) -> int:
    """The site id of phantom ``seed`` for sites of ``site_size`` consecutive seeds; -1 without sites."""
    from fcas.phantom.sites import site_of

    return -1 if site_size is None else site_of(seed, site_size)


def site_name(site_id: int) -> str:
    """The ``site`` string a phantom site id gets in case rows and :class:`CaseArrays` ("" for -1)."""
    return "" if int(site_id) < 0 else f"phantom_site_{int(site_id):04d}"


@dataclass
class CaseArrays:
    """``images (N, 1, D, H, W)`` float32 in [0, 1]; ``labels (N, D, H, W)`` uint8; ``case_ids``; ``affines``;
    ``latents (N, C, D/4, H/4, W/4)`` float32 unscaled VAE posterior means (from a latent cache) or None;
    ``sites``: each case's site ("" for none; None: no case names one)."""

    case_ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    affines: list[np.ndarray]
    latents: torch.Tensor | None = None
    sites: list[str] | None = None

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape[1:])


def _stack(ids, imgs, labs, affs, sites=None) -> CaseArrays:
    shapes = {tuple(a.shape) for a in imgs} | {tuple(a.shape) for a in labs}
    if len(shapes) != 1:
        raise ValueError(f"training cases must share one grid; found shapes {sorted(shapes)}")
    images = torch.stack([hu_to_unit(a) for a in imgs]).unsqueeze(1)
    labels = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in labs]))
    sites = [str(x) for x in sites] if sites is not None and any(sites) else None
    return CaseArrays(list(ids), images, labels, list(affs), sites=sites)


def load_cases(
    source: str,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    split: str | None = "train",
) -> CaseArrays:
    """Load cases from ``phantom:N[@OFFSET][/SITE][:DOMAIN]`` (needs ``shape``/``spacing``; DOMAIN one of
    :data:`fcas.phantom.DOMAINS`, default standard) or a cases.parquet URI."""
    parsed = parse_phantom_source(source)
    if parsed:
        from fcas.phantom import make_case

        n, offset, site_size, domain = parsed
        if shape is None or spacing is None:
            raise ValueError(f"{source!r}: phantom source needs the preset shape and spacing")
        seeds = range(offset, offset + n)
        sites = [phantom_site(s, site_size) for s in seeds]
        cases = [make_case(seed=s, shape=tuple(shape), spacing=tuple(spacing), domain=domain,
                           site=None if k < 0 else k) for s, k in zip(seeds, sites)]
        return _stack(
            [f"phantom_{s:05d}" for s in seeds],
            [c.image for c in cases],
            [c.label for c in cases],
            [np.asarray(c.affine) for c in cases],
            [site_name(k) for k in sites],
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
    return _stack(ids, imgs, labs, affs, [str(r.get("site") or "") for r in rows])


def case_rows(source: str, split: str | None = "train") -> list[dict]:
    """What a stream needs to load each case, without loading any: ``case_id``, ``site`` ("" for none),
    and either ``phantom_seed`` / ``phantom_site`` (``phantom:N[@OFFSET][/SITE]``; site -1 for none) or
    ``image_uri`` / ``label_uri`` (a cases.parquet, only its rows of ``split``)."""
    parsed = parse_phantom_source(source)
    if parsed:
        n, offset, site_size, domain = parsed
        if domain != "standard":
            raise ValueError(f"{source!r}: the streamed training jobs read standard phantoms only")
        rows = []
        for s in range(offset, offset + n):
            k = phantom_site(s, site_size)
            rows.append({"case_id": f"phantom_{s:05d}", "phantom_seed": s, "phantom_site": k, "site": site_name(k),
                         "image_uri": "", "label_uri": ""})
        return rows
    from fcas.io.manifest import read_cases

    uri = str(source) if str(source).endswith(".parquet") else storage.join(str(source), "cases.parquet")
    if not storage.exists(uri):
        raise ValueError(f"data source {source!r}: no cases manifest at {uri} (or use phantom:N)")
    rows = [r for r in read_cases(uri, schema=None).to_pylist() if split is None or r.get("split") == split]
    if not rows:
        raise ValueError(f"data source {uri} has no cases in split {split!r}")
    return [{"case_id": r["case_id"], "phantom_seed": -1, "phantom_site": -1, "site": str(r.get("site") or ""),
             "image_uri": r["image_uri"], "label_uri": r["label_uri"]} for r in rows]


def load_raw_case(phantom_seed: int, image_uri: str, label_uri: str, shape: Sequence[int],
                  spacing: Sequence[float], phantom_site: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """One row of :func:`case_rows` -> ``(image (D, H, W) HU as stored, label (D, H, W))``: the phantom of
    ``phantom_seed`` (>= 0; of site ``phantom_site`` when >= 0) at the preset grid, else the two NIfTI files."""
    if int(phantom_seed) >= 0:
        from fcas.phantom import make_case

        c = make_case(seed=int(phantom_seed), shape=tuple(shape), spacing=tuple(spacing),
                      site=None if int(phantom_site) < 0 else int(phantom_site))
        return c.image, c.label
    from fcas.io.nifti import read_nifti

    return read_nifti(str(image_uri)).array, read_nifti(str(label_uri)).array


def load_case_batch(batch, shape: Sequence[int], spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """Rows of :func:`case_rows` (columns of ``(B,)``) -> ``case_id (B,)``, ``image (B, 1, D, H, W)`` float32 in
    [0, 1], ``label (B, D, H, W)`` uint8 (the Ray Data map of the streamed training jobs)."""
    imgs, labs = [], []
    n = len(batch["case_id"])
    site_ids = batch["phantom_site"] if "phantom_site" in batch else [-1] * n
    for seed, img_uri, lab_uri, k in zip(batch["phantom_seed"], batch["image_uri"], batch["label_uri"], site_ids):
        img, lab = load_raw_case(int(seed), str(img_uri), str(lab_uri), shape, spacing, int(k))
        imgs.append(img)
        labs.append(lab)
    cases = _stack([str(i) for i in batch["case_id"]], imgs, labs, [np.eye(4)] * len(imgs))
    sites = [str(x) for x in batch["site"]] if "site" in batch else [""] * n
    return {"case_id": np.asarray(cases.case_ids), "image": cases.images.numpy(), "label": cases.labels.numpy(),
            "site": np.asarray(sites)}


class CaseBuffer:
    """At most ``size`` cases of a stream of ``{"case_id", "image", "label"}`` dicts (one case each; with a
    ``"latent"`` too when the stream comes from a latent cache), as a :class:`CaseArrays` (``.cases``) whose
    slots :meth:`refill` replaces one at a time (see the module docstring)."""

    def __init__(self, stream: Iterator[Mapping[str, Any]], size: int):
        if size < 1:
            raise ValueError(f"the case buffer needs >= 1 slot (train.buffer_cases), got {size}")
        self.stream = stream
        # slots in case-id order, not arrival order: Ray Data does not keep the order of its parallel tasks,
        # so a buffer that holds every case of its shard (one worker, no refills) trains the same way each run
        first = sorted((self._next() for _ in range(size)), key=lambda c: str(c["case_id"]))
        shapes = {tuple(np.shape(c["label"])) for c in first}
        if len(shapes) != 1:
            raise ValueError(f"training cases must share one grid; found shapes {sorted(shapes)}")
        self.cases = CaseArrays([str(c["case_id"]) for c in first],
                                torch.stack([torch.tensor(np.asarray(c["image"], dtype=np.float32)) for c in first]),
                                torch.stack([torch.tensor(np.asarray(c["label"], dtype=np.uint8)) for c in first]),
                                [np.eye(4)] * size)
        sites = [str(c.get("site", "")) for c in first]
        self.cases.sites = sites if any(sites) else None
        if "latent" in first[0]:
            self.cases.latents = torch.stack([torch.tensor(np.asarray(c["latent"], dtype=np.float32)) for c in first])

    def _next(self) -> dict:
        try:
            return next(self.stream)
        except StopIteration:
            raise ValueError("the training data stream ended (it should cycle epochs)") from None

    def refill(self, rng: np.random.Generator) -> int:
        """Replace a slot drawn from ``rng`` by the stream's next case; returns the slot."""
        slot = int(rng.integers(0, len(self.cases)))
        c = self._next()
        self.cases.images[slot] = torch.as_tensor(np.array(c["image"], dtype=np.float32))
        self.cases.labels[slot] = torch.as_tensor(np.array(c["label"], dtype=np.uint8))
        if self.cases.latents is not None:
            self.cases.latents[slot] = torch.as_tensor(np.array(c["latent"], dtype=np.float32))
        self.cases.case_ids[slot] = str(c["case_id"])
        site = str(c.get("site", ""))
        if site and self.cases.sites is None:
            self.cases.sites = [""] * len(self.cases)
        if self.cases.sites is not None:
            self.cases.sites[slot] = site
        return slot


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
    """Batch for pairs ``(P, 2)``: ``image_a/image_b (P, 1, d, h, w)``, ``label_a/label_b (P, d, h, w)``; with
    ``cases.latents`` also ``latent_a/latent_b (P, C, d/4, h/4, w/4)``, the latents at the same window.

    Each pair gets its own crop window, shared by its two cases (the draws do not depend on the latents).
    """
    keys = ("image", "label") + (("latent",) if cases.latents is not None else ())
    out: dict[str, list] = {f"{k}_{x}": [] for k in keys for x in "ab"}
    down = None
    if cases.latents is not None:
        down = [s // z for s, z in zip(cases.shape, cases.latents.shape[2:])]
        if any(d < 1 or s != d * z for s, d, z in zip(cases.shape, down, cases.latents.shape[2:])):
            raise ValueError(f"latents {tuple(cases.latents.shape[2:])} do not divide the image grid {cases.shape}")
    for a, b in pairs:
        sl = crop_slices(cases.shape, crop, rng)
        for key, idx in (("a", a), ("b", b)):
            out[f"image_{key}"].append(cases.images[idx][(slice(None), *sl)])
            out[f"label_{key}"].append(cases.labels[idx][sl])
            if down is not None:
                zsl = tuple(slice(s.start // d, s.stop // d) for s, d in zip(sl, down))
                out[f"latent_{key}"].append(cases.latents[idx][(slice(None), *zsl)])
    return {k: torch.stack(v) for k, v in out.items()}
