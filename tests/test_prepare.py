"""prepare: phantoms and a directory of good + bad pairs through the real Ray Data job."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from fcas.io import manifest, nifti
from fcas.labels import default_schema
from fcas.pipeline.prepare import PrepareJob, run_prepare
from fcas.prepare import PrepareSettings, assign_splits, safe_case_id
from fcas.presets import load_preset
from tests.corpus import BAD_KINDS, write_corpus

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = default_schema()
TINY = load_preset("tiny")


def _settings(**kw):
    return PrepareSettings(shape=TINY.shape, spacing=TINY.spacing, **kw)


def test_directory_with_one_of_each_bad_kind(ray_local, tmp_path):
    kinds = write_corpus(tmp_path / "src", n_good=3)
    out = tmp_path / "out"
    job = PrepareJob(source=f"dir:{tmp_path / 'src'}", out=str(out), settings=_settings(max_voxels=10**8))
    summary = run_prepare(job)
    good = sorted(k for k, v in kinds.items() if v == "good")
    assert summary["written"] == len(good) == 3
    assert summary["rejected"] == len(BAD_KINDS) + 1  # + the orphan image
    cases = manifest.read_cases(str(out / "cases.parquet")).to_pylist()   # files relative to out, resolved
    assert sorted(r["case_id"] for r in cases) == good
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    by_key = {Path(r["source"]).name.split("_")[0]: r["reason"] for r in rejects}
    assert set(by_key) == set(BAD_KINDS) | {"orphan"}
    for key, fragment in BAD_KINDS.items():
        reason = by_key[key]
        assert fragment in reason.lower(), (key, reason)
        assert "\n" not in reason and key in reason  # one line, naming the file
    assert "no label file" in by_key["orphan"]
    # written cases are on the preset grid, in RAS, with every cardiac class
    for row in cases:
        img = nib.load(row["image_uri"])
        assert img.shape == TINY.shape
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        lab = np.asarray(nib.load(row["label_uri"]).dataobj)
        assert set(SCHEMA.cardiac_ids) <= set(np.unique(lab).tolist())
    # nothing half-written: only the good cases' files exist, and no temporary names
    files = sorted(p.name for p in (out / "cases").iterdir())
    assert files == sorted(f"{k}_{t}.nii.gz" for k in good for t in ("image", "label"))


def test_reorientation_keeps_anatomy(ray_local, tmp_path):
    """good1 is stored flipped (LPS-like); after prepare its heart lies where good1's RAS twin's would."""
    write_corpus(tmp_path / "src", n_good=2)
    out = tmp_path / "out"
    run_prepare(PrepareJob(source=str(tmp_path / "src"), out=str(out), settings=_settings()))
    lab = np.asarray(nib.load(out / "cases" / "good1_label.nii.gz").dataobj)
    # the LV-to-RV direction in voxel space must match the unflipped twin's after reorientation
    lv = np.argwhere(lab == SCHEMA.id("left_ventricle")).mean(0)
    rv = np.argwhere(lab == SCHEMA.id("right_ventricle")).mean(0)
    twin = np.asarray(nib.load(out / "cases" / "good0_label.nii.gz").dataobj)
    lv0 = np.argwhere(twin == SCHEMA.id("left_ventricle")).mean(0)
    rv0 = np.argwhere(twin == SCHEMA.id("right_ventricle")).mean(0)
    assert np.sign(lv[0] - rv[0]) == np.sign(lv0[0] - rv0[0])
    assert np.sign(lv[1] - rv[1]) == np.sign(lv0[1] - rv0[1])


@pytest.mark.parametrize("n", [1, 7, 50, 101])
def test_assign_splits_exact_and_deterministic(n):
    ids = [f"c{i}" for i in range(n)]
    fr = {"train": 0.2, "template": 0.05, "reference": 0.75}
    a = assign_splits(ids, fr, seed=3)
    assert a == assign_splits(list(reversed(ids)), fr, seed=3)
    counts = {k: sum(v == k for v in a.values()) for k in fr}
    assert sum(counts.values()) == n
    assert all(abs(counts[k] - fr[k] * n) < 1 for k in fr)


def test_bad_split_fractions_and_case_ids():
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(["a"], {"train": 0.5, "test": 0.2}, 0)
    assert safe_case_id("../../etc/pass wd.nii.gz") == "pass_wd"
    with pytest.raises(ValueError):
        safe_case_id("...")


def test_cli_writes_phantom_cases_on_the_preset_grid(ray_local, tmp_path):
    """``jobs/prepare.py`` with overrides, joined to the session's Ray (ray.address=...) like a job on a
    running cluster: the summary line, the cases on the preset grid with their splits, the preview."""
    import ray

    out = tmp_path / "cases"
    proc = subprocess.run(
        [sys.executable, "jobs/prepare.py", "source=phantom:6", f"out={out}", "preset=tiny",
         "splits.train=0.5", "splits.template=0.2", "splits.reference=0.2", "splits.test=0.1",
         f"ray.address={ray.get_runtime_context().gcs_address}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepare: 6 cases written, 0 rejected" in proc.stdout
    assert set(pq.read_table(out / "cases.parquet").column("image_uri").to_pylist()) == {
        f"cases/phantom_{i:05d}_image.nii.gz" for i in range(6)}                   # stored relative to out
    table = manifest.read_cases(str(out / "cases.parquet")).to_pylist()
    assert [r["case_id"] for r in table] == [f"phantom_{i:05d}" for i in range(6)]
    assert sorted(r["split"] for r in table) == ["reference", "template", "test", "train", "train", "train"]
    for row in table:
        img, lab = nifti.read_nifti(row["image_uri"]), nifti.read_nifti(row["label_uri"])
        assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
        assert img.array.shape == lab.array.shape == TINY.shape == tuple(row["shape"])
        assert np.allclose(img.spacing, TINY.spacing) and np.allclose(row["spacing"], TINY.spacing)
        counts = dict(row["class_voxels"])
        assert all(counts[n] > 0 for n in SCHEMA.cardiac), counts
        assert counts["coronary_arteries"] == int((lab.array == 8).sum())
    assert pq.read_table(out / "rejects.parquet").num_rows == 0
    assert json.loads((out / "prepare_summary.json").read_text())["written"] == 6
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_disk_full_while_preparing_fails_the_job_instead_of_becoming_a_reject(tmp_path, monkeypatch):
    """ENOSPC (a storage error, not a problem of the case) is retried with backoff, then the case's row
    is fatal and names the file; a transient error that goes away costs nothing; a bad case is still a
    reject. (PrepareCase in-process: the injected write error cannot reach Ray's worker processes.)"""
    import errno

    from fcas.io import storage
    from fcas.pipeline.prepare import PrepareCase

    tiny = load_preset("tiny")
    job = PrepareJob(source="phantom:2", out=str(tmp_path / "lib"),
                     settings=PrepareSettings(shape=tiny.shape, spacing=tiny.spacing), io_tries=3, io_delay=0.01)
    real_write = nifti.write_nifti
    calls = []

    def full_disk(uri, *a, **k):
        calls.append(uri)
        raise OSError(errno.ENOSPC, f"No space left on device (writing {uri})")

    monkeypatch.setattr(nifti, "write_nifti", full_disk)
    item = {"kind": "phantom", "seed": 0, "image_uri": "", "case_id": "phantom_0000", "labels": "{}"}
    r = PrepareCase(job)(item)
    assert r["fatal"] and not r["ok"] and len(calls) == 3                  # 3 tries, then the job must fail
    assert r["reason"].startswith("phantom:0: storage error after 3 tries: OSError: [Errno 28] No space left")
    assert "phantom_00000" in r["reason"]                                   # names the file it could not write
    flaky = iter([OSError(errno.EIO, "Input/output error")])

    def once_then_fine(uri, *a, **k):
        err = next(flaky, None)
        if err is not None:
            raise err
        return real_write(uri, *a, **k)

    monkeypatch.setattr(nifti, "write_nifti", once_then_fine)
    ok = PrepareCase(job)(item)
    assert ok["ok"] and not ok["fatal"] and Path(job.out, json.loads(ok["row"])["image_uri"]).exists()
    monkeypatch.setattr(nifti, "write_nifti", real_write)
    bad = PrepareCase(job)({"kind": "file", "seed": 0, "image_uri": str(tmp_path / "missing_image.nii.gz"),
                            "case_id": "missing", "labels": json.dumps({"label": str(tmp_path / "x.nii.gz")})})
    assert not bad["ok"] and not bad["fatal"]                              # an input problem: a reject
    with pytest.raises(storage.StorageError, match="disk: storage error after 2 tries"):
        storage.retry_io(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), "disk", tries=2,
                         base_delay=0)
    with pytest.raises(PermissionError):                                   # not transient: at once
        storage.retry_io(lambda: (_ for _ in ()).throw(PermissionError(13, "denied")), "x", tries=5, base_delay=10)


