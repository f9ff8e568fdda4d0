"""Output naming, writing and the synthesis manifest (one row per finished sample).

Names derive from the sample id only, so a retried sample overwrites its own files; every
file is written atomically (:mod:`fcas.io.storage`), and a manifest row is written only after
all of its sample's files exist. Readers drop duplicate sample ids (last row wins).

Portable runs (synthesis schema v2): the ``*_uri`` columns hold paths relative to the run root
(``samples/s00000012_image.nii.gz``), so a run copied elsewhere (S3 to local, another disk) reads and
exports from its new place. :func:`read_run_manifest` resolves them against the ``out`` it is given;
v1 rows (absolute URIs) are kept as they are, so old runs read as before (but not once moved).
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa

from fcas.io import manifest, nifti, storage
from fcas.security import safe_child

SYNTHESIS_SCHEMA = manifest.make_schema(
    "synthesis",
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("template_id", pa.string(), nullable=False),
        pa.field("reference_id", pa.string(), nullable=False),
        pa.field("mgm", pa.map_(pa.string(), pa.float64())),
        pa.field("qc", pa.map_(pa.string(), pa.float64())),
        pa.field("mgm_tries", pa.int32()),
        pa.field("sampler", pa.string()),            # JSON of the sampler + SSV settings
        pa.field("checkpoint_digest", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("label_uri", pa.string(), nullable=False),
        pa.field("confidence_uri", pa.string(), nullable=False),
        pa.field("preview_uri", pa.string()),
        pa.field("timings", pa.map_(pa.string(), pa.float64())),
    ],
    version=2,   # v2: the *_uri columns are relative to the run root (v1: absolute URIs)
)
manifest.SCHEMAS["synthesis"] = SYNTHESIS_SCHEMA
DATALIST_FILE = "datalist.json"   # the run's MONAI datalist (fcas.synthesis.datalist)
URI_COLUMNS = ("image_uri", "label_uri", "confidence_uri", "preview_uri")

SAMPLE_REJECTS_SCHEMA = manifest.make_schema(
    "sample_rejects",
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
)
manifest.SCHEMAS["sample_rejects"] = SAMPLE_REJECTS_SCHEMA


def sample_name(sample_id: int) -> str:
    """``s%08d`` of a non-negative integer id; a string, float or bool id is refused (``ValueError``)."""
    if isinstance(sample_id, (bool, np.bool_)) or not isinstance(sample_id, (int, np.integer)):
        raise ValueError(f"sample_id must be an integer, got {sample_id!r} ({type(sample_id).__name__})")
    if int(sample_id) < 0:
        raise ValueError(f"sample_id must be non-negative, got {sample_id}")
    return f"s{int(sample_id):08d}"


def sample_paths(sample_id: int, preview: bool = True) -> dict[str, str | None]:
    """One sample's files relative to the run root (``samples/s00000012_image.nii.gz``, ...): its manifest row."""
    base = f"samples/{sample_name(sample_id)}"
    return {
        "image_uri": f"{base}_image.nii.gz",
        "label_uri": f"{base}_label.nii.gz",
        "confidence_uri": f"{base}_confidence.nii.gz",
        "preview_uri": f"{base}_preview.png" if preview else None,
    }


def sample_uris(out: str, sample_id: int, preview: bool = True) -> dict[str, str | None]:
    """The URIs of one sample's files under ``out/samples/`` (refused if they would leave ``out``)."""
    return {k: None if p is None else safe_child(out, p) for k, p in sample_paths(sample_id, preview).items()}


def write_sample(out: str, sample_id: int, image_hu: np.ndarray, label: np.ndarray, confidence: np.ndarray,
                 affine: np.ndarray, preview_png: bytes | None = None, threads: int = 1) -> dict[str, str | None]:
    """Write one sample's files (image int16 HU, label uint8, confidence in [0, 1] as uint8 steps of 1/255, PNG).

    ``threads > 1`` writes the three volumes concurrently (their compression releases the GIL): a
    writer given that many CPUs finishes a paper-size sample in about the time of its image alone.
    """
    uris = sample_uris(out, sample_id, preview=preview_png is not None)
    jobs = [(uris["image_uri"], image_hu, "image"), (uris["label_uri"], label, "label"),
            (uris["confidence_uri"], confidence, "fraction")]
    write = lambda job: nifti.write_nifti(job[0], job[1], affine, kind=job[2], clip=job[2] == "fraction")  # noqa: E731
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            list(pool.map(write, jobs))   # re-raises the first error
    else:
        for job in jobs:
            write(job)
    if preview_png is not None:
        storage.atomic_write_bytes(uris["preview_uri"], preview_png)
    return uris


