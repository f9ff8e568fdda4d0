"""Ray Data wiring of ``jobs/cache_latents.py``: every case encoded once by the frozen VAE, for
``train_tcdm train.latent_cache=<out>`` (the cache's layout and checks: :mod:`fcas.diffusion.latent_cache`).

    case rows -> load (CPU tasks, one case each) -> encode + write one shard (actor pool, GPU or CPU) -> manifest

The driver reads only the cases manifest (:func:`fcas.diffusion.data.case_rows`) and collects the encoder
actors' small manifest rows; the volumes live in the Ray Data blocks and the shard files. Each
:class:`EncodeShard` actor loads the VAE once (``resources.gpus_per_actor`` GPUs, ``cpus_per_actor`` CPUs),
encodes the cases of a batch of ``shard_cases`` one at a time (the one-case encode training does) and
writes them as one shard, temporary name then rename. The manifest is written last. Before Ray and any
work: the data and the VAE must exist, and a rerun into an ``out`` made with another VAE or at another
grid is refused; a rerun with the same settings encodes only the cases its manifest lacks.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import ray
from omegaconf import DictConfig

from fcas.diffusion.data import case_rows
from fcas.diffusion.latent_cache import (LATENTS_SCHEMA, MANIFEST, SUMMARY, encode_latent, load_raw_batch,
                                         shard_bytes, shard_name)
from fcas.io import manifest, storage
from fcas.models.configs import LATENT_DOWNSAMPLE, ModelConfig, VAEConfig
from fcas.pipeline.jobs import plain_config
from fcas.pipeline.ray_env import ensure_ray
from fcas.settings import build

log = logging.getLogger(__name__)

__all__ = ["CacheResources", "CacheJob", "cache_job_from_cfg", "EncodeShard", "build_pipeline", "run_cache_latents"]


@dataclass(frozen=True)
class CacheResources:
    actors: tuple[int, int] = (1, 1)   # (min, max) encoder actor pool
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    load_cpus: float = 0.25            # each case-loading task
    address: str | None = None

    def __post_init__(self) -> None:
        lo, hi = (int(a) for a in self.actors)
        object.__setattr__(self, "actors", (lo, hi))
        if not 1 <= lo <= hi:
            raise ValueError(f"resources.actors must be [min, max] with 1 <= min <= max, got {list(self.actors)}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0 or self.load_cpus <= 0:
            raise ValueError(f"need gpus_per_actor >= 0, cpus_per_actor > 0, load_cpus > 0; got "
                             f"{self.gpus_per_actor}, {self.cpus_per_actor}, {self.load_cpus}")


@dataclass(frozen=True)
class CacheJob:
    """Resolved settings of one ``jobs/cache_latents.py`` run."""

    data: str
    out: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    vae: str | None = None
    vae_config: VAEConfig = field(default_factory=VAEConfig)   # the random VAE's architecture (vae=null)
    seed: int = 0
    split: str | None = "train"
    shard_cases: int = 8
    encode_window: tuple[int, int, int] | None = None
    resources: CacheResources = field(default_factory=CacheResources)

    def __post_init__(self) -> None:
        if self.shard_cases < 1:
            raise ValueError(f"shard_cases must be >= 1, got {self.shard_cases}")
        if any(int(s) % LATENT_DOWNSAMPLE for s in self.shape):
            raise ValueError(f"shape {tuple(self.shape)} is not a multiple of the VAE's downsampling {LATENT_DOWNSAMPLE}")
        if self.encode_window is not None and (len(self.encode_window) != 3
                                               or any(int(w) < 4 or int(w) % 4 for w in self.encode_window)):
            raise ValueError(f"encode_window {self.encode_window} must be 3 sizes, each a positive multiple of 4")


def cache_job_from_cfg(cfg: DictConfig | Mapping[str, Any]) -> CacheJob:
    """``configs/cache_latents.yaml`` -> :class:`CacheJob` (no I/O)."""
    from fcas.pipeline.jobs import check_job_config

    check_job_config(cfg, "cache_latents")
    c = plain_config(cfg)
    return build(CacheJob, {
        "data": c["data"], "out": c["out"], "shape": c["preset"]["shape"], "spacing": c["preset"]["spacing"],
        "vae": c.get("vae"), "vae_config": ModelConfig.from_dict(c.get("model") or {}).vae, "seed": c.get("seed", 0),
        "split": c.get("split"), "shard_cases": c.get("shard_cases", 8), "encode_window": c.get("encode_window"),
        "resources": c.get("resources"),
    })


class EncodeShard:
    """Ray Data actor: a batch of loaded cases (:func:`fcas.diffusion.latent_cache.load_raw_batch`) -> one
    shard file under ``out`` and the batch's manifest columns (``case_id``, ``uri``, ``latent_shape (B, 4)``,
    ``image_shape (B, 3)``, ``source``)."""

    def __init__(self, job: CacheJob, digest: str):
        import torch

        from fcas.models.bundle import load_vae

        if job.resources.gpus_per_actor > 0 and torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        vae, _, _, got = load_vae(job.vae, job.vae_config, seed=job.seed)
        if got != digest:   # the checkpoint changed since the driver read it
            raise ValueError(f"VAE {job.vae} has digest {got} on this worker, {digest} on the driver")
        self.vae = vae.to(self.device)
        self.job, self.digest = job, digest

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["case_id"]]
        latents = [encode_latent(self.vae, img, self.device, self.job.encode_window) for img in batch["image"]]
        rel = shard_name(self.digest, ids)
        storage.retry_io(lambda: storage.atomic_write_bytes(
            storage.join(self.job.out, rel), shard_bytes(ids, latents, batch["image"], batch["label"])), rel)
        return {"case_id": np.asarray(ids), "uri": np.asarray([rel] * len(ids)),
                "latent_shape": np.asarray([z.shape for z in latents], dtype=np.int64),
                "image_shape": np.asarray([img.shape for img in batch["image"]], dtype=np.int64),
                "source": np.asarray(batch["source"])}


def build_pipeline(job: CacheJob, rows: list[dict], digest: str) -> "ray.data.Dataset":
    """The lazy Ray Data pipeline encoding the cases ``rows`` (:func:`fcas.diffusion.data.case_rows`)."""
    r = job.resources
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))   # one case per loading task
    ds = ds.map_batches(load_raw_batch, fn_kwargs={"shape": list(job.shape), "spacing": list(job.spacing)},
                        batch_size=1, num_cpus=r.load_cpus)
    return ds.map_batches(EncodeShard, fn_constructor_kwargs={"job": job, "digest": digest},
                          batch_size=job.shard_cases, num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor,
                          compute=ray.data.ActorPoolStrategy(min_size=r.actors[0], max_size=r.actors[1]))


def _existing(job: CacheJob, digest: str) -> list[dict]:
    """The rows of a cache already at ``out`` (paths as stored); ``ValueError`` when made with another VAE or grid."""
    uri = storage.join(job.out, MANIFEST)
    if not storage.exists(uri):
        return []
    rows = manifest.read_table(uri, LATENTS_SCHEMA).to_pylist()
    other = sorted({r["vae_digest"] for r in rows} - {digest})
    if other:
        raise ValueError(f"{uri} holds latents of VAE {', '.join(other)}, this job encodes with {digest}; "
                         f"use another out")
    for r in rows:
        if not np.allclose(r["spacing"], job.spacing, rtol=1e-4):
            raise ValueError(f"{uri} holds case {r['case_id']} at {tuple(r['spacing'])} mm, this job's preset is at "
                             f"{tuple(job.spacing)} mm; use another out")
    return rows


def run_cache_latents(job: CacheJob, progress: bool = True) -> dict:
    """Encode the cases of ``job.data`` missing from ``job.out``; returns the summary (also ``out/cache_summary.json``)."""
    from dataclasses import replace

    from fcas.io.storage import absolute
    from fcas.models.bundle import vae_digest

    t0 = time.time()
    # Ray's workers may run in another directory: relative paths are resolved here, on the driver
    random_vae = job.vae in (None, "", "random", "none")
    job = replace(job, data=absolute(job.data), out=absolute(job.out), vae=job.vae if random_vae else absolute(job.vae))
    rows = case_rows(job.data, job.split)      # the data and the VAE must exist: ValueError before Ray
    digest = vae_digest(job.vae, job.seed)
    existing = _existing(job, digest)
    done = {r["case_id"] for r in existing}
    todo = [r for r in rows if r["case_id"] not in done]
    log.info("cache_latents: %d of %d cases to encode (%d cached already) -> %s", len(todo), len(rows),
             len(rows) - len(todo), job.out)
    new: list[dict] = []
    if todo:
        ensure_ray(job.resources.address)
        bar = _progress(len(todo), progress)
        for b in build_pipeline(job, todo, digest).iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(b["case_id"])):
                new.append({"case_id": str(b["case_id"][i]), "uri": str(b["uri"][i]),
                            "latent_shape": [int(v) for v in b["latent_shape"][i]],
                            "image_shape": [int(v) for v in b["image_shape"][i]],
                            "spacing": [float(v) for v in job.spacing], "vae_digest": digest,
                            "source": str(b["source"][i])})
            bar.update(len(b["case_id"]))
        bar.close()
    table = sorted(existing + new, key=lambda r: r["case_id"])
    manifest.write_table(storage.join(job.out, MANIFEST), table, LATENTS_SCHEMA)   # last: the cache is complete
    elapsed = time.time() - t0
    summary = {"data": job.data, "out": job.out, "vae": job.vae, "vae_digest": digest, "cases": len(table),
               "encoded": len(new), "kept": len(existing), "shards": len({r["uri"] for r in table}),
               "seconds": round(elapsed, 2), "cases_per_s": round(len(new) / elapsed, 4) if elapsed > 0 else None}
    storage.atomic_write_bytes(storage.join(job.out, SUMMARY), json.dumps(summary, indent=2).encode())
    return summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cache_latents", unit="case", disable=not enabled)