def test_a_storage_error_ends_a_job_with_one_line_and_status_1(capsys):
    from fcas.io.storage import StorageError
    from fcas.cli import user_errors

    @user_errors("prepare")
    def main(cfg):
        raise StorageError("phantom:3: storage error after 4 tries: OSError: [Errno 28] No space left on device")

    with pytest.raises(SystemExit) as ex:
        main({})
    assert ex.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "prepare: phantom:3: storage error after 4 tries: OSError: [Errno 28] No space left on device"]


def test_a_disk_full_on_ray_workers_fails_prepare_and_publishes_no_library(ray_local, tmp_path):
    """Through Ray: phantom case 3 hits ENOSPC on every try, case 1 an EIO once. The EIO is retried away;
    the ENOSPC fails the job with one line naming the file, and no cases.parquet (a smaller library) appears.
    Without the disk-full case all 6 cases are written and none is rejected."""
    from fcas.io.storage import StorageError
    from fcas.synthesis.faults import FaultPlan

    tiny = load_preset("tiny")
    settings = PrepareSettings(shape=tiny.shape, spacing=tiny.spacing)
    out = tmp_path / "lib"
    faults = FaultPlan(marker_dir=str(tmp_path / "markers"), disk_full_ids=(3,), io_error_once_ids=(1,))
    with pytest.raises(StorageError, match=r"^phantom:3: storage error after 3 tries: OSError: \[Errno 28\] "
                                           r"No space left on device \(writing .*/cases/phantom_00003_image"):
        run_prepare(PrepareJob(source="phantom:6", out=str(out), settings=settings, preview=0, io_tries=3,
                               io_delay=0.01, faults=faults))
    assert not (out / "cases.parquet").exists() and not (out / "rejects.parquet").exists()
    ok = tmp_path / "lib-ok"
    summary = run_prepare(PrepareJob(source="phantom:6", out=str(ok), settings=settings, preview=0, io_tries=3,
                                     io_delay=0.01, faults=FaultPlan(marker_dir=str(tmp_path / "m2"),
                                                                     io_error_once_ids=(1,))))
    assert summary["written"] == 6 and summary["rejected"] == 0
    assert pq.read_table(ok / "cases.parquet").num_rows == 6
    assert (tmp_path / "m2" / "io-1").exists()          # the EIO really happened once, and was retried
