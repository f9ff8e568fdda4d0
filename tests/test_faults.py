"""Fault injection on the synthesis job (tiny preset, local Ray): killed sampler actor, killed driver,
a writer that fails once per sample (output on S3), and deterministic per-sample failures.

Each test ends with the same audit: exactly the requested sample ids, each once, in the manifest or
the rejects; every file under ``samples/`` belongs to a manifest row, none is a temporary, and every
one reads back whole.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray

from fcas.io import manifest, nifti, storage
from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
from fcas.presets import load_preset
from fcas.synthesis.faults import FaultPlan
from fcas.synthesis.outputs import SAMPLE_REJECTS_SCHEMA, read_run_manifest
from fcas.synthesis.sampler import SamplerSettings
from tests.procs import pids_matching

ROOT = Path(__file__).resolve().parent.parent
TINY = load_preset("tiny")


def _job(out, ckpt, templates, n, steps=4, faults=None, **kw):
    return SynthesisJob(n=n, out=str(out), checkpoint=ckpt, templates=templates, shape=TINY.shape,
                        spacing=TINY.spacing, sampler=SamplerSettings(steps=steps, ssv_every=1), preview=False,
                        resources=Resources(writer_batch_size=2), config_hash="faults", faults=faults, **kw)


def _audit(out: str, n: int) -> tuple[list[int], list[int]]:
    """(written ids, rejected ids) after checking the run's invariants."""
    rows = read_run_manifest(out).to_pylist()
    written = sorted(r["sample_id"] for r in rows)
    assert len(written) == len(set(written)), "duplicate rows after dedup"
    rej_uri = storage.join(out, "rejects")
    rejected = sorted({r["sample_id"] for r in manifest.read_table(rej_uri, schema=SAMPLE_REJECTS_SCHEMA).to_pylist()}
                      - set(written)) if storage.exists(rej_uri) else []
    assert sorted(written + rejected) == list(range(n))
    owned = {r[k].rsplit("/", 1)[-1] for r in rows for k in ("image_uri", "label_uri", "confidence_uri")}
    names = sorted(u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(storage.join(out, "samples")))
    assert [x for x in names if x.endswith(".tmp")] == [], "temporary files left"
    assert sorted(names) == sorted(owned), f"orphans: {sorted(set(names) - owned)}"
    for r in rows:
        for k in ("image_uri", "label_uri", "confidence_uri"):
            assert nifti.read_nifti(r[k]).shape == TINY.shape
    return written, rejected


def test_killed_sampler_actor_is_restarted_and_the_run_completes(ray_local, tiny_checkpoint, tiny_templates, tmp_path):
    out = tmp_path / "kill-actor"
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            shards = list((out / "manifest").glob("part-*.parquet")) if (out / "manifest").exists() else []
            pids = pids_matching("MapBatches(SamplerStage)", os.getpid())   # ours only
            if shards and pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_synthesis(_job(out, tiny_checkpoint, tiny_templates, 6, steps=6), progress=False)
    t.join(timeout=5)
    assert killed, "the sampler actor was never seen running after the first shard"
    written, rejected = _audit(str(out), 6)
    assert summary["n_written"] == len(written) and len(written) + len(rejected) == 6
    assert len(written) >= 4      # tiny phantoms at seed 0: MGM QC passes for all but rare draws


def test_killed_driver_then_rerun_gives_exactly_n(ray_local, tiny_checkpoint, tiny_templates, tmp_path):
    out = tmp_path / "kill-driver"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "jobs/synthesize.py", "preset=tiny", "n=6", f"out={out}", f"checkpoint={tiny_checkpoint}",
           "sampler.steps=6", "ssv.every=1", f"templates={tiny_templates}", "preview=false", "progress=false",
           "resources.writer_batch_size=2", f"ray.address={address}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest").exists() and list((out / "manifest").glob("part-*.parquet")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_run_manifest(str(out)).num_rows
    assert 1 <= before < 6
    # whatever the killed run left under a final name is whole (atomic writes)
    for f in (out / "samples").iterdir():
        if not f.name.startswith("."):
            assert nifti.read_nifti(str(f)).shape == TINY.shape
    time.sleep(2)   # Ray reaps the dead driver's workers
    # the same command again: the CLI (overrides, joined to a running Ray) finishes what is missing
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synthesize: " in proc.stdout and "/6 samples" in proc.stdout
    again = json.loads((out / "summary.json").read_text())
    written, rejected = _audit(str(out), 6)
    assert again["n_requested"] == 6
    assert again["n_written"] == len(written) and again["n_written_this_run"] == len(written) - before


def test_failing_writer_is_retried_and_a_failing_sample_is_rejected(ray_local, tiny_checkpoint, tiny_templates,
                                                                     tmp_path, s3_uri):
    """(c) every sample's first write raises after writing its image (retried, nothing lost), and
    sample 1 raises in the sampler on every try (a reject with its reason after 2 tries). The output is
    on the S3 server (d): a retried write there must not leave a second object either; the local
    backend's temporaries are checked by (a) and (b)."""
    out = f"{s3_uri}/faults"
    faults = FaultPlan(marker_dir=str(tmp_path / "markers"), writer_fail_once=True, sampler_error_ids=(1,))
    summary = run_synthesis(_job(out, tiny_checkpoint, tiny_templates, 5, faults=faults), progress=False)
    written, rejected = _audit(out, 5)
    assert 1 in rejected and 1 not in written and len(written) >= 3
    # one writer marker per sample the writer saw (the rejected one never reaches a write)
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == [f"writer-{i}" for i in sorted(written)]
    reasons = {r["sample_id"]: r["reason"] for r in
               manifest.read_table(storage.join(out, "rejects"), schema=SAMPLE_REJECTS_SCHEMA).to_pylist()}
    assert reasons[1].startswith("sampler failed after 2 tries: InjectedFault: injected sampler failure")
    assert summary["n_written"] == len(written) and summary["n_rejected"] == len(rejected)
    # a rerun tries the rejected id again (it fails the same way) and counts each reject once
    again = run_synthesis(_job(out, tiny_checkpoint, tiny_templates, 5, faults=faults), progress=False)
    assert again["n_written"] == len(written) and again["n_rejected"] == len(rejected)
    assert again["n_written_this_run"] == 0 and _audit(out, 5)[1] == rejected
