"""The synthesis job end to end on local Ray at the tiny preset (real Ray Data, real checkpoint)."""
import json
from pathlib import Path

import numpy as np
import pytest

from fcas.io import nifti, storage
from fcas.labels import default_schema
from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
from fcas.presets import load_preset
from fcas.synthesis.outputs import read_run_manifest
from fcas.synthesis.sampler import SamplerSettings

ROOT = Path(__file__).resolve().parent.parent
TINY = load_preset("tiny")
SCHEMA = default_schema()


def _job(out, ckpt, n, templates="phantom:4", **kw):
    return SynthesisJob(n=n, out=str(out), checkpoint=ckpt, templates=templates, shape=TINY.shape,
                        spacing=TINY.spacing, sampler=SamplerSettings(steps=4, ssv_every=1),
                        resources=Resources(writer_batch_size=3), config_hash=kw.pop("config_hash", "test"), **kw)


def _files(out) -> list[str]:
    return sorted(p.name for p in Path(out, "samples").iterdir())


@pytest.fixture(scope="module")
def run12(tiny_run12):
    """The session's 12-sample run (conftest): the same settings as :func:`_job` with n=12."""
    return tiny_run12


def test_twelve_samples_end_to_end(run12):
    out, summary = run12
    table = read_run_manifest(str(out))
    rows = table.to_pylist()
    # every draw is seeded by (run seed, id), so this run's MGM QC outcome is fixed: all 12 pass
    assert summary["n_rejected"] == 0
    assert sorted(r["sample_id"] for r in rows) == list(range(12))
    assert summary["n_written"] == len(rows) == 12
    tmpl = nifti.read_nifti(str(out / "templates" / "cases" / f"{rows[0]['template_id']}_image.nii.gz"))
    for r in rows:
        img, lab, cm = (nifti.read_nifti(r[k]) for k in ("image_uri", "label_uri", "confidence_uri"))
        assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8 and cm.array.dtype == np.float32
        assert img.shape == lab.shape == cm.shape == TINY.shape
        np.testing.assert_allclose(img.affine, tmpl.affine, atol=1e-6)
        assert set(np.unique(lab.array).tolist()) <= {0, *SCHEMA.cardiac_ids}
        assert 0.0 <= cm.array.min() and cm.array.max() <= 1.0
        assert Path(r["preview_uri"]).read_bytes()[:4] == b"\x89PNG"
        assert r["checkpoint_digest"] and r["config_hash"] == "test"
        assert set(dict(r["timings"])) >= {"sample_s", "mgm_deform_s", "write_s"}
        assert dict(r["qc"])["passed"] == 1.0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_requested"] == 12 and s["n_written"] == len(rows)
    # every file in samples/ belongs to a manifest row: no orphans, no temporary names
    expected = sorted(Path(r[k]).name for r in rows for k in ("image_uri", "label_uri", "confidence_uri", "preview_uri"))
    assert _files(out) == expected


def test_rerun_does_nothing_and_is_deterministic(run12, ray_local, tiny_checkpoint, tmp_path):
    out, _ = run12
    before = {p: p.stat().st_mtime_ns for p in Path(out, "samples").iterdir()}
    again = run_synthesis(_job(out, tiny_checkpoint, 12), progress=False)
    assert again["n_written_this_run"] == 0
    assert {p: p.stat().st_mtime_ns for p in Path(out, "samples").iterdir()} == before
    # a fresh run with the same config (and the same template library) gives bit-identical outputs
    other = tmp_path / "again"
    run_synthesis(_job(other, tiny_checkpoint, 3, templates=str(out / "templates" / "cases.parquet")), progress=False)
    rows = {r["sample_id"]: r for r in read_run_manifest(str(out)).to_pylist()}
    for r in read_run_manifest(str(other)).to_pylist():
        for k in ("image_uri", "label_uri", "confidence_uri"):
            a, b = nifti.read_nifti(r[k]).array, nifti.read_nifti(rows[r["sample_id"]][k]).array
            assert np.array_equal(a, b), (r["sample_id"], k)


