"""Ray Data wiring of ``jobs/synthesize.py``, streaming end to end:

    range(n) -> plan (CPU, cheap) -> MGM (CPU actors) -> sampler (actor pool, GPU or CPU)
             -> writer (CPU tasks: NIfTI + preview, then the batch's manifest shard)

Nothing is materialised in full: the driver only counts the writer's small status rows. A rerun
with the same ``out`` skips sample ids that already have a manifest row and files. The science is
in :mod:`fcas.deform`, :mod:`fcas.synthesis` and :mod:`fcas.diffusion`.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import ray

from fcas.bundled import resolve
from fcas.deform.stage import MGMStage
from fcas.io import storage
from fcas.models.checkpoint import checkpoint_digest, latest_checkpoint
from fcas.models.configs import LATENT_DOWNSAMPLE
from fcas.pipeline.prepare import PrepareJob, run_prepare
from fcas.pipeline.ray_env import ensure_ray
from fcas.prepare import PrepareSettings
from fcas.synthesis.faults import FaultPlan
from fcas.security import safe_child
from fcas.synthesis.identity import check_identity, library_digest
from fcas.synthesis.lease import LEASE_FILE, Lease, acquire_lease
from fcas.synthesis.outputs import (DATALIST_FILE, compact_run, finished_ids, read_run_manifest, rejected_ids,
                                   remove_temporaries)
from fcas.synthesis.plan import TemplateLibrary, plan_sample
from fcas.synthesis.sampler import SamplerSettings, SamplerStage
from fcas.synthesis.writer import WriterStage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    sampler_actors: tuple[int, int] = (1, 1)   # (min, max) actor pool size
    sampler_gpus: float = 0.0                  # per sampler actor (1 on GPU clusters)
    sampler_cpus: float = 0.5
    sampler_threads: int = 0                   # torch threads per sampler actor (0: Ray's OMP_NUM_THREADS)
    sampler_batch_size: int = 1
    mgm_actors: tuple[int, int] = (1, 1)
    mgm_cpus: float = 0.25
    writer_cpus: float = 0.4
    plan_cpus: float = 0.1
    writer_batch_size: int = 4                 # samples per manifest shard
    # fault tolerance: actors that die are restarted and their in-flight batches retried (-1: no
    # limit, a preempted node must not end a 100k run); a writer task that raises is retried
    # (files are named from the sample id, so a retry overwrites); one sample that keeps failing
    # in the sampler becomes a reject after sampler_tries tries instead of failing the job
    actor_max_restarts: int = -1
    actor_task_retries: int = -1
    writer_retries: int = 3
    compact_every: int = 5000                  # written samples between manifest compactions (0: only at start and end)
    sampler_tries: int = 2
    lease_ttl: float = 120.0                   # s without a heartbeat before another driver may take the run over
    # Logical CPUs: actors hold theirs for the whole run; the defaults leave a whole CPU of a
    # 2-CPU laptop free for Ray Data's own 1-CPU tasks, or the pipeline would wait forever.
    # Clusters raise the actor counts (and give the sampler a GPU).


@dataclass(frozen=True)
class SynthesisJob:
    n: int
    out: str
    checkpoint: str
    templates: str = "phantom:16"              # phantom:N (bundled phantom library) or a cases.parquet URI
    run_seed: int = 0
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    mgm: dict = field(default_factory=dict)
    schema: str = "cardiac"
    preview: bool = True
    resources: Resources = field(default_factory=Resources)
    config_hash: str = ""
    faults: FaultPlan | None = None            # tests only: inject failures (fcas.synthesis.faults)
    checkpoint_digest: str | None = None       # refuse a checkpoint with another digest (None: the run's own)
    identity: dict | None = None               # the content settings recorded in out/run.json (None: config_hash only)

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")


def template_library(job: SynthesisJob, ray_address: str | None = None) -> TemplateLibrary:
    """The template library: a prepared manifest, or the bundled phantoms prepared once under ``out``."""
    src = job.templates
    if src.startswith("phantom:"):
        lib_out = safe_child(job.out, "templates")
        cases = storage.join(lib_out, "cases.parquet")
        if not storage.exists(cases):
            settings = PrepareSettings(shape=job.shape, spacing=job.spacing)
            run_prepare(PrepareJob(source=src, out=lib_out, settings=settings, schema=job.schema,
                                   splits=(("template", 0.25), ("reference", 0.75)), seed=job.run_seed, preview=0),
                        ray_address)
        src = cases
    return TemplateLibrary.from_manifest(src)


def plan_batch(batch: dict, library: TemplateLibrary, run_seed: int) -> dict:
    """Plan stage: ``{"id": (B,)}`` sample ids -> plan columns."""
    plans = [plan_sample(run_seed, int(i), library) for i in batch["id"]]
    cols = ("sample_id", "seed", "template_id", "template_image_uri", "template_label_uri",
            "reference_id", "reference_label_uri")
    out = {c: np.asarray([p[c] for p in plans], dtype=np.int64 if c in ("sample_id", "seed") else object)
           for c in cols}
    out["template_uri"] = out["reference_label_uri"]   # the mask MGM deforms is the reference M_A
    out["run_seed"] = np.full(len(plans), run_seed, dtype=np.int64)
    return out


def id_ranges(n: int, max_blocks: int = 1000) -> list[dict]:
    """``range(n)`` as at most ``max_blocks`` ``{"start", "stop"}`` items: the driver never holds n ids."""
    step = max(1, -(-n // max_blocks))
    return [{"start": a, "stop": min(a + step, n)} for a in range(0, n, step)]


def expand_and_plan(batch: dict, library: TemplateLibrary, run_seed: int, done: np.ndarray) -> dict:
    """Plan stage: id ranges -> the plan columns of their ids that are not ``done`` (sorted int64)."""
    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(batch["start"], batch["stop"])])
    if len(done):
        pos = np.searchsorted(done, ids).clip(max=len(done) - 1)
        ids = ids[done[pos] != ids]
    return plan_batch({"id": ids}, library, run_seed)


def build_pipeline(job: SynthesisJob, library: TemplateLibrary, done: np.ndarray, digest: str):
    """The lazy Ray Data pipeline of the samples ``range(job.n)`` minus ``done`` (nothing runs yet)."""
    r = job.resources
    # ids as ranges from the driver (no read tasks: they would need a whole CPU the actors may hold)
    ranges = id_ranges(job.n)
    ds = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))
    ds = ds.map_batches(partial(expand_and_plan, library=library, run_seed=job.run_seed, done=done),
                        batch_size=1, num_cpus=r.plan_cpus)
    # one sample per block from here on: each MGM / sampler task then holds one sample and
    # hands it on when done (without this, a task's outputs are merged into one block up to
    # 128 MiB and nothing reaches the writer until the task has done all its rows)
    ds = ds.repartition(target_num_rows_per_block=1)
    actor_retry = {"max_restarts": r.actor_max_restarts, "max_task_retries": r.actor_task_retries}
    ds = ds.map_batches(MGMStage, fn_constructor_kwargs={"cfg": job.mgm or None, "schema": job.schema},
                        batch_size=1, num_cpus=r.mgm_cpus, compute=_pool(r.mgm_actors), **actor_retry)
    ds = ds.map_batches(SamplerStage, fn_constructor_kwargs={"checkpoint": job.checkpoint, "settings": job.sampler,
                                                             "tries": r.sampler_tries, "faults": job.faults,
                                                             "expected_digest": digest,
                                                             "threads": r.sampler_threads},
                        batch_size=r.sampler_batch_size, compute=_pool(r.sampler_actors),
                        num_gpus=r.sampler_gpus, num_cpus=r.sampler_cpus, **actor_retry)
    return ds.map_batches(WriterStage(job.out, job.sampler.to_json(), job.config_hash, job.preview, job.faults,
                                      threads=int(r.writer_cpus)),
                          batch_size=r.writer_batch_size, num_cpus=r.writer_cpus,
                          max_retries=r.writer_retries, retry_exceptions=True)


def run_synthesis(job: SynthesisJob, ray_address: str | None = None, progress: bool = True) -> dict:
    """Synthesize samples ``0..n-1`` into ``job.out`` (resuming); returns the run summary.

    Before Ray and any work: nothing the run writes may lead out of ``out`` (symlinks), the run's
    lease is taken (one driver per run, :mod:`fcas.synthesis.lease`), the checkpoint and the run's
    identity (``out/run.json``) are checked.
    """
    for name in ("manifest", "rejects", "samples", "templates", "quarantine", "summary.json", "run.json",
                 LEASE_FILE, DATALIST_FILE):
        safe_child(job.out, name)
    check_checkpoint_fits(job)
    given = None   # a prepared library is read and checked once, here; phantoms are prepared under the lease
    if not job.templates.startswith("phantom:"):
        given = TemplateLibrary.from_manifest(job.templates)
        check_template_library(given, job.templates, job.schema)
    with acquire_lease(job.out, ttl=job.resources.lease_ttl) as lease:
        return _run_leased(job, lease, given, ray_address, progress)


def check_checkpoint_fits(job: SynthesisJob) -> None:
    """Load the checkpoint on the driver (``ValueError`` when its config does not fit its weights) and
    refuse one trained at another voxel spacing than the job's preset: its samples would silently be
    drawn onto the wrong grid (e.g. the tiny 4 mm checkpoint with ``preset=demo`` at 2 mm)."""
    from fcas.diffusion.bundle import load_tcdm

    bundle = load_tcdm(job.checkpoint)
    trained = tuple(float(v) for v in bundle.spacing)
    if not np.allclose(trained, job.spacing, rtol=1e-4):
        preset = bundle.config.get("preset", "?")
        raise ValueError(f"checkpoint {job.checkpoint} was trained at spacing {trained} mm (preset {preset}), the job "
                         f"samples at {tuple(job.spacing)} mm; use preset={preset} or a checkpoint of this preset")
    if any(int(s) % LATENT_DOWNSAMPLE for s in job.shape):
        raise ValueError(f"shape {tuple(job.shape)} is not a multiple of the VAE's downsampling {LATENT_DOWNSAMPLE}")


def check_template_library(library: TemplateLibrary, source: str, schema: str) -> None:
    """Before any work: every template and reference file exists, and every case has cardiac voxels
    (per the cases manifest's ``class_voxels``). A template library is complete or the job fails."""
    from concurrent.futures import ThreadPoolExecutor

    from fcas.io import manifest
    from fcas.labels import load_schema

    refs = {r.case_id: r for r in library.templates + library.references}
    uris = [u for r in refs.values() for u in (r.image_uri, r.label_uri)]
    with ThreadPoolExecutor(16) as pool:
        missing = [u for u, ok in zip(uris, pool.map(storage.exists, uris)) if not ok]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} template/reference file(s) missing, e.g. {missing[0]}")
    cardiac = set(load_schema(schema).cardiac)
    rows = manifest.read_cases(source, resolve=False).to_pylist()   # only ids and class_voxels are used
    for r in rows:
        if r["case_id"] in refs:
            voxels = dict(r["class_voxels"] or ())   # a map cell reads back as (key, value) pairs
            if not any(int(voxels.get(c, 0)) > 0 for c in cardiac):
                raise ValueError(f"{source}: case {r['case_id']} has no voxels of any cardiac class "
                                 f"({', '.join(sorted(cardiac))}); its label map does not follow schema {schema!r}")


