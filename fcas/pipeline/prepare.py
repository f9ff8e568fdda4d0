"""Ray Data wiring of ``jobs/prepare.py``: sources -> validate/resample/write (CPU tasks) -> manifests.

The science is in :mod:`fcas.prepare`; here only the listing of sources (an image glob and one glob
per label source, the ``*`` of each being the case key), the Ray Data map, the split assignment over
the finished rows and the two Parquet manifests (``cases.parquet``, ``rejects.parquet``). A bad case
never stops the job: it becomes a reject row with its reason.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import ray

from fcas.io import manifest, storage
from fcas.labels import load_schema
from fcas.prepare import (CaseRejected, PrepareSettings, assign_splits, prepare_case, prepare_phantom, safe_case_id,
                          write_case)
from fcas.pipeline.ray_env import ensure_ray
from fcas.security import safe_child
from fcas.synthesis.faults import FaultPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareJob:
    source: str                       # "phantom:N", "dir:<uri>" or a directory URI
    out: str
    settings: PrepareSettings
    images: str = "*_image.nii.gz"    # glob under the source dir; the '*' part is the case key
    # the label sources of a case: one glob (source "label") or {source name: glob} (null: unused), each a
    # file or per-structure folder per case, merged by the schema's priority
    labels: str | tuple[tuple[str, str | None], ...] = "*_label.nii.gz"
    schema: str = "cardiac"
    splits: tuple[tuple[str, float], ...] = (("train", 0.6), ("template", 0.1), ("reference", 0.2), ("test", 0.1))
    seed: int = 0
    preview: int = 3                  # cases shown in out/preview.png (0: none)
    io_tries: int = 4                 # tries of a case whose storage fails transiently (then the job fails)
    io_delay: float = 0.5             # s before the 2nd try, doubling
    faults: FaultPlan | None = None   # tests only: storage errors injected into phantom case writes

    def __post_init__(self) -> None:
        if self.io_tries < 1 or self.io_delay < 0:
            raise ValueError(f"io_tries must be >= 1 and io_delay >= 0, got {self.io_tries}, {self.io_delay}")
        labels = {"label": self.labels} if isinstance(self.labels, str) else dict(self.labels)
        labels = tuple((str(k), str(v)) for k, v in labels.items() if v is not None)
        if not labels:
            raise ValueError(f"labels: no label source given ({self.labels!r})")
        object.__setattr__(self, "labels", labels)


def _key(uri: str, pattern: str) -> str | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    base = pattern.rsplit("/", 1)[-1]
    pre, _, post = base.partition("*")
    if name.startswith(pre) and name.endswith(post) and len(name) >= len(pre) + len(post):
        return name[len(pre): len(name) - len(post)]
    return None


def list_sources(job: PrepareJob) -> tuple[list[dict], list[dict]]:
    """Work items and the rejects found while listing (an image without a label and vice versa)."""
    src = job.source
    if src.startswith("phantom:"):
        try:
            n = int(src.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"source {src!r}: expected phantom:<count>") from None
        if n < 1:
            raise ValueError(f"source {src!r}: the phantom count must be positive")
        return [{"kind": "phantom", "seed": i, "image_uri": "", "case_id": "", "labels": "{}"} for i in range(n)], []
    root = src[4:] if src.startswith("dir:") else src
    if not storage.isdir(root):
        raise ValueError(f"source {src!r}: not a directory (or phantom:N)")
    globs = dict(job.labels)
    schema = load_schema(job.schema)
    for mapping in {job.settings.mapping_for(name) for name in globs} - {None}:
        schema.source(mapping)   # an unknown mapping is the config's mistake (ValueError), not a case's
    images = _matches(root, job.images)
    labels = {name: _matches(root, g) for name, g in globs.items()}
    if not images and not any(labels.values()):
        raise ValueError(f"source {src!r}: no files match images={job.images!r} / labels={globs}")
    what = {name: "label" if name == "label" else f"{name} label" for name in globs}
    items, rejects = [], []
    used: dict[str, str] = {}   # case id -> the image it came from (sanitizing may map two names to one id)
    for key in sorted(images):
        missing = ", ".join(f"no {what[n]} file matching {globs[n]!r}" for n in globs if key not in labels[n])
        if missing:
            rejects.append({"source": images[key], "reason": f"image {images[key]}: {missing}", "stage": "list"})
            continue
        try:
            cid = safe_case_id(key)
        except ValueError as err:
            rejects.append({"source": images[key], "reason": f"image {images[key]}: {err}", "stage": "list"})
            continue
        if cid in used:
            rejects.append({"source": images[key], "reason": f"image {images[key]}: case id {cid!r} (from {key!r}) "
                                                             f"is already used by {used[cid]}", "stage": "list"})
            continue
        used[cid] = images[key]
        items.append({"kind": "case", "seed": -1, "image_uri": images[key], "case_id": cid,
                      "labels": json.dumps({n: labels[n][key] for n in globs})})
    for name in globs:
        for key in sorted(set(labels[name]) - set(images)):
            uri = labels[name][key]
            rejects.append({"source": uri, "reason": f"{what[name]} {uri}: no image file matching {job.images!r}",
                            "stage": "list"})
    return items, rejects


def _matches(root: str, pattern: str) -> dict[str, str]:
    """{case key: uri} of the files and folders matching ``pattern`` under ``root``."""
    found = {_key(u, pattern): u for u in storage.glob(storage.join(root, pattern))}
    found.pop(None, None)
    return found


class PrepareCase:
    """Ray Data row function: one work item -> ``{ok, row (JSON), reason, source}``."""

    def __init__(self, job: PrepareJob):
        self.job = job
        self.schema = load_schema(job.schema)

    def _case(self, item: dict) -> dict:
        if item["kind"] == "phantom":
            case = prepare_phantom(int(item["seed"]), self.schema, self.job.settings)
            err = self.job.faults and self.job.faults.storage_error(
                int(item["seed"]), safe_child(self.job.out, "cases", f"{case.case_id}_image.nii.gz"))
            if err:
                raise err
        else:
            case = prepare_case(item["case_id"], item["image_uri"], json.loads(item["labels"]), self.schema,
                                self.job.settings)
        return write_case(case, self.job.out, self.schema)

    def __call__(self, item: dict) -> dict:
        """A problem of the input becomes this case's reject; a storage error (disk full, I/O error,
        lost connection, throttling) is retried with backoff and then fails the job (``fatal``): a
        library missing cases because the disk was full would silently change every sample."""
        source = item["image_uri"] or f"phantom:{item['seed']}"
        try:
            row = storage.retry_io(lambda: self._case(item), source, tries=self.job.io_tries,
                                   base_delay=self.job.io_delay)
            return {"ok": True, "row": json.dumps(row), "reason": "", "source": source, "fatal": False}
        except CaseRejected as err:
            return {"ok": False, "row": "", "reason": str(err), "source": source, "fatal": False}
        except storage.StorageError as err:
            return {"ok": False, "row": "", "reason": str(err), "source": source, "fatal": True}
        except Exception as err:  # unexpected failure of one case: record it, keep the job going
            reason = f"{source}: {type(err).__name__}: {err}".splitlines()[0]
            return {"ok": False, "row": "", "reason": reason, "source": source, "fatal": False}


def write_preview(rows: list[dict], uri: str, root: str) -> None:
    """A tri-planar image + label overlay of a few written cases (URIs relative to ``root``), read back."""
    from fcas.io import nifti
    from fcas.preview import grid_png

    cases = []
    for r in rows:
        img, lab = (nifti.read_nifti(storage.join(root, r[k])) for k in ("image_uri", "label_uri"))
        cases.append((img.array, lab.array, img.affine))
    storage.atomic_write_bytes(uri, grid_png(cases, None, titles=[r["case_id"] for r in rows]))


def run_prepare(job: PrepareJob, ray_address: str | None = None) -> dict:
    """Run the prepare job; returns the summary dict (also written to ``out/prepare_summary.json``)."""
    t0 = time.time()
    items, rejects = list_sources(job)
    storage.makedirs(storage.join(job.out, "cases"))
    cases = []
    if items:
        ensure_ray(ray_address)
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
        for r in ds.map(PrepareCase(job), num_cpus=1).iter_rows():
            if r["fatal"]:   # stop at once: nothing of a half library is published (no cases.parquet)
                raise storage.StorageError(r["reason"])
            if r["ok"]:
                cases.append(json.loads(r["row"]))
            else:
                log.warning("rejected: %s", r["reason"])
                rejects.append({"source": r["source"], "reason": r["reason"], "stage": "validate"})
    splits = assign_splits([c["case_id"] for c in cases], dict(job.splits), job.seed)
    for c in cases:
        c["split"] = splits[c["case_id"]]
    cases.sort(key=lambda c: c["case_id"])
    manifest.write_table(storage.join(job.out, "cases.parquet"), cases, manifest.CASES_SCHEMA)
    manifest.write_table(storage.join(job.out, "rejects.parquet"), rejects, manifest.REJECTS_SCHEMA)
    if job.preview and cases:
        write_preview(cases[: job.preview], storage.join(job.out, "preview.png"), job.out)
    summary = {
        "source": job.source,
        "out": job.out,
        "written": len(cases),
        "rejected": len(rejects),
        "splits": {k: sum(1 for c in cases if c["split"] == k) for k, _ in job.splits},
        "seconds": round(time.time() - t0, 2),
    }
    storage.atomic_write_bytes(storage.join(job.out, "prepare_summary.json"), json.dumps(summary, indent=2).encode())
    return summary
