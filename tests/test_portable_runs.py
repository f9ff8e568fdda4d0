"""Portable runs (issue 17, item 3): a synthesis run copied elsewhere (another folder, S3) still reads,
exports, lists and loads from its new place; an old absolute-URI manifest still reads; an export
left without training cases fails with one line and exit 2."""
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fcas.export.nnunet import ExportSettings, export_nnunet
from fcas.io import manifest, storage
from fcas.synthesis.datalist import run_datalist, run_dataset, write_datalist
from fcas.phantom import make_case
from fcas.synthesis.outputs import (SYNTHESIS_SCHEMA, URI_COLUMNS, finished_ids, read_run_manifest, sample_name,
                                    write_sample, write_shard)
from fcas.synthesis.writer import WriterStage

ROOT = Path(__file__).resolve().parent.parent
SHAPE, SPACING = (32, 32, 32), (4.0, 4.0, 4.0)
N = 4
FILES = ("image_uri", "label_uri", "confidence_uri")


def _batch(ids) -> dict:
    """What the sampler hands the writer for ``ids`` (phantoms stand in for sampled volumes)."""
    cases = [make_case(i, shape=SHAPE, spacing=SPACING) for i in ids]
    rng = np.random.default_rng(0)
    return {"sample_id": np.asarray(ids, dtype=np.int64), "seed": np.asarray(ids, dtype=np.int64),
            "template_id": np.asarray([f"tpl{i % 2}" for i in ids], dtype=object),
            "reference_id": np.asarray(["ref0"] * len(ids), dtype=object),
            "checkpoint_digest": np.asarray(["d" * 8] * len(ids), dtype=object),
            "image": np.stack([c.image for c in cases]), "label": np.stack([c.label for c in cases]),
            "confidence": rng.random((len(ids), *SHAPE)).astype(np.float32),
            "affine": np.stack([c.affine for c in cases])}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run of N samples written by the real writer stage (two batches, two shards), without Ray."""
    out = tmp_path_factory.mktemp("portable") / "run"
    writer = WriterStage(str(out), sampler_json="{}", config_hash="test", preview=True)
    writer(_batch([0, 1]))
    writer(_batch([2, 3]))
    return out


@pytest.fixture(scope="module")
def moved(run, tmp_path_factory) -> Path:
    """The run copied to another folder (tests rename the original away while they read the copy)."""
    dest = tmp_path_factory.mktemp("elsewhere") / "copy"
    shutil.copytree(run, dest)
    return dest


@pytest.fixture
def on_s3(run, s3_uri) -> str:
    """The run uploaded to the session's moto S3 server."""
    fs, path = storage.get_fs(s3_uri)
    fs.put(str(run) + "/", path, recursive=True)
    return s3_uri


def test_the_writer_stores_uris_relative_to_the_run(run):
    table = read_run_manifest(str(run), resolve=False)
    assert table.num_rows == N
    for r in table.to_pylist():
        name = sample_name(r["sample_id"])
        assert r["image_uri"] == f"samples/{name}_image.nii.gz"
        assert r["confidence_uri"] == f"samples/{name}_confidence.nii.gz"
        assert r["preview_uri"] == f"samples/{name}_preview.png"
    shard = next((run / "manifest").glob("part-*.parquet"))
    assert pq.read_schema(shard).metadata[b"fcas.schema"] == b"synthesis/v2"


@contextlib.contextmanager
def _gone(run: Path):
    """The original folder renamed away for the duration of a check (restored after)."""
    away = run.with_name(run.name + "-away")
    run.rename(away)
    try:
        yield
    finally:
        away.rename(run)


def test_a_copied_folder_reads_exports_and_lists_from_its_new_place(run, moved, tmp_path):
    with _gone(run):
        rows = read_run_manifest(str(moved)).to_pylist()
        assert sorted(r["sample_id"] for r in rows) == list(range(N))
        for r in rows:
            for k in URI_COLUMNS:
                assert r[k].startswith(f"{moved}/samples/") and Path(r[k]).is_file(), (k, r[k])
        assert finished_ids(str(moved)) == set(range(N))

        s = export_nnunet(ExportSettings(out=str(tmp_path / "raw"), run=str(moved), folds=2, workers=2))
        assert s["numTraining"] == N and s["rejected"] == 0
        ds = json.loads(Path(s["dataset"], "dataset.json").read_text())
        assert ds["numTraining"] == N == len(list(Path(s["dataset"], "imagesTr").iterdir()))

        dl = run_datalist(moved)
        assert dl["numTraining"] == len(dl["training"]) == N
        assert [e["id"] for e in dl["training"]] == [sample_name(i) for i in range(N)]
        assert all(Path(e[k]).is_file() and e[k].startswith(str(moved)) for e in dl["training"]
                   for k in ("image", "label", "confidence"))

        item = run_dataset(moved)[1]
        assert item["id"] == sample_name(1)
        for k in ("image", "label", "confidence"):
            assert tuple(item[k].shape) == (1, *SHAPE), k
        assert set(np.unique(item["label"].numpy()).tolist()) <= set(range(12))
        assert 0.0 <= float(item["confidence"].min()) and float(item["confidence"].max()) <= 1.0
        np.testing.assert_allclose(item["image"].affine.numpy(), make_case(1, SHAPE, SPACING).affine, atol=1e-4)