def _run_leased(job: SynthesisJob, lease: Lease, library: TemplateLibrary | None, ray_address: str | None,
                progress: bool) -> dict:
    t_start = time.time()
    compact_run(job.out)   # a run that stopped before compacting leaves many small shards
    existing = read_run_manifest(job.out, quarantine=True)   # read once: the digest check and the finished ids share it
    digest = _checked_digest(job, existing)
    check_identity(job.out, "settings", {"content": job.identity if job.identity is not None else job.config_hash,
                                         "run_seed": job.run_seed, "shape": list(job.shape),
                                         "spacing": list(job.spacing), "checkpoint_digest": digest})
    ensure_ray(ray_address)
    library = template_library(job, ray_address) if library is None else library
    check_identity(job.out, "templates", {"library_digest": library_digest(library),
                                          "n_templates": len(library.templates),
                                          "n_references": len(library.references)})
    stale = remove_temporaries(job.out)   # only the lease holder: another driver's temporaries are live
    if stale:
        log.info("synthesize: removed %d temporary files an interrupted run left in %s", stale, job.out)
    done = np.fromiter(sorted(i for i in finished_ids(job.out, existing) if 0 <= i < job.n), dtype=np.int64)
    del existing
    n_todo = job.n - len(done)
    log.info("synthesize: %d of %d samples to do (%d already finished) -> %s", n_todo, job.n, len(done), job.out)
    r = job.resources
    counts = {"written": 0, "rejected": 0}
    arrivals: list[tuple[float, int]] = []     # (time, samples) of each writer batch when written
    if n_todo:
        ds = build_pipeline(job, library, done, digest)
        bar = _progress(n_todo, progress)
        since_compact = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if lease.lost.is_set():
                raise RuntimeError(f"{job.out}: another driver took over this run's lease; stopping this one")
            arrivals.extend((float(t), 1) for t in batch["finished_at"])
            for s in batch["status"]:
                counts[str(s)] += 1
            bar.update(len(batch["status"]))
            since_compact += len(batch["status"])
            if r.compact_every and since_compact >= r.compact_every:   # keep the shard count bounded
                compact_run(job.out)
                since_compact = 0
        bar.close()
    compact_run(job.out, min_shards=2)
    table = read_run_manifest(job.out)
    if table.num_rows:   # MONAI users load the run from it (paths relative to out)
        from fcas.synthesis.datalist import write_datalist   # MONAI's Dataset: imported once the run is written

        write_datalist(job.out)
    elapsed = time.time() - t_start
    written_ids = table.column("sample_id").to_numpy()
    n_rejects = len(rejected_ids(job.out) - set(written_ids.tolist()))
    summary = {
        "n_requested": job.n,
        "n_written": table.num_rows,
        "n_written_this_run": counts["written"],
        "n_rejected": n_rejects,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(counts["written"] / elapsed, 4) if elapsed > 0 else None,
        # after the first batch arrived: start-up (Ray, templates, model loads) excluded
        "first_batch_s": round(min(arrivals)[0] - t_start, 2) if arrivals else None,
        "steady_samples_per_s": _steady_rate(arrivals),
        "stage_seconds_total": _stage_totals(table),
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "checkpoint": job.checkpoint,
        "config_hash": job.config_hash,
        "sampler": asdict(job.sampler),
        "out": job.out,
    }
    storage.atomic_write_bytes(safe_child(job.out, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def _stage_totals(table) -> dict[str, float]:
    """Sum of every ``timings`` entry over the manifest, in Arrow (no Python row per sample)."""
    import pyarrow as pa

    col = table.column("timings").combine_chunks()
    if len(col) == 0:
        return {}
    sums = pa.table({"k": col.keys, "v": col.items}).group_by("k").aggregate([("v", "sum")])
    return {k: round(v, 3) for k, v in sorted(zip(sums["k"].to_pylist(), sums["v_sum"].to_pylist()))
            if not k.endswith("_at")}   # instants (sampled_at, written_at) are not durations


def _checked_digest(job: SynthesisJob, existing) -> str:
    """The digest of the checkpoint this run loads, refused (``ValueError``) when it differs from
    ``job.checkpoint_digest`` or from the digest the run's existing rows were made with: one run
    never mixes checkpoints. Sampler actors verify what they load against it."""
    uri = resolve(job.checkpoint)
    if not storage.exists(storage.join(uri, "checkpoint.json")):
        uri = latest_checkpoint(uri) or uri
    if not storage.exists(storage.join(uri, "checkpoint.json")):
        raise ValueError(f"checkpoint {job.checkpoint}: no checkpoint.json (not a complete checkpoint folder)")
    digest = checkpoint_digest(uri)
    recorded = set(existing.column("checkpoint_digest").unique().to_pylist()) - {None, ""}
    for want, why in ((job.checkpoint_digest, "checkpoint_digest in the config"),
                      (next(iter(recorded)) if len(recorded) == 1 else None, f"the samples already in {job.out}")):
        if want and want != digest:
            raise ValueError(f"checkpoint {uri} has digest {digest[:12]}…, but {why} were made with "
                             f"{want[:12]}…; use that checkpoint or another out")
    return digest


def _steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Samples/s between the first and the last written batch (None with < 2 batches)."""
    arrivals = sorted(arrivals)
    if len(arrivals) < 2 or arrivals[-1][0] <= arrivals[0][0]:
        return None
    t0 = arrivals[0][0]
    return round(sum(n for t, n in arrivals if t > t0) / (arrivals[-1][0] - t0), 4)


def _pool(size: tuple[int, int]):
    lo, hi = (int(v) for v in size)
    if not 1 <= lo <= hi:
        raise ValueError(f"actor pool size must be (min, max) with 1 <= min <= max, got {tuple(size)}")
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, desc="samples", unit="sample")
