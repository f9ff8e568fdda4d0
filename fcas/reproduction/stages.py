"""The stage cache of the reproduction: each stage's result kept as ``<work>/stages/<name>.json`` under a key
of what it depends on, every run and skip appended to ``<work>/stage_log.jsonl``. Hand-written (a few lines
over :mod:`fcas.io.storage`)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Callable

from fcas.evaluation.report import json_safe, mean_sd
from fcas.io import storage
from fcas.reproduction.settings import ReproduceSettings

log = logging.getLogger(__name__)

__all__ = ["stage_key", "run_stage", "read_stage_log", "log_event", "mean_sd", "STAGE_LOG", "MEASUREMENT_VERSION",
           "STAGE_DEPENDENCIES", "NOT_A_DEPENDENCY"]

STAGE_LOG = "stage_log.jsonl"

MEASUREMENT_VERSION = 3   # 3: + the sub-volume FID; 2: Table 1 scored under the cardiac mask of M_A (1: the whole volume)


# What each stage's result depends on (fields of ReproduceSettings); every field is in one of these or in
# NOT_A_DEPENDENCY (a test holds that), so a new setting cannot silently reuse a stale result.
_DATA = ("preset", "shape", "spacing", "schema", "library_n", "library")
_REAL = ("n_train", "n_test", "real_offset", "pairs")    # the phantom seeds of Table 1, the seg and validation sets
STAGE_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "data": _DATA,
    "table1": _DATA + _REAL + ("site_size", "checkpoint", "mask_only_checkpoint", "table1_steps", "oracle_mean_n", "fid_resize"),
    "synthesis": _DATA + ("checkpoint", "syn_n", "syn_steps", "syn_seed", "ssv_every", "ssv_mode", "ssv_start",
                          "sampler_actors"),
}
STAGE_DEPENDENCIES["seg"] = tuple(dict.fromkeys(STAGE_DEPENDENCIES["synthesis"] + _REAL + (
    "n_val", "real_domain", "segnet", "pretrain_steps", "finetune_steps", "batch_size", "crop", "lr", "finetune_lr",
    "augment", "val_every", "patience", "rdice_radius", "seg_amp_dtype")))
NOT_A_DEPENDENCY = ("work", "results", "plots", "scale", "seeds", "threads", "stop_after")   # seeds: in stage names


def stage_key(s: ReproduceSettings, stage: str) -> str:
    """What ``stage``'s result depends on (``data``, ``table1`` -- its seeds and the oracles --, ``synthesis``,
    ``seg``): the settings of :data:`STAGE_DEPENDENCIES`, the digests of the checkpoints among them and
    :data:`MEASUREMENT_VERSION`. So a change to the segmentation settings reruns the segmentation arms only,
    and a new mask-only checkpoint reruns Table 1 only."""
    from fcas.models.checkpoint import checkpoint_digest, config_hash

    if stage not in STAGE_DEPENDENCIES:
        raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGE_DEPENDENCIES)}")
    fields = STAGE_DEPENDENCIES[stage]
    d = {k: v for k, v in asdict(s).items() if k in fields}
    digests = {}
    for name in ("checkpoint", "mask_only_checkpoint"):
        if name not in fields:
            continue
        try:
            digests[name] = checkpoint_digest(getattr(s, name))
        except (OSError, ValueError):
            digests[name] = None   # a missing checkpoint fails in the stage that loads it
    return config_hash({"stage": stage, "settings": json_safe(d), "digests": digests, "version": MEASUREMENT_VERSION})


def log_event(work: str, row: dict) -> None:
    uri = storage.join(work, STAGE_LOG)
    old = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
    storage.atomic_write_bytes(uri, (old + json.dumps(row, sort_keys=True) + "\n").encode())


def read_stage_log(work: str) -> list[dict]:
    uri = storage.join(work, STAGE_LOG)
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


def run_stage(work: str, name: str, fn: Callable[[], dict], key: str | None = None, clean: str | None = None) -> dict:
    """Run ``fn`` once: its result (with ``seconds``) is kept as ``<work>/stages/<name>.json``.

    ``key`` names what the result depends on (:func:`stage_key`: settings, checkpoint digests, the
    measurement code's version); a kept result with another key is stale and is computed again,
    after removing ``clean`` (the stage's own output folder, which would otherwise be resumed).
    """
    uri = storage.join(work, "stages", f"{name}.json")
    if storage.exists(uri):
        rec = json.loads(storage.read_bytes(uri))
        if rec.get("key") == key:
            log_event(work, {"stage": name, "event": "cached", "seconds": 0.0, "at": time.time()})
            log.info("reproduce: stage %s cached (%.1f s when it ran)", name, rec["seconds"])
            return rec
        log_event(work, {"stage": name, "event": "stale", "seconds": 0.0, "at": time.time()})
        log.info("reproduce: stage %s was computed with other settings or checkpoints; running it again", name)
        if clean and storage.exists(clean):
            storage.remove(clean, recursive=True)
    log.info("reproduce: stage %s ...", name)
    t0 = time.perf_counter()
    result = fn()
    rec = {"stage": name, "seconds": round(time.perf_counter() - t0, 2), "key": key, "result": json_safe(result)}
    storage.atomic_write_bytes(uri, json.dumps(rec, indent=1).encode())
    log_event(work, {"stage": name, "event": "ran", "seconds": rec["seconds"], "at": time.time()})
    log.info("reproduce: stage %s done in %.1f s", name, rec["seconds"])
    return rec