def test_a_run_uploaded_to_s3_reads_exports_and_loads_there(run, on_s3, tmp_path):
    rows = read_run_manifest(on_s3).to_pylist()
    assert len(rows) == N and all(r[k].startswith(f"{on_s3}/samples/") for r in rows for k in URI_COLUMNS)
    assert all(storage.exists(r[k]) for r in rows for k in FILES)
    assert finished_ids(on_s3) == set(range(N))
    s = export_nnunet(ExportSettings(out=str(tmp_path / "raw"), run=on_s3, folds=2, workers=2))
    assert s["numTraining"] == N and s["rejected"] == 0
    dl = run_datalist(on_s3)["training"]
    assert len(dl) == N and all(storage.exists(e[k]) for e in dl for k in ("image", "label", "confidence"))
    item = run_dataset(on_s3, keys=("image", "confidence"))[0]
    assert tuple(item["image"].shape) == tuple(item["confidence"].shape) == (1, *SHAPE)
    local = run_dataset(run, keys=("image",))[0]["image"]
    assert np.array_equal(item["image"].numpy(), local.numpy())


def test_datalist_json_stays_valid_when_the_run_moves(run, tmp_path, capsys):
    from monai.data import load_decathlon_datalist

    from fcas.synthesis.datalist import main

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(run, first)
    main([str(first)])
    assert capsys.readouterr().out.strip() == f"datalist: {N} samples -> {first / 'datalist.json'}"
    doc = json.loads((first / "datalist.json").read_text())
    assert doc["numTraining"] == N and doc["training"][0]["image"] == "samples/s00000000_image.nii.gz"
    shutil.copytree(first, second)
    shutil.rmtree(first)
    items = load_decathlon_datalist(second / "datalist.json")   # MONAI resolves against the file's folder
    assert len(items) == N
    assert all(Path(e[k]).is_file() and e[k].startswith(str(second)) for e in items
               for k in ("image", "label", "confidence"))
    assert write_datalist(second) == (str(second / "datalist.json"), N)
    with pytest.raises(SystemExit) as exit_info:   # a folder without a run: one line, status 2
        main([str(first)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"datalist: synthesis run {first}: no manifest rows")


def test_an_old_manifest_with_absolute_uris_still_reads(run, tmp_path):
    """A v1 run (absolute URIs, written by hand as the old writer did) keeps its URIs; mixed with v2 rows too."""
    old = tmp_path / "old"
    rows = []
    for sid in (5, 6):
        c = make_case(sid, shape=SHAPE, spacing=SPACING)
        uris = write_sample(str(old), sid, c.image, c.label, np.full(SHAPE, 0.5), c.affine)
        assert Path(uris["image_uri"]).is_absolute()
        rows.append({"sample_id": sid, "seed": sid, "template_id": "tplA", "reference_id": "ref0", **uris})
    rows.append({**rows[0], "sample_id": 7, "image_uri": "s3://elsewhere/x_image.nii.gz"})
    write_shard(str(old), rows)
    shutil.copytree(run / "manifest", old / "manifest", dirs_exist_ok=True)   # + v2 rows naming samples/ files
    for f in (run / "samples").iterdir():
        shutil.copy(f, old / "samples" / f.name)
    got = {r["sample_id"]: r for r in read_run_manifest(str(old)).to_pylist()}
    assert got[5]["image_uri"] == rows[0]["image_uri"] and got[6]["label_uri"] == rows[1]["label_uri"]
    assert got[7]["image_uri"] == "s3://elsewhere/x_image.nii.gz" and got[5]["preview_uri"] is None
    assert got[0]["image_uri"] == str(old / "samples" / "s00000000_image.nii.gz")
    assert finished_ids(str(old)) == {0, 1, 2, 3, 5, 6}   # files matched by name; 7's image is not in samples/
    assert [e["id"] for e in run_datalist(old)["training"]] == [sample_name(i) for i in (0, 1, 2, 3, 5, 6, 7)]


def test_a_relative_uri_leading_out_of_the_run_is_refused(tmp_path):
    row = {"sample_id": 0, "seed": 0, "template_id": "t", "reference_id": "r", "image_uri": "../../etc/x.nii.gz",
           "label_uri": "samples/l.nii.gz", "confidence_uri": "samples/c.nii.gz"}
    write_shard(str(tmp_path), [row])
    with pytest.raises(ValueError, match=r"image_uri '\.\./\.\./etc/x\.nii\.gz' leads out of the root"):
        read_run_manifest(str(tmp_path))
    table = manifest.resolve_uris(SYNTHESIS_SCHEMA.empty_table(), tmp_path, URI_COLUMNS)
    assert table.num_rows == 0 and table.schema == SYNTHESIS_SCHEMA


def test_compaction_keeps_uris_as_stored(run, tmp_path):
    from fcas.synthesis.outputs import compact_run

    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    assert compact_run(str(dest), min_shards=2)["manifest"]["compacted"]
    assert sorted(read_run_manifest(str(dest), resolve=False).column("image_uri").to_pylist()) == [
        f"samples/{sample_name(i)}_image.nii.gz" for i in range(N)]


def test_an_export_without_training_cases_exits_2_with_one_line(run, tmp_path):
    """Every sample's files gone (a manifest copied without its samples): one line on stderr, status 2."""
    bare = tmp_path / "bare"
    shutil.copytree(run / "manifest", bare / "manifest")
    with pytest.raises(ValueError, match=rf"no training case could be exported: all {N} were rejected"):
        export_nnunet(ExportSettings(out=str(tmp_path / "raw"), run=str(bare), folds=2))
    root = tmp_path / "raw" / "Dataset501_FCaS"
    assert len(json.loads((root / "rejects.json").read_text())) == N and not (root / "dataset.json").exists()

    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export_nnunet.py"), f"run={bare}",
                           f"out={tmp_path / 'raw2'}", "folds=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_nnunet: no training case could be exported"), lines


