"""The writer stage: files of each finished sample, then one manifest shard for the batch.

:class:`WriterStage` is a plain callable for ``map_batches`` (CPU tasks). For every row it writes
the image (int16 HU), label (uint8), confidence (float32) NIfTI files and an optional tri-planar
preview, all named from the sample id and written atomically; only when every file of the batch
exists does it write the batch's manifest shard (``out/manifest/part-*.parquet``), whose URIs are
relative to ``out`` (:func:`fcas.synthesis.outputs.sample_paths`: the run stays readable when moved). A sample whose
MGM QC still failed after its bounded tries, or whose sampler output was not finite, goes to
``out/rejects/`` with its reason instead. Returns one small row per sample for the driver's count.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from fcas.synthesis.faults import FaultPlan, InjectedFault
from fcas.synthesis.outputs import SAMPLE_REJECTS_SCHEMA, sample_paths, write_sample, write_shard

__all__ = ["WriterStage", "reject_reason"]

_TIMING_KEYS = ("mgm_read_s", "mgm_deform_s", "mgm_qc_s", "sample_s", "decode_s", "ssv_s")


def reject_reason(batch: Mapping[str, np.ndarray], i: int) -> str:
    """Why row ``i`` must not become a sample ('' if it is fine)."""
    err = str(batch["mgm_error"][i]) if "mgm_error" in batch else ""
    if err:
        return f"MGM failed: {err}"
    err = str(batch["sampler_error"][i]) if "sampler_error" in batch else ""
    if err:
        return err
    if "qc_passed" in batch and float(batch["qc_passed"][i]) < 1.0:
        tries = int(batch["mgm_tries"][i]) if "mgm_tries" in batch else 0
        why = str(batch["qc_failures"][i]) if "qc_failures" in batch else "QC failed"
        return f"MGM QC failed after {tries} tries: {why}"
    return ""


class WriterStage:
    """``map_batches`` callable: sampler output batch -> ``{sample_id, status}`` per row."""

    def __init__(self, out: str, sampler_json: str, config_hash: str, preview: bool = True,
                 faults: FaultPlan | None = None, threads: int = 1):
        self.faults = faults
        self.threads = max(1, int(threads))
        self.out = out
        self.sampler_json = sampler_json
        self.config_hash = config_hash
        self.preview = preview

    def _preview(self, image, label, conf, affine, sample_id) -> bytes | None:
        if not self.preview:
            return None
        from fcas.preview import sample_png

        return sample_png(image, label, conf, None, title=f"sample {sample_id}", affine=affine)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, rejects, status = [], [], []
        mgm_keys = sorted(k for k in batch if k.startswith("mgm_") and k not in _TIMING_KEYS
                          and k not in ("mgm_config", "mgm_tries", "mgm_fallback", "mgm_error"))
        qc_keys = sorted(k for k in batch if k.startswith("qc_") and k != "qc_failures")
        for i in range(len(batch["sample_id"])):
            sid = int(batch["sample_id"][i])
            reason = reject_reason(batch, i)
            if reason:
                rejects.append({"sample_id": sid, "stage": "sampler" if reason.startswith("sampler") else "mgm",
                                "reason": reason})
                status.append("rejected")
                continue
            t0 = time.perf_counter()
            image, label, conf, affine = batch["image"][i], batch["label"][i], batch["confidence"][i], batch["affine"][i]
            if self.faults is not None and self.faults.writer_should_fail(sid):
                write_sample(self.out, sid, image, label, conf, affine, None)
                raise InjectedFault(f"injected writer failure for sample {sid} after its files were written")
            uris = write_sample(self.out, sid, image, label, conf, affine,
                                self._preview(image, label, conf, affine, sid), threads=self.threads)
            timings = {k: float(batch[k][i]) for k in _TIMING_KEYS if k in batch}
            timings["write_s"] = time.perf_counter() - t0
            if "sampled_at" in batch:   # wall-clock instants (s): sampled, and (below) durable in the manifest
                timings["sampled_at"] = float(batch["sampled_at"][i])
            rows.append({
                "sample_id": sid,
                "seed": int(batch["seed"][i]),
                "template_id": str(batch["template_id"][i]),
                "reference_id": str(batch["reference_id"][i]),
                "mgm": {k[4:]: float(batch[k][i]) for k in mgm_keys},
                "qc": {k[3:]: float(batch[k][i]) for k in qc_keys},
                "mgm_tries": int(batch["mgm_tries"][i]) if "mgm_tries" in batch else 1,
                "sampler": self.sampler_json,
                "checkpoint_digest": str(batch["checkpoint_digest"][i]),
                "config_hash": self.config_hash,
                **sample_paths(sid, preview=uris["preview_uri"] is not None),   # relative to out
                "timings": timings,
            })
            status.append("written")
        # rows only after every file of the batch exists; rejects beside them
        written_at = time.time()   # the batch's files exist (its shard follows): one instant for the batch
        for r in rows:
            r["timings"]["written_at"] = written_at
        write_shard(self.out, rows)
        write_shard(self.out, rejects, schema=SAMPLE_REJECTS_SCHEMA, folder="rejects")
        done = np.full(len(status), time.time())   # when the batch's rows became durable (for rates)
        return {"sample_id": np.asarray(batch["sample_id"], dtype=np.int64),
                "status": np.asarray(status, dtype=object), "finished_at": done}
