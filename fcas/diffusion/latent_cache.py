"""The latent cache of TCDM training, as MAISI trains its diffusion model: every case encoded once by the
frozen VAE, the diffusion model then trained on the stored latents instead of encoding at every step.
Written by ``jobs/cache_latents.py`` (:mod:`fcas.pipeline.cache_latents`), read with
``train.latent_cache=<uri>`` (:mod:`fcas.training.tcdm`, :mod:`fcas.pipeline.train_tcdm`).

A cache folder holds::

    latents.parquet       one row per case (:data:`LATENTS_SCHEMA`): case_id, uri (its shard, relative to the
                          folder), latent_shape (C, d, h, w), image_shape (D, H, W), spacing, vae_digest, source
    shards/<16 hex>.npz   up to ``shard_cases`` cases, three members each: ``<case_id>/latent`` (C, D/4, H/4, W/4)
                          float32, the VAE's posterior mean WITHOUT the scale factor; ``<case_id>/image`` (D, H, W),
                          the HU clipped to [-1000, 1000] (int16 for prepared cases and phantoms); ``<case_id>/label``
                          (D, H, W) uint8
    cache_summary.json

The same latent as on the fly: training encodes with :func:`fcas.models.vae.vae_encode` (the posterior
mean, never a sample), one case at a time, and multiplies by the run's scale factor; the cache stores
``z_mu`` of the same one-case encode and training multiplies it by the same factor, so a run on whole
volumes (no ``train.crop``) sees the same latents either way. With ``train.crop`` the latent is cropped
at crop / 4 (MAISI's way), which differs from encoding the image crop near the crop's border (the
encoder's receptive field). The scale factor of a run without one (a random VAE, no checkpoint) is
``1 / std`` of the first cases' cached latents (:func:`fcas.models.vae.latent_scale_factor`). The image
is read through :func:`fcas.diffusion.conditioning.hu_to_unit`, as the on-the-fly loaders do.

Staleness: the manifest records the digest of the VAE (:func:`fcas.models.bundle.vae_digest`);
:func:`check_latent_cache` refuses a cache made with another VAE, one lacking cases of the training data
or one at another grid, before any training work. Cases are known by their ids only: a cases.parquet
rewritten with other images under the same ids needs a new cache. Shards are written whole under a
temporary name and renamed (:func:`fcas.io.storage.atomic_write_bytes`) and the manifest last, so a
folder without it is an unfinished cache. Hand-written: the layout and the checks; the shards are
NumPy ``.npz`` files (read member by member through fsspec), the manifest pyarrow's Parquet.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fcas.diffusion.conditioning import HU_MAX, HU_MIN, hu_to_unit
from fcas.diffusion.data import CaseArrays, load_raw_case
from fcas.io import manifest, storage

__all__ = ["LATENTS_SCHEMA", "MANIFEST", "SUMMARY", "cache_manifest_uri", "shard_name", "shard_bytes",
           "encode_latent", "load_raw_batch", "read_latent_cache", "check_latent_cache", "read_cached_case",
           "load_cached_batch", "load_cached_cases"]

MANIFEST = "latents.parquet"
SUMMARY = "cache_summary.json"

LATENTS_SCHEMA = manifest.make_schema(
    "latent_cache",
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),             # the shard, relative to the cache folder
        pa.field("latent_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("image_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("spacing", pa.list_(pa.float64()), nullable=False),
        pa.field("vae_digest", pa.string(), nullable=False),
        pa.field("source", pa.string()),                          # phantom:<seed> or the case's image file
    ],
)
manifest.SCHEMAS["latent_cache"] = LATENTS_SCHEMA


def cache_manifest_uri(uri: str) -> str:
    """The manifest of the cache ``uri``: the folder's ``latents.parquet``, or ``uri`` itself when it is one."""
    uri = os.fspath(uri)
    return uri if uri.endswith(".parquet") else storage.join(uri, MANIFEST)