# ---- resume from a moved folder: the session's tiny Ray run, copied ------------------------------------------
def test_a_moved_run_resumes_with_nothing_to_do(tiny_run12, ray_local, tiny_checkpoint, tmp_path):
    from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
    from fcas.presets import load_preset
    from fcas.synthesis.sampler import SamplerSettings

    src, _ = tiny_run12
    dest = tmp_path / "moved"
    shutil.copytree(src, dest)
    assert finished_ids(str(dest)) == finished_ids(str(src)) == set(range(12))
    before = {p.name: p.stat().st_mtime_ns for p in (dest / "samples").iterdir()}
    tiny = load_preset("tiny")
    again = run_synthesis(SynthesisJob(n=12, out=str(dest), checkpoint=tiny_checkpoint, templates="phantom:4",
                                       shape=tiny.shape, spacing=tiny.spacing,
                                       sampler=SamplerSettings(steps=4, ssv_every=1),
                                       resources=Resources(writer_batch_size=3), config_hash="test"),
                          progress=False)
    assert again["n_written_this_run"] == 0 and again["n_written"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in (dest / "samples").iterdir()} == before
    rows = read_run_manifest(str(dest)).to_pylist()
    assert all(r[k].startswith(f"{dest}/samples/") for r in rows for k in FILES)


def test_a_run_moved_to_s3_resumes_there_with_nothing_to_do(tiny_run12, ray_local, tiny_checkpoint, s3_uri):
    """The 12-sample run (templates, run.json and all) uploaded to the moto S3 server: the same command
    pointed at the bucket makes 0 new samples, touches no sample object, and its manifest names the bucket."""
    from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
    from fcas.presets import load_preset
    from fcas.synthesis.sampler import SamplerSettings

    src, _ = tiny_run12
    fs, path = storage.get_fs(s3_uri)
    fs.put(str(src) + "/", path, recursive=True)
    before = {p: fs.info(p)["LastModified"] for p in fs.ls(f"{path}/samples")}
    tiny = load_preset("tiny")
    again = run_synthesis(SynthesisJob(n=12, out=s3_uri, checkpoint=tiny_checkpoint, templates="phantom:4",
                                       shape=tiny.shape, spacing=tiny.spacing,
                                       sampler=SamplerSettings(steps=4, ssv_every=1),
                                       resources=Resources(writer_batch_size=3), config_hash="test"),
                          progress=False)
    assert again["n_written_this_run"] == 0 and again["n_written"] == 12
    fs.invalidate_cache()
    assert {p: fs.info(p)["LastModified"] for p in fs.ls(f"{path}/samples")} == before
    rows = read_run_manifest(s3_uri).to_pylist()
    assert sorted(r["sample_id"] for r in rows) == list(range(12))
    assert all(r[k].startswith(f"{s3_uri}/samples/") for r in rows for k in FILES)
    assert not fs.exists(f"{path}/lease.json")