def write_shard(out: str, rows: list[dict], schema=SYNTHESIS_SCHEMA, folder: str = "manifest") -> str | None:
    """Append one Parquet shard of finished rows under ``out/<folder>/``; returns its URI."""
    if not rows:
        return None
    uri = safe_child(out, folder, f"part-{uuid.uuid4().hex}.parquet")   # a symlinked folder may not lead out
    manifest.write_table(uri, rows, schema)
    return uri


def read_run_manifest(out: str, quarantine: bool = False, resolve: bool = True) -> pa.Table:
    """The run's manifest with duplicate sample ids dropped (last wins); empty if none yet.

    ``resolve``: the :data:`URI_COLUMNS` as absolute URIs under ``out`` (relative rows joined onto it,
    absolute ones of older runs kept); False gives them as stored.
    ``quarantine`` (the run's own driver only): a shard that is not Parquet is moved to
    ``out/quarantine/`` with a warning instead of stopping the read; its samples count as not done.
    """
    uri = storage.join(out, "manifest")
    if not storage.exists(uri):
        return SYNTHESIS_SCHEMA.empty_table()
    table = manifest.read_manifest_dedup(uri, key="sample_id", schema=SYNTHESIS_SCHEMA,
                                         quarantine=safe_child(out, "quarantine") if quarantine else None)
    return manifest.resolve_uris(table, out, URI_COLUMNS) if resolve else table


def compact_run(out: str, min_shards: int = 32) -> dict:
    """Compact the run's manifest (last row per sample id kept) and rejects (every row kept); see
    :func:`fcas.io.manifest.compact`. Returns ``{"manifest": ..., "rejects": ...}``. Refuses
    (:class:`fcas.security.UnsafePathError`) a folder that leads out of ``out`` (a symlink)."""
    q = safe_child(out, "quarantine")
    return {"manifest": manifest.compact(safe_child(out, "manifest"), SYNTHESIS_SCHEMA, key="sample_id",
                                         min_shards=min_shards, quarantine=q),
            "rejects": manifest.compact(safe_child(out, "rejects"), SAMPLE_REJECTS_SCHEMA, min_shards=min_shards,
                                        quarantine=q)}


def rejected_ids(out: str) -> set[int]:
    """Sample ids with a row in the run's rejects (a rerun tries them again; it may append rows)."""
    uri = storage.join(out, "rejects")
    if not storage.exists(uri):
        return set()
    return {int(i) for i in manifest.read_table(uri, schema=SAMPLE_REJECTS_SCHEMA).column("sample_id").to_pylist()}


def remove_temporaries(out: str) -> int:
    """Delete the hidden ``.<name>.*.tmp`` files an interrupted local run left under ``out``; returns
    how many. (Object stores have none: their writes are single PUTs.) Call only when no other run
    writes to ``out``."""
    if not storage.is_local(out):
        return 0
    _, root = storage.get_fs(out)
    n = 0
    for folder in ("samples", "manifest", "rejects"):
        d = os.path.join(root, folder)
        if os.path.isdir(d):
            for entry in os.scandir(d):
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                    os.unlink(entry.path)
                    n += 1
    return n


def finished_ids(out: str, table: pa.Table | None = None) -> set[int]:
    """Sample ids with a manifest row whose files all exist (what a rerun may skip).

    One listing of ``out/samples/`` instead of a request per file (300k HEADs at n=100000 on S3);
    files are matched by name, so relative (v2) and absolute (v1) rows of a moved run both count.
    ``table``: the run's manifest when the caller has read it already (read here otherwise).
    """
    table = read_run_manifest(out) if table is None else table
    if table.num_rows == 0:
        return set()
    folder = storage.join(out, "samples")
    present = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(folder)} if storage.exists(folder) else set()
    done = set()
    for row in table.select(["sample_id", "image_uri", "label_uri", "confidence_uri"]).to_pylist():
        if all(row[k].rsplit("/", 1)[-1] in present for k in ("image_uri", "label_uri", "confidence_uri")):
            done.add(int(row["sample_id"]))
    return done
