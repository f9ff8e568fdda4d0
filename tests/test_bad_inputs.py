"""The committed bad-input corpus (tests/data/bad_inputs/): reproducible from its script, every bad
item refused with a one-line reason naming the file and the problem, every good item accepted."""
from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fcas.deform.stage import MGMStage
from fcas.io.nifti import NiftiError, read_nifti
from fcas.labels import default_schema
from fcas.diffusion.bundle import load_tcdm
from fcas.models.checkpoint import load_checkpoint
from fcas.pipeline.prepare import PrepareCase, PrepareJob, list_sources
from fcas.prepare import CaseRejected, PrepareSettings, load_case
from fcas.presets import load_preset
from fcas.synthesis.plan import TemplateLibrary
from tests.corpus import BAD_KINDS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "bad_inputs"
KINDS = json.loads((CORPUS / "kinds.json").read_text())
SCHEMA = default_schema()
TINY = load_preset("tiny")

# case kind -> a fragment the one-line reason (prepare and load_case) must contain
CASE_REASONS = {**BAD_KINDS, "infimage": "non-finite"}   # tests/corpus.py kinds + the corpus's ±inf image
GOOD_CASES = sorted(k for k, v in KINDS["cases"].items() if v == "good")
# files read_nifti alone must refuse (format errors); the rest are valid NIfTI with bad content
NIFTI_REASONS = {"truncated": "truncated", "zerobyte": "empty", "notnifti": "not a nifti", "huge": "truncated voxel data"}
# label maps the MGM stage (synthesize's template reader) must refuse
MGM_REASONS = {"flat2d": "3d", "vol4d": "3d", "floatlabel": "integer", "unknownids": "not in schema", "noheart": "empty"}
MANIFEST_REASONS = {
    "zerobyte.parquet": "not a readable parquet",
    "notparquet.parquet": "not a readable parquet",
    "truncated.parquet": "not a readable parquet",
    "norows.parquet": "no rows",
    "notemplate.parquet": "no rows with split='template'",
    "nosplitcolumn.parquet": "required column",
    "unsafeid.parquet": "case id",
}
# needs fcas/synthesis/plan.py to read with CASES_SCHEMA and check_id() each case id (see the report)
MANIFEST_GAPS: set[str] = set()   # none left: from_manifest reads with CASES_SCHEMA and checks ids
CHECKPOINT_REASONS = {  # load_checkpoint + every state dict
    "incomplete": "not a complete checkpoint",
    "badmanifest": "unreadable",
    "tamperedweights": "does not match the sha256",
    "truncatedweights": "does not match the sha256",
    "tamperedconfig": "does not match its sha256",
    "missingweights": "missing",
    "pickleexploit": "weights only load failed",
    "notastatedict": "expected a state dict",
}


def _one_line_naming(err: BaseException, name: str) -> str:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert name in msg, (name, msg)
    return msg.lower()


def test_kinds_cover_the_issue_list():
    bad = {v for v in KINDS["cases"].values() if v not in ("good", "orphan")}
    assert bad == set(CASE_REASONS)
    assert len(GOOD_CASES) == 3
    assert set(KINDS["manifests"]) == set(MANIFEST_REASONS) | {"good.parquet"}
    assert set(KINDS["checkpoints"]) == set(CHECKPOINT_REASONS) | {"good"}
    # the huge header really declares 10^12 voxels, in a file of a few bytes
    hdr = nib.Nifti1Header.from_fileobj(gzip.open(CORPUS / "cases" / "huge_image.nii.gz"))
    assert int(np.prod(hdr.get_data_shape())) == 10**12
    assert (CORPUS / "cases" / "huge_image.nii.gz").stat().st_size < 1000
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 400_000, total


def test_committed_corpus_is_what_the_script_writes(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_bad_corpus import make_corpus
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    kinds = make_corpus(tmp_path)
    assert kinds == KINDS
    ours = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*")
                       if p.is_file() and p.name != "README.md")
    assert ours == committed
    differ = [f for f in ours if (tmp_path / f).read_bytes() != (CORPUS / f).read_bytes()]
    assert not differ, f"rerun scripts/make_bad_corpus.py: {differ}"


def test_prepare_rejects_each_bad_case_and_writes_every_good_one(tmp_path):
    """prepare's listing and its per-case row function (what the Ray Data map runs, here without
    Ray; tests/test_prepare.py runs the same generators through the real Ray job)."""
    out = tmp_path / "out"
    job = PrepareJob(source=f"dir:{CORPUS / 'cases'}", out=str(out), preview=0,
                     settings=PrepareSettings(shape=TINY.shape, spacing=TINY.spacing, max_voxels=10**8))
    items, rejects = list_sources(job)
    assert [Path(r["source"]).name for r in rejects] == ["orphan_image.nii.gz"]
    assert "no label file" in rejects[0]["reason"]
    row_fn = PrepareCase(job)
    results = {item["case_id"]: row_fn(item) for item in items}
    assert sorted(results) == sorted(set(CASE_REASONS) | set(GOOD_CASES))
    written = sorted(k for k, r in results.items() if r["ok"])
    assert written == GOOD_CASES and len(written) == 3
    for key, fragment in CASE_REASONS.items():
        reason = _one_line_naming(results[key]["reason"], f"{key}_")
        assert fragment in reason, (key, reason)
    assert len(CASE_REASONS) + len(rejects) == 15      # 14 bad kinds + the orphan image, all refused
    files = sorted(p.name for p in (out / "cases").iterdir())
    assert files == sorted(f"{k}_{t}.nii.gz" for k in GOOD_CASES for t in ("image", "label"))
    for key in GOOD_CASES:
        row = json.loads(results[key]["row"])
        label = read_nifti(str(out / row["label_uri"]))   # stored relative to out
        assert row["case_id"] == key and label.array.shape == TINY.shape == tuple(row["shape"])
        assert all(row["class_voxels"][n] > 0 for n in SCHEMA.cardiac), row["class_voxels"]