def test_synthesis_to_s3(ray_local, tiny_checkpoint, tiny_templates, s3_uri):
    """Output to s3:// on the session's moto server: rows, files, readable NIfTI, no temporaries, resume."""
    out = f"{s3_uri}/run"
    summary = run_synthesis(_job(out, tiny_checkpoint, 3, templates=tiny_templates, preview=False), progress=False)
    rows = read_run_manifest(out).to_pylist()
    assert summary["n_written"] + summary["n_rejected"] == 3
    assert sorted(r["sample_id"] for r in rows) == sorted(set(r["sample_id"] for r in rows))
    assert len(rows) == summary["n_written"] >= 2
    for r in rows:
        assert r["image_uri"].startswith(out + "/samples/") and r["preview_uri"] is None
        img, lab, cm = (nifti.read_nifti(r[k]) for k in ("image_uri", "label_uri", "confidence_uri"))
        assert img.shape == lab.shape == cm.shape == TINY.shape
        assert set(np.unique(lab.array).tolist()) <= {0, *SCHEMA.cardiac_ids}
    names = sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(f"{out}/samples"))
    assert names == sorted(r[k].rsplit("/", 1)[-1] for r in rows for k in ("image_uri", "label_uri", "confidence_uri"))
    assert json.loads(storage.read_bytes(f"{out}/summary.json"))["n_requested"] == 3
    again = run_synthesis(_job(out, tiny_checkpoint, 3, templates=tiny_templates, preview=False), progress=False)
    assert again["n_written_this_run"] == 0 and again["n_written"] == len(rows)


def test_one_run_never_mixes_checkpoints(run12, tiny_checkpoint, tiny_templates, tmp_path):
    """A digest given in the config, or the one a run's rows were made with, is insisted on."""
    import shutil

    with pytest.raises(ValueError, match="checkpoint_digest in the config were made with abababababab"):
        run_synthesis(_job(tmp_path / "d", tiny_checkpoint, 2, templates=tiny_templates,
                           checkpoint_digest="ab" * 32), progress=False)
    other = tmp_path / "other-ckpt"
    shutil.copytree(tiny_checkpoint, other)
    (other / "checkpoint.json").write_text((other / "checkpoint.json").read_text() + "\n")   # another digest
    out, _ = run12
    with pytest.raises(ValueError, match=f"the samples already in {out} were made with"):
        run_synthesis(_job(out, str(other), 13), progress=False)
    assert read_run_manifest(str(out)).num_rows == 12


def test_a_rerun_with_another_identity_is_refused_before_any_work(run12, tiny_checkpoint, tmp_path):
    """out/run.json records what defines the run; another seed or other content settings are refused
    with one line naming the difference, and nothing in the run changes; n may grow."""
    import re
    import subprocess
    import sys

    out, _ = run12
    ident = json.loads((out / "run.json").read_text())
    assert ident["settings"]["run_seed"] == 0 and ident["settings"]["content"] == "test"
    assert len(ident["settings"]["checkpoint_digest"]) == 64 and ident["templates"]["n_templates"] >= 1
    before = {p.name: p.stat().st_mtime_ns for p in Path(out, "samples").iterdir()}
    for kw, what in (({"run_seed": 1}, "run_seed: 0 -> 1"), ({"config_hash": "other"}, "content: 'test' -> 'other'")):
        with pytest.raises(ValueError, match=re.escape(what)):
            run_synthesis(_job(out, tiny_checkpoint, 13, **kw), progress=False)
    assert read_run_manifest(str(out)).num_rows == 12
    assert {p.name: p.stat().st_mtime_ns for p in Path(out, "samples").iterdir()} == before
    assert json.loads((out / "run.json").read_text()) == ident   # never rewritten
    # the job's command line: one line on stderr, exit status 2, before Ray starts
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "run.json").write_text((out / "run.json").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "synthesize.py"), "preset=tiny", "n=2",
                           f"out={alien}", f"checkpoint={tiny_checkpoint}", "templates=phantom:4", "progress=false"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"synthesize: {alien} holds another run (run.json, settings differ"), err
    assert sorted(p.name for p in alien.iterdir()) == ["run.json"]   # no templates, no Ray session output