def shard_name(vae_digest: str, case_ids: Sequence[str]) -> str:
    """``shards/<16 hex>.npz``, named by the VAE and the cases it holds (a rerun of the same batch overwrites)."""
    key = "\n".join([vae_digest, *case_ids]).encode()
    return f"shards/{hashlib.sha256(key).hexdigest()[:16]}.npz"


def shard_bytes(case_ids: Sequence[str], latents: Sequence[np.ndarray], images: Sequence[np.ndarray],
                labels: Sequence[np.ndarray]) -> bytes:
    """One shard (uncompressed ``.npz``): ``<case_id>/latent`` ``(C, d, h, w)`` float32, ``<case_id>/image``
    ``(D, H, W)`` HU, ``<case_id>/label`` ``(D, H, W)`` uint8 per case."""
    arrays: dict[str, np.ndarray] = {}
    for cid, z, img, lab in zip(case_ids, latents, images, labels, strict=True):
        arrays[f"{cid}/latent"] = np.asarray(z, dtype=np.float32)
        arrays[f"{cid}/image"] = np.asarray(img)
        arrays[f"{cid}/label"] = np.asarray(lab, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@torch.no_grad()
def encode_latent(vae: nn.Module, image_hu: np.ndarray, device: torch.device | str = "cpu",
                  window: Sequence[int] | None = None) -> np.ndarray:
    """``(D, H, W)`` HU -> the unscaled posterior mean ``(C, D/4, H/4, W/4)`` float32 of the one-case encode
    training does (``window``: MONAI sliding windows of that many image voxels instead, for large volumes)."""
    from fcas.models.vae import sliding_window_encode, vae_encode

    x = hu_to_unit(np.array(image_hu))[None, None].to(device)   # a copy: Ray hands read-only arrays
    z = sliding_window_encode(vae, x, window) if window is not None else vae_encode(vae, x)
    return z[0].float().cpu().numpy()


def load_raw_batch(batch, shape: Sequence[int], spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """Rows of :func:`fcas.diffusion.data.case_rows` -> ``case_id (B,)``, ``image (B, D, H, W)`` HU clipped to
    [-1000, 1000] (int16 when the source stores integers, else float32), ``label (B, D, H, W)`` uint8,
    ``source (B,)`` (the load stage of ``jobs/cache_latents.py``)."""
    imgs, labs, sources = [], [], []
    site_ids = batch["phantom_site"] if "phantom_site" in batch else [-1] * len(batch["case_id"])
    for seed, img_uri, lab_uri, k in zip(batch["phantom_seed"], batch["image_uri"], batch["label_uri"], site_ids):
        img, lab = load_raw_case(int(seed), str(img_uri), str(lab_uri), shape, spacing, int(k))
        img = np.asarray(img)
        dtype = np.int16 if np.issubdtype(img.dtype, np.integer) else np.float32
        imgs.append(np.clip(img, HU_MIN, HU_MAX).astype(dtype))
        labs.append(np.asarray(lab, dtype=np.uint8))
        sources.append(f"phantom:{int(seed)}" if int(seed) >= 0 else str(img_uri))
    shapes = {a.shape for a in imgs} | {a.shape for a in labs}
    if len(shapes) != 1:
        raise ValueError(f"cases of one batch must share one grid; found shapes {sorted(shapes)}")
    return {"case_id": np.asarray([str(i) for i in batch["case_id"]]), "image": np.stack(imgs),
            "label": np.stack(labs), "source": np.asarray(sources)}


def read_latent_cache(uri: str) -> pa.Table:
    """The cache manifest of ``uri`` (folder or its ``latents.parquet``), shard URIs made absolute."""
    man = cache_manifest_uri(uri)
    if not storage.exists(man):
        raise ValueError(f"latent cache {uri}: no {posixpath.basename(man)} (not a finished jobs/cache_latents.py "
                         f"output)")
    table = manifest.read_table(man, LATENTS_SCHEMA)
    return manifest.resolve_uris(table, posixpath.dirname(storage.absolute(man)), ["uri"])


def check_latent_cache(uri: str, vae_digest: str, case_ids: Sequence[str] | None = None,
                       shape: Sequence[int] | None = None, spacing: Sequence[float] | None = None) -> list[dict]:
    """The manifest rows of the cases ``case_ids`` (in that order; None: every row), or ``ValueError`` (one
    line) when the cache was made with another VAE than ``vae_digest``, lacks one of the cases, or holds cases
    at another image grid than ``shape`` / ``spacing`` (when given)."""
    rows = read_latent_cache(uri).to_pylist()
    if not rows:
        raise ValueError(f"latent cache {uri} holds no cases")
    digests = sorted({r["vae_digest"] for r in rows})
    if digests != [vae_digest]:
        raise ValueError(f"latent cache {uri} was made with VAE {', '.join(digests)}, but training uses VAE "
                         f"{vae_digest}: rebuild it (jobs/cache_latents.py with this vae=) or train with that VAE")
    if case_ids is not None:
        by_id = {r["case_id"]: r for r in rows}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise ValueError(f"latent cache {uri} lacks {len(missing)} of the {len(case_ids)} training cases "
                             f"(e.g. {', '.join(missing[:3])}): rebuild it with the training data=")
        rows = [by_id[c] for c in case_ids]
    for r in rows:
        if shape is not None and tuple(r["image_shape"]) != tuple(int(s) for s in shape):
            raise ValueError(f"latent cache {uri}: case {r['case_id']} is on the grid {tuple(r['image_shape'])}, "
                             f"training expects {tuple(shape)} (a cache of another preset?)")
        if spacing is not None and not np.allclose(r["spacing"], spacing, rtol=1e-4):
            raise ValueError(f"latent cache {uri}: case {r['case_id']} is at spacing {tuple(r['spacing'])} mm, "
                             f"training expects {tuple(spacing)} (a cache of another preset?)")
        if [s * 4 for s in r["latent_shape"][1:]] != list(r["image_shape"]):
            raise ValueError(f"latent cache {uri}: case {r['case_id']} has latents {tuple(r['latent_shape'])} "
                             f"for the image grid {tuple(r['image_shape'])} (not 1/4 per axis)")
    return rows


def read_cached_case(uri: str, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(latent (C, d, h, w) float32, image (D, H, W) HU, label (D, H, W) uint8)`` of one case of the shard ``uri``
    (only its three members are read)."""
    with storage.open_file(uri, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
        try:
            return npz[f"{case_id}/latent"], npz[f"{case_id}/image"], npz[f"{case_id}/label"]
        except KeyError:
            raise ValueError(f"latent cache shard {uri} has no case {case_id!r}") from None


def load_cached_batch(batch) -> dict[str, np.ndarray]:
    """Manifest rows (``case_id``, absolute ``uri`` columns of ``(B,)``) -> ``case_id (B,)``, ``image (B, 1, D, H, W)``
    float32 in [0, 1], ``label (B, D, H, W)`` uint8, ``latent (B, C, d, h, w)`` float32 unscaled (the Ray Data map
    of a training run with ``train.latent_cache``)."""
    ids, imgs, labs, zs = [], [], [], []
    for cid, uri in zip(batch["case_id"], batch["uri"]):
        z, img, lab = read_cached_case(str(uri), str(cid))
        ids.append(str(cid))
        zs.append(z)
        imgs.append(hu_to_unit(img)[None].numpy())
        labs.append(lab)
    return {"case_id": np.asarray(ids), "image": np.stack(imgs), "label": np.stack(labs), "latent": np.stack(zs)}


def load_cached_cases(rows: Sequence[dict]) -> CaseArrays:
    """The cases of ``rows`` (of :func:`check_latent_cache`) in memory, latents included (the Ray-free loop)."""
    b = load_cached_batch({"case_id": [r["case_id"] for r in rows], "uri": [r["uri"] for r in rows]})
    return CaseArrays(list(b["case_id"]), torch.from_numpy(b["image"]), torch.from_numpy(b["label"]),
                      [np.eye(4)] * len(rows), torch.from_numpy(b["latent"]))