@pytest.mark.parametrize("kind", sorted(CASE_REASONS))
def test_load_case_refuses_each_bad_pair(kind):
    """The validating pair reader offered to synthesize/CAL (fcas.prepare.load_case)."""
    image, label = CORPUS / "cases" / f"{kind}_image.nii.gz", CORPUS / "cases" / f"{kind}_label.nii.gz"
    with pytest.raises(CaseRejected) as exc:
        load_case(str(image), str(label), SCHEMA, max_voxels=10**8)
    assert CASE_REASONS[kind] in _one_line_naming(exc.value, f"{kind}_")


@pytest.mark.parametrize("key", GOOD_CASES)
def test_good_cases_load_with_every_reader(key):
    image, label = str(CORPUS / "cases" / f"{key}_image.nii.gz"), str(CORPUS / "cases" / f"{key}_label.nii.gz")
    img, lab, affine = load_case(image, label, SCHEMA)
    assert img.shape == lab.shape == (20, 22, 18) and np.isfinite(img).all()
    assert set(SCHEMA.cardiac_ids) <= set(np.unique(lab).tolist())
    assert read_nifti(image).array.dtype == np.int16
    tmpl, _ = MGMStage().template(label)
    assert tmpl.mask.shape == (20, 22, 18)


@pytest.mark.parametrize("kind", sorted(NIFTI_REASONS))
def test_read_nifti_refuses_unreadable_files(kind):
    path = CORPUS / "cases" / f"{kind}_image.nii.gz"
    with pytest.raises(NiftiError) as exc:
        read_nifti(str(path))
    assert NIFTI_REASONS[kind] in _one_line_naming(exc.value, str(path))


def test_read_nifti_refuses_the_huge_header_before_reading_data():
    path = CORPUS / "cases" / "huge_image.nii.gz"
    with pytest.raises(ValueError, match="more than max_voxels") as exc:
        read_nifti(str(path), max_voxels=10**8)
    _one_line_naming(exc.value, str(path))


@pytest.mark.parametrize("kind", sorted(MGM_REASONS))
def test_mgm_template_reader_refuses_bad_label_maps(kind):
    path = CORPUS / "cases" / f"{kind}_label.nii.gz"
    with pytest.raises(ValueError) as exc:
        MGMStage().template(str(path))
    assert MGM_REASONS[kind] in _one_line_naming(exc.value, str(path))


@pytest.mark.parametrize("name", sorted(MANIFEST_REASONS))
def test_template_library_refuses_bad_manifests(name, request):
    if name in MANIFEST_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="TemplateLibrary.from_manifest reads without "
                                              "CASES_SCHEMA and does not check case ids (fcas/synthesis/plan.py)"))
    path = CORPUS / "manifests" / name
    with pytest.raises(ValueError) as exc:
        TemplateLibrary.from_manifest(str(path))
    assert MANIFEST_REASONS[name] in _one_line_naming(exc.value, str(path))


def test_template_library_reads_the_good_manifest():
    lib = TemplateLibrary.from_manifest(str(CORPUS / "manifests" / "good.parquet"))
    assert [t.case_id for t in lib.templates] == ["good0", "good1"]
    assert [r.case_id for r in lib.references] == ["good2"]


def _load_all(uri: str) -> None:
    ck = load_checkpoint(uri)
    for name in ck.files:
        ck.state_dict(name)


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_REASONS))
def test_checkpoint_loaders_refuse_bad_checkpoints(kind, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FCAS_PWNED_MARKER", str(marker))
    uri = str(CORPUS / "checkpoints" / kind)
    with pytest.raises(ValueError) as exc:
        _load_all(uri)
    assert CHECKPOINT_REASONS[kind] in _one_line_naming(exc.value, uri)
    with pytest.raises(ValueError) as exc:   # the synthesis loader: refuses it too (first problem found)
        load_tcdm(uri)
    _one_line_naming(exc.value, uri)
    assert not marker.exists(), "a checkpoint ran code while loading"


def test_the_good_checkpoint_loads_and_is_not_a_tcdm():
    ck = load_checkpoint(str(CORPUS / "checkpoints" / "good"))
    sd = ck.state_dict("unet")
    assert sd["weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="not a TCDM checkpoint"):
        load_tcdm(ck.uri)


def test_pickle_exploit_would_run_code_without_weights_only(tmp_path, monkeypatch):
    """Proves the exploit item is live: only weights_only=True stands between it and exec."""
    import torch

    marker = tmp_path / "pwned"
    monkeypatch.setenv("FCAS_PWNED_MARKER", str(marker))
    src = CORPUS / "checkpoints" / "pickleexploit" / "unet.pt"
    copy = tmp_path / "unet.pt"
    shutil.copyfile(src, copy)
    torch.load(copy, weights_only=False)
    assert marker.read_text() == "torch.load ran code from a checkpoint"
