"""Portable prepared cases: ``cases.parquet`` stores its files relative to its folder, so a prepared library
(a synthesis run's own ``templates/`` included) copied elsewhere reads, trains, exports and makes more samples
from its new place; an old manifest with absolute URIs still reads."""
import contextlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fcas.io import manifest
from fcas.synthesis.identity import library_digest
from fcas.synthesis.plan import TemplateLibrary


@contextlib.contextmanager
def _gone(folder: Path):
    """``folder`` renamed away while the copy is read (restored after: the session fixtures are shared)."""
    away = folder.with_name(folder.name + "-away")
    folder.rename(away)
    try:
        yield
    finally:
        away.rename(folder)


def _library_files(lib: TemplateLibrary) -> list[str]:
    return [u for r in lib.templates + lib.references for u in (r.image_uri, r.label_uri)]


def test_a_copied_library_reads_trains_and_exports_from_its_new_place(tiny_templates, tmp_path):
    from fcas.cal.data import load_finetune_set
    from fcas.diffusion.data import load_cases
    from fcas.evaluation.report import EvaluateSettings
    from fcas.evaluation.segmentation import _ground_truth
    from fcas.export.nnunet import ExportSettings, export_nnunet
    from fcas.pipeline.synthesize import check_template_library
    from fcas.presets import load_preset

    src = Path(tiny_templates).parent
    stored = pq.read_table(tiny_templates).to_pylist()
    assert {r["image_uri"] for r in stored} == {f"cases/{r['case_id']}_image.nii.gz" for r in stored}
    before = TemplateLibrary.from_manifest(tiny_templates)
    dest = tmp_path / "elsewhere" / "lib"
    shutil.copytree(src, dest)
    tiny = load_preset("tiny")
    with _gone(src):
        for given in (dest / "cases.parquet", dest):   # the file, or the folder holding it
            lib = TemplateLibrary.from_manifest(str(given))
            files = _library_files(lib)
            assert len(files) == 8 and all(u.startswith(f"{dest}/cases/") and Path(u).is_file() for u in files)
        assert library_digest(lib) == library_digest(before)   # ids only: a moved library keeps the run identity
        check_template_library(lib, str(dest / "cases.parquet"), "cardiac")
        cases = load_cases(str(dest), tiny.shape, tiny.spacing, split="reference")
        assert len(cases.case_ids) == 3 and tuple(cases.images.shape[2:]) == tiny.shape
        ft = load_finetune_set(str(dest / "cases.parquet"), tiny.shape, tiny.spacing, split="reference")
        assert len(ft) == 3 and int(ft.label.max()) > 0
        labels, images = _ground_truth(EvaluateSettings(data=str(dest)))
        assert all(Path(u).is_file() for u in list(labels.values()) + list(images.values()))
        s = export_nnunet(ExportSettings(out=str(tmp_path / "raw"), cases=str(dest), folds=2, workers=2))
        assert s["numTraining"] == 4 and s["rejected"] == 0


def test_an_old_absolute_cases_manifest_still_reads(tiny_templates, tmp_path):
    """A manifest written before relative paths (absolute URIs) reads as it is, wherever it lies."""
    lib_dir = Path(tiny_templates).parent
    table = pq.read_table(tiny_templates)
    rows = table.to_pylist()
    for r in rows:
        r["image_uri"], r["label_uri"] = str(lib_dir / r["image_uri"]), str(lib_dir / r["label_uri"])
    old = tmp_path / "old" / "cases.parquet"
    old.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), old)
    got = manifest.read_cases(str(old)).to_pylist()
    assert [(r["image_uri"], r["label_uri"]) for r in got] == [(r["image_uri"], r["label_uri"]) for r in rows]
    assert manifest.read_cases(str(old), resolve=False).equals(manifest.read_cases(str(old)))
    assert _library_files(TemplateLibrary.from_manifest(str(old))) == _library_files(
        TemplateLibrary.from_manifest(tiny_templates))


def test_a_moved_run_grows_from_its_own_templates(tiny_run12, ray_local, tiny_checkpoint, tmp_path):
    """The 12-sample run copied elsewhere, the original renamed away: n=14 makes exactly samples 12 and 13,
    with the copy's templates/ (templates=phantom:4 -> <out>/templates/cases.parquet), all files in the copy."""
    from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
    from fcas.presets import load_preset
    from fcas.synthesis.outputs import read_run_manifest
    from fcas.synthesis.sampler import SamplerSettings

    src, _ = tiny_run12
    dest = tmp_path / "moved"
    shutil.copytree(src, dest)
    tiny = load_preset("tiny")
    library = (dest / "templates" / "cases.parquet").read_bytes()
    with _gone(src):
        summary = run_synthesis(SynthesisJob(n=14, out=str(dest), checkpoint=tiny_checkpoint, templates="phantom:4",
                                             shape=tiny.shape, spacing=tiny.spacing,
                                             sampler=SamplerSettings(steps=4, ssv_every=1),
                                             resources=Resources(writer_batch_size=3), config_hash="test"),
                                progress=False)
        assert summary["n_written_this_run"] == 2 and summary["n_written"] == 14 and summary["n_rejected"] == 0
        rows = {r["sample_id"]: r for r in read_run_manifest(str(dest)).to_pylist()}
        assert sorted(rows) == list(range(14))
        for sid in (12, 13):
            for k in ("image_uri", "label_uri", "confidence_uri"):
                assert rows[sid][k].startswith(f"{dest}/samples/") and Path(rows[sid][k]).is_file()
        assert (dest / "templates" / "cases.parquet").read_bytes() == library   # used as copied, not re-prepared
        assert str(src) not in json.dumps(pq.read_table(dest / "templates" / "cases.parquet").to_pylist())
