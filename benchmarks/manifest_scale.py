"""Run start at n = 100,000 finished samples: today's 25,000-shard manifest vs the compacted layout.

    python benchmarks/manifest_scale.py [--rows 100000] [--rows-per-shard 4] [--s3-rows 10000] \
        [--json benchmarks/results/manifest_scale.json]

A synthetic run is built under a temporary folder: ``--rows`` manifest rows of the synthesis schema
(realistic strings, maps of MGM/QC/timing figures) in shards of ``--rows-per-shard`` (one writer
batch each, as ``resources.writer_batch_size: 4`` writes them), and one empty file per sample file
in ``samples/`` (what :func:`fcas.synthesis.outputs.finished_ids` lists).

* **old** run start, as the job did it before compaction: three serial reads of every shard (the
  checkpoint-digest check, ``finished_ids``, the end-of-run summary) and ``to_pylist`` of every row
  for the summary.
* **new**: :func:`fcas.io.manifest.compact` folds the shards into one file (timed on its own: during
  a run it happens every ``resources.compact_every`` samples, never all at once at start), then the
  run start reads the manifest once (parallel reads), ``finished_ids`` on that table, and the
  summary in Arrow (:func:`fcas.pipeline.synthesize._stage_totals`).

On S3 (a moto server started here, ``moto[server]``), ``--s3-rows`` rows are written in the same
shard size (uploading 25,000 objects to moto takes longer than the benchmark is worth): the old
read is timed on them and extrapolated linearly in the number of shards (every shard is one GET
plus one Parquet parse; the measured per-shard time is printed), the new one is timed on the real
compacted file of all ``--rows`` rows uploaded there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.io import manifest, storage  # noqa: E402
from fcas.pipeline.synthesize import _stage_totals  # noqa: E402
from fcas.synthesis.outputs import SYNTHESIS_SCHEMA, finished_ids, read_run_manifest, sample_name  # noqa: E402


def rows_for(ids, out: str) -> list[dict]:
    rows = []
    for i in ids:
        base = f"{out}/samples/{sample_name(i)}"
        rows.append({
            "sample_id": i, "seed": 1000003 * i % 2**31, "template_id": f"phantom-{i % 37:05d}",
            "reference_id": f"phantom-{(i * 7) % 113:05d}",
            "mgm": {"alpha": 1.0 + (i % 10) / 10, "sigma": 4.0, "pool": 3.0},
            "qc": {"dice_min": 0.9 + (i % 7) / 100, "components": 1.0},
            "mgm_tries": 1, "sampler": '{"steps": 20, "scheduler": "ddim", "ssv": {"mode": "image"}}',
            "checkpoint_digest": "2bc2fb6628b1" * 5, "config_hash": "9f1c" * 8,
            "image_uri": f"{base}_image.nii.gz", "label_uri": f"{base}_label.nii.gz",
            "confidence_uri": f"{base}_confidence.nii.gz", "preview_uri": f"{base}_preview.png",
            "timings": {"mgm_deform_s": 2.1, "sample_s": 9.9, "decode_s": 5.0, "write_s": 3.3},
        })
    return rows


def build_run(out: str, n: int, per_shard: int, sample_files: bool) -> None:
    for start in range(0, n, per_shard):
        ids = range(start, min(n, start + per_shard))
        manifest.write_table(storage.join(out, "manifest", f"part-{start:09d}.parquet"), rows_for(ids, out),
                             SYNTHESIS_SCHEMA)
    if sample_files:
        d = Path(out) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for k in ("image", "label", "confidence"):
                (d / f"{sample_name(i)}_{k}.nii.gz").touch()


def _serial_read(out: str) -> pa.Table:
    """The reader as it was: one shard after another."""
    uris = manifest._shard_uris(storage.join(out, "manifest"))
    tables = [manifest._conform(pq.read_table(pa.BufferReader(storage.read_bytes(u))), SYNTHESIS_SCHEMA, u)
              for u in uris]
    return manifest._dedup_last(pa.concat_tables(tables), "sample_id")


def old_start(out: str) -> dict:
    t0 = time.perf_counter()
    digests = set(_serial_read(out).column("checkpoint_digest").to_pylist())
    t1 = time.perf_counter()
    table = _serial_read(out)
    folder = storage.join(out, "samples")
    present = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(folder)} if storage.exists(folder) else set()
    done = sum(all(r[k].rsplit("/", 1)[-1] in present for k in ("image_uri", "label_uri", "confidence_uri"))
               for r in table.select(["image_uri", "label_uri", "confidence_uri"]).to_pylist())
    t2 = time.perf_counter()
    rows = _serial_read(out).to_pylist()
    stage: dict[str, float] = {}
    for row in rows:
        for k, v in row["timings"] or []:
            stage[k] = stage.get(k, 0.0) + v
    t3 = time.perf_counter()
    return {"digest_s": t1 - t0, "finished_ids_s": t2 - t1, "summary_s": t3 - t2, "total_s": t3 - t0,
            "finished": done, "digests": len(digests)}


def new_start(out: str) -> dict:
    t0 = time.perf_counter()
    table = read_run_manifest(out)
    digests = set(table.column("checkpoint_digest").unique().to_pylist())
    t1 = time.perf_counter()
    done = len(finished_ids(out, table))
    t2 = time.perf_counter()
    end = read_run_manifest(out)
    totals = _stage_totals(end)
    t3 = time.perf_counter()
    return {"read_s": t1 - t0, "finished_ids_s": t2 - t1, "summary_s": t3 - t2, "total_s": t3 - t0,
            "finished": done, "digests": len(digests), "stage_totals": totals}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_part(tmp_local: str, compacted_file: str, rows: int, per_shard: int, full_rows: int) -> dict:
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        fs.mkdir("fcas-bench")
        out = "s3://fcas-bench/run"
        t0 = time.perf_counter()
        build_run(out, rows, per_shard, sample_files=False)
        upload_s = time.perf_counter() - t0
        shards = -(-rows // per_shard)
        t0 = time.perf_counter()
        _serial_read(out)
        old_read = time.perf_counter() - t0
        per = old_read / shards
        full_shards = -(-full_rows // per_shard)
        storage.atomic_write_bytes("s3://fcas-bench/big/manifest/" + os.path.basename(compacted_file),
                                   Path(compacted_file).read_bytes())
        t0 = time.perf_counter()
        n_big = read_run_manifest("s3://fcas-bench/big").num_rows
        new_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_par = manifest.read_table(storage.join(out, "manifest"), schema=SYNTHESIS_SCHEMA).num_rows
        par_read = time.perf_counter() - t0
        return {"rows": rows, "shards": shards, "upload_s": upload_s, "old_serial_read_s": old_read,
                "old_s_per_shard": per, "old_start_extrapolated_s": 3 * per * full_shards,
                "parallel_read_same_shards_s": par_read, "parallel_rows": n_par,
                "new_read_compacted_s": new_read, "new_rows": n_big,
                "extrapolation": f"3 reads x {full_shards} shards x {per * 1e3:.1f} ms per shard"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rows-per-shard", type=int, default=4)
    ap.add_argument("--s3-rows", type=int, default=10_000, help="rows on the moto S3 server (0: skip S3)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="fcas_manifest_bench_")
    out = os.path.join(tmp, "run")
    try:
        t0 = time.perf_counter()
        build_run(out, a.rows, a.rows_per_shard, sample_files=True)
        shards = -(-a.rows // a.rows_per_shard)
        print(f"synthetic run: {a.rows} rows in {shards} shards + {3 * a.rows} sample files, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        old = old_start(out)
        print(f"old run start (3 serial reads + to_pylist): {old['total_s']:.1f} s "
              f"(digest {old['digest_s']:.1f}, finished ids {old['finished_ids_s']:.1f}, summary {old['summary_s']:.1f}); "
              f"{old['finished']} finished", flush=True)
        t0 = time.perf_counter()
        par = manifest.read_table(storage.join(out, "manifest"), schema=SYNTHESIS_SCHEMA).num_rows
        par_s = time.perf_counter() - t0
        print(f"parallel read of the same {shards} shards: {par_s:.1f} s ({par} rows)", flush=True)
        t0 = time.perf_counter()
        res = manifest.compact(storage.join(out, "manifest"), SYNTHESIS_SCHEMA, key="sample_id")
        compact_s = time.perf_counter() - t0
        size = os.path.getsize(res["file"])
        print(f"compaction of {res['shards_read']} shards into one file of {size / 1e6:.1f} MB: {compact_s:.1f} s", flush=True)
        new = new_start(out)
        ratio = old["total_s"] / new["total_s"]
        print(f"new run start (compacted, one read, Arrow summary): {new['total_s']:.2f} s "
              f"(read {new['read_s']:.2f}, finished ids {new['finished_ids_s']:.2f}, summary {new['summary_s']:.2f}); "
              f"{new['finished']} finished", flush=True)
        assert new["finished"] == old["finished"] == a.rows
        print(f"\nrun start, local: old / new = {ratio:.0f}x", flush=True)
        s3 = None
        if a.s3_rows:
            s3 = s3_part(tmp, res["file"], a.s3_rows, a.rows_per_shard, a.rows)
            print(f"S3 (moto): {s3['shards']} shards read serially in {s3['old_serial_read_s']:.1f} s "
                  f"({s3['old_s_per_shard'] * 1e3:.1f} ms a shard; in parallel {s3['parallel_read_same_shards_s']:.1f} s) "
                  f"-> old run start at {a.rows} rows ~{s3['old_start_extrapolated_s']:.0f} s ({s3['extrapolation']}); "
                  f"the compacted {s3['new_rows']}-row file reads in {s3['new_read_compacted_s']:.2f} s: "
                  f"~{s3['old_start_extrapolated_s'] / s3['new_read_compacted_s']:.0f}x")
        record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "rows": a.rows, "rows_per_shard": a.rows_per_shard, "shards": shards,
                  "old": old, "parallel_read_s": par_s, "compact_s": compact_s, "compacted_bytes": size,
                  "new": {k: v for k, v in new.items() if k != "stage_totals"}, "ratio_old_over_new": ratio, "s3": s3}
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(record, indent=1))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