def test_an_unreadable_manifest_shard_is_quarantined_and_its_samples_redone(ray_local, tiny_checkpoint,
                                                                             tiny_templates, tmp_path):
    import shutil

    out = tmp_path / "run"
    run_synthesis(_job(out, tiny_checkpoint, 4, templates=tiny_templates, preview=False), progress=False)
    assert read_run_manifest(str(out)).num_rows == 4
    # the run ends compacted: one file holds the 4 rows; spoil it (a torn upload, a bad disk block)
    (shard,) = list(Path(out, "manifest").iterdir())
    spoiled = shard.read_bytes()[: len(shard.read_bytes()) // 2]
    shard.write_bytes(spoiled)
    with pytest.raises(ValueError, match="not a readable Parquet file"):   # other readers refuse it
        read_run_manifest(str(out))
    again = run_synthesis(_job(out, tiny_checkpoint, 4, templates=tiny_templates, preview=False), progress=False)
    assert again["n_written_this_run"] == 4 and again["n_written"] == 4
    assert sorted(read_run_manifest(str(out)).column("sample_id").to_pylist()) == [0, 1, 2, 3]
    assert (out / "quarantine" / shard.name).read_bytes() == spoiled
    shutil.rmtree(out)


@pytest.mark.parametrize("folder", ["manifest", "rejects", "templates", "quarantine", "summary.json"])
def test_a_symlink_out_of_the_run_is_refused_before_any_write(tiny_checkpoint, tmp_path, folder):
    from fcas.security import UnsafePathError

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the run root"):
        run_synthesis(_job(out, tiny_checkpoint, 2), progress=False)
    assert list(elsewhere.iterdir()) == []


def test_decode_window_comes_from_the_preset_and_only_changes_the_decode(tiny_checkpoint, tiny_templates):
    from hydra import compose, initialize_config_dir

    from fcas.io.manifest import read_cases
    from fcas.labels import CONFIG_DIR
    from fcas.pipeline.jobs import synthesis_job_from_cfg
    from fcas.synthesis.sampler import SamplerStage

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        assert synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x"])).sampler.decode_window is None
        paper = synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x", "preset=paper"]))
        assert paper.sampler.decode_window == (32, 32, 32) == load_preset("paper").decode_window
        mine = synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x", "sampler.decode_window=[8,8,4]"]))
        assert mine.sampler.decode_window == (8, 8, 4)
    with pytest.raises(ValueError, match="decode_window"):
        SamplerSettings(decode_window=(4, 0, 4))

    row = read_cases(tiny_templates).to_pylist()[0]
    label = nifti.read_nifti(row["label_uri"]).array
    out = {}
    for window in (None, (4, 4, 4)):   # the 8^3 tiny latent in 2 x 2 x 2 blended windows
        stage = SamplerStage(tiny_checkpoint, SamplerSettings(steps=4, ssv_every=1, decode_window=window))
        out[window] = stage.synthesize_one(label, 3, row["image_uri"], row["label_uri"])
    whole, windowed = out[None], out[(4, 4, 4)]
    assert windowed["image"].shape == whole["image"].shape == TINY.shape
    diff = np.abs(windowed["image"].astype(np.int32) - whole["image"].astype(np.int32))
    assert 0 < diff.max() and diff.mean() < 0.25 * np.abs(whole["image"]).mean()
    assert np.array_equal(windowed["confidence"], whole["confidence"])   # latent SSV never decodes
    assert np.array_equal(windowed["label"], whole["label"])


def test_a_second_driver_on_one_out_is_refused_before_any_work(ray_local, tiny_checkpoint, tiny_templates, tmp_path):
    """A resubmitted job while the first driver lives: one line naming the holder, nothing written; once
    the holder is gone (here: its process ends without releasing) the next driver takes over and the run
    ends with exactly n unique rows."""
    import subprocess
    import sys

    from fcas.synthesis.lease import LeaseHeld, read_lease

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from fcas.synthesis.lease import acquire_lease; "
                               "acquire_lease(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"another driver is running this run .*pid {holder.pid}"):
            run_synthesis(_job(out, tiny_checkpoint, 3, templates=tiny_templates, preview=False), progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["lease.json"]   # no manifest, samples or run.json
    finally:
        holder.kill()
        holder.wait()
    summary = run_synthesis(_job(out, tiny_checkpoint, 3, templates=tiny_templates, preview=False), progress=False)
    ids = read_run_manifest(str(out)).column("sample_id").to_pylist()
    assert summary["n_written_this_run"] == 3 and sorted(ids) == [0, 1, 2]
    assert read_lease(str(out)) is None                    # released at the end


def test_ids_stream_as_ranges_and_finished_ids_are_skipped():
    from fcas.pipeline.synthesize import expand_and_plan, id_ranges
    from fcas.synthesis.plan import CaseRef, TemplateLibrary

    ranges = id_ranges(10_000_000)
    assert len(ranges) == 1000 and ranges[0] == {"start": 0, "stop": 10_000} and ranges[-1]["stop"] == 10_000_000
    assert id_ranges(5) == [{"start": i, "stop": i + 1} for i in range(5)] and id_ranges(0) == []
    refs = tuple(CaseRef(f"t{i}", f"/x/t{i}.nii.gz", f"/x/t{i}-label.nii.gz") for i in range(3))
    lib = TemplateLibrary(refs, refs)
    batch = {"start": np.array([0, 10]), "stop": np.array([6, 12])}
    out = expand_and_plan(batch, lib, 0, done=np.array([1, 4, 11], dtype=np.int64))
    assert out["sample_id"].tolist() == [0, 2, 3, 5, 10]


def test_checks_before_work_refuse_a_wrong_preset_a_broken_library_and_an_out_that_is_a_file(
        tiny_checkpoint, tiny_templates, tmp_path):
    """Each mistake is refused before out is created, Ray starts or a template is prepared."""
    import shutil

    import pyarrow.parquet as pq

    demo = load_preset("demo")
    out = tmp_path / "run"
    wrong = SynthesisJob(n=2, out=str(out), checkpoint=tiny_checkpoint, templates=tiny_templates,
                         shape=demo.shape, spacing=demo.spacing)
    with pytest.raises(ValueError, match=r"trained at spacing \(4.0, 4.0, 4.0\) mm \(preset tiny\), the job samples "
                                         r"at \(2.0, 2.0, 2.0\) mm; use preset=tiny"):
        run_synthesis(wrong, progress=False)
    assert not out.exists()
    # a library whose files were deleted, and one whose labels have no cardiac class
    lib = tmp_path / "lib"
    shutil.copytree(Path(tiny_templates).parent, lib)   # the copy reads where it is (files relative to it)
    table = pq.read_table(lib / "cases.parquet")
    rows = table.to_pylist()
    import pyarrow as pa

    (lib / rows[0]["image_uri"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 template/reference file\(s\) missing, e.g. .*"):
        run_synthesis(_job(out, tiny_checkpoint, 2, templates=str(lib / "cases.parquet")), progress=False)
    for r in rows:
        r["class_voxels"] = [("soft_tissue", 100)]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), lib / "cases.parquet")
    (lib / rows[0]["image_uri"]).write_bytes(b"")
    with pytest.raises(ValueError, match="has no voxels of any cardiac class"):
        run_synthesis(_job(out, tiny_checkpoint, 2, templates=str(lib / "cases.parquet")), progress=False)
    assert not out.exists()
    out.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        run_synthesis(_job(out, tiny_checkpoint, 2, templates=tiny_templates), progress=False)


def test_a_checkpoint_whose_config_does_not_fit_its_weights_is_refused_before_work(tiny_checkpoint, tiny_templates,
                                                                                 tmp_path):
    """Digests intact (re-saved), but the config names a wider UNet than the weights: one line naming
    the weights file, before out exists."""
    from fcas.models.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    config = json.loads(json.dumps(ck.config))
    config["model"]["unet"]["channels"] = [c * 2 for c in config["model"]["unet"]["channels"]]
    bad = tmp_path / "bad-ckpt"
    save_checkpoint(str(bad), config=config, state_dicts={n: ck.state_dict(n) for n in ("unet", "controlnet", "vae")},
                    step=ck.step)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"checkpoint file .*unet.pt does not fit"):
        run_synthesis(_job(out, str(bad), 2, templates=tiny_templates), progress=False)
    assert not out.exists()
