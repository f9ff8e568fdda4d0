"""export_nnunet: a prepared-cases table + a synthesis run (+ one corrupt file) -> nnU-Net v2 raw dataset."""
import importlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fcas.export.nnunet import (ExportSettings, case_name, dataset_folder_name, dataset_labels, export_nnunet,
                                group_kfold_splits, settings_from_dict)
from fcas.io import manifest, nifti, storage
from fcas.labels import load_schema
from fcas.phantom import make_case
from fcas.synthesis.outputs import read_run_manifest, write_sample, write_shard

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = load_schema("cardiac")
SHAPE, SPACING = (32, 32, 32), (4.0, 4.0, 4.0)
SPLITS = ["train", "train", "template", "template", "reference", "test", "train"]   # real_case000..006
# sample id -> template: two from prepared template cases (shared groups), the rest from outside templates
TEMPLATES = {0: "case002", 1: "case002", 2: "case003", 3: "tplA", 4: "tplA", 5: "tplA", 6: "tplB", 7: "tplC"}
CORRUPT_SAMPLE = 7   # its image file is overwritten with garbage


@pytest.fixture(scope="module")
def phantoms():
    return [make_case(seed, shape=SHAPE, spacing=SPACING) for seed in range(3)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, phantoms):
    """(cases.parquet URI, run folder, corrupt file URI, source arrays by case name)."""
    base = tmp_path_factory.mktemp("export_src")
    rows, arrays = [], {}
    for i, split in enumerate(SPLITS):
        pc = phantoms[i % len(phantoms)]
        affine = pc.affine.copy()
        affine[:3, 3] += i                       # a distinct origin per case: affines must travel with it
        cid = f"case{i:03d}"
        img_uri, lab_uri = str(base / "cases" / f"{cid}_image.nii.gz"), str(base / "cases" / f"{cid}_label.nii.gz")
        image = pc.image + i                     # distinct HU per case
        nifti.write_nifti(img_uri, image, affine, kind="image")
        nifti.write_nifti(lab_uri, pc.label, affine, kind="label")
        rows.append({"case_id": cid, "image_uri": img_uri, "label_uri": lab_uri, "shape": list(SHAPE),
                     "spacing": list(SPACING), "split": split, "source": "phantom"})
        arrays[f"real_{cid}"] = (image, pc.label, affine)
    cases_uri = str(base / "prepared" / "cases.parquet")
    manifest.write_table(cases_uri, rows, manifest.CASES_SCHEMA)

    run = str(base / "run")
    shard, corrupt = [], None
    rng = np.random.default_rng(0)
    for sid, tpl in TEMPLATES.items():
        pc = phantoms[sid % len(phantoms)]
        image = pc.image - 7 * sid
        uris = write_sample(run, sid, image, pc.label, rng.random(SHAPE), pc.affine)
        shard.append({"sample_id": sid, "seed": sid, "template_id": tpl, "reference_id": "case004",
                      "image_uri": uris["image_uri"], "label_uri": uris["label_uri"],
                      "confidence_uri": uris["confidence_uri"]})
        arrays[f"syn_s{sid:08d}"] = (image, pc.label, pc.affine)
        if sid == CORRUPT_SAMPLE:
            corrupt = uris["image_uri"]
            Path(corrupt).write_bytes(b"\x1f\x8b\x08\x00 truncated gzip, not a NIfTI")
        if len(shard) == 4:
            write_shard(run, shard)
            shard = []
    write_shard(run, shard)
    assert read_run_manifest(run).num_rows == len(TEMPLATES)
    return cases_uri, run, corrupt, arrays


def _groups():
    """case name -> template group, as the test knows it (independent of the exporter)."""
    g = {f"real_case{i:03d}": f"case{i:03d}" for i in range(len(SPLITS))}
    g.update({f"syn_s{sid:08d}": tpl for sid, tpl in TEMPLATES.items()})
    return g


def check_nnunet_raw(root: Path) -> dict:
    """Structural check of an nnU-Net v2 raw dataset folder; returns dataset.json."""
    assert root.name.startswith("Dataset") and root.name[7:10].isdigit() and root.name[10] == "_"
    ds = json.loads((root / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        assert key in ds, key
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz"
    assert ds["labels"]["background"] == 0
    assert sorted(ds["labels"].values()) == list(range(len(ds["labels"])))      # consecutive ids
    images = sorted(p.name for p in (root / "imagesTr").iterdir())
    labels = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert ds["numTraining"] == len(images) == len(labels)
    assert all(n.endswith("_0000.nii.gz") for n in images)
    assert [n[: -len("_0000.nii.gz")] for n in images] == [n[: -len(".nii.gz")] for n in labels]
    allowed = set(ds["labels"].values())
    for name in labels:
        case = name[: -len(".nii.gz")]
        img, lab = nifti.read_nifti(root / "imagesTr" / f"{case}_0000.nii.gz"), nifti.read_nifti(root / "labelsTr" / name)
        assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
        assert img.shape == lab.shape and np.array_equal(img.affine, lab.affine), case
        assert set(np.unique(lab.array).tolist()) <= allowed, case
    return ds


@pytest.mark.parametrize("cardiac_only", [True, False])
def test_export_run_and_cases(tmp_path, sources, cardiac_only):
    cases_uri, run, corrupt, arrays = sources
    out = tmp_path / "nnUNet_raw"
    s = export_nnunet(ExportSettings(out=str(out), dataset_id=7, name="FCaS_test", run=run, cases=cases_uri,
                                     cardiac_only=cardiac_only, workers=2, reader_writer="NibabelIO"))
    root = out / "Dataset007_FCaS_test"
    ds = check_nnunet_raw(root)

    # what went where: 7 real (1 test -> imagesTs), 8 synthetic (1 corrupt -> rejects)
    n_tr = len(SPLITS) - 1 + len(TEMPLATES) - 1
    assert s["numTraining"] == ds["numTraining"] == n_tr and s["numTest"] == 1 and s["rejected"] == 1
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == ["real_case005_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == ["real_case005.nii.gz"]
    assert ds["overwrite_image_reader_writer"] == "NibabelIO"
    expect_labels = dataset_labels(SCHEMA, cardiac_only)
    assert ds["labels"] == expect_labels and len(expect_labels) == (9 if cardiac_only else 12)
    assert all(SCHEMA.id(n) == v for n, v in ds["labels"].items())

    # rejects.json: the corrupt file, one line naming it
    rejects = json.loads((root / "rejects.json").read_text())
    assert [r["case"] for r in rejects] == [f"syn_s{CORRUPT_SAMPLE:08d}"]
    assert corrupt in rejects[0]["reason"] and "\n" not in rejects[0]["reason"]

    # voxel values and geometry survive; labels mapped as configured
    max_label = 0
    for case, (image, label, affine) in arrays.items():
        sub = "Ts" if case == "real_case005" else "Tr"
        if case == f"syn_s{CORRUPT_SAMPLE:08d}":
            assert not (root / "imagesTr" / f"{case}_0000.nii.gz").exists()
            continue
        img = nifti.read_nifti(root / f"images{sub}" / f"{case}_0000.nii.gz")
        lab = nifti.read_nifti(root / f"labels{sub}" / f"{case}.nii.gz")
        np.testing.assert_array_equal(img.array, image)
        np.testing.assert_array_equal(lab.array, SCHEMA.cardiac_only(label) if cardiac_only else label)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        max_label = max(max_label, int(lab.array.max()))
    assert max_label == (8 if cardiac_only else 11)

    # splits_final.json: 5 folds, each training case in one val fold, template groups whole
    splits = json.loads((root / "splits_final.json").read_text())
    trained = {p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir()}
    assert len(splits) == 5
    val_count = Counter(c for f in splits for c in f["val"])
    assert set(val_count) == trained and set(val_count.values()) == {1}
    for f in splits:
        assert set(f["train"]) | set(f["val"]) == trained and not set(f["train"]) & set(f["val"])
    groups = _groups()
    fold_of_group = {}
    for k, f in enumerate(splits):
        for c in f["val"]:
            assert fold_of_group.setdefault(groups[c], k) == k, f"group {groups[c]} straddles folds"
    # the template case and the samples drawn from it share a fold
    assert fold_of_group["case002"] == next(k for k, f in enumerate(splits) if "syn_s00000000" in f["val"])
    assert max(len(f["val"]) for f in splits) - min(len(f["val"]) for f in splits) <= 3

    prov = json.loads((root / "fcas_export.json").read_text())
    assert prov["complete"] and len(prov["cases"]) == n_tr + 1
    assert prov["settings"]["cardiac_only"] is cardiac_only


def test_existing_folder_error_resume_overwrite(tmp_path, sources):
    cases_uri, run, corrupt, _ = sources
    base = dict(out=str(tmp_path), dataset_id=501, name="FCaS", cases=cases_uri, folds=3, workers=2)
    first = export_nnunet(ExportSettings(**base))
    assert first["numTraining"] == 6 and first["skipped"] == 0 and first["folds"] == 3
    root = tmp_path / dataset_folder_name(501, "FCaS")
    before = (root / "splits_final.json").read_text()
    with pytest.raises(ValueError, match="existing=overwrite or existing=resume"):
        export_nnunet(ExportSettings(**base))
    again = export_nnunet(ExportSettings(**base, existing="resume"))
    assert again["skipped"] == 7 and again["numTraining"] == 6
    assert (root / "splits_final.json").read_text() == before                 # deterministic from the seed
    with pytest.raises(ValueError, match="cardiac_only"):
        export_nnunet(ExportSettings(**base, existing="resume", cardiac_only=False))
    (root / "imagesTr" / "stray_0000.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="not part of this export"):
        export_nnunet(ExportSettings(**base, existing="resume"))
    over = export_nnunet(ExportSettings(**base, existing="overwrite", train_splits=("train",), test_splits=()))
    assert over["numTraining"] == 3 and over["numTest"] == 0
    check_nnunet_raw(root)
    assert not (root / "imagesTs").exists()


def test_group_by_template_reference_links_samples_to_their_reference_case(tmp_path, sources):
    cases_uri, run, _, _ = sources
    kw = dict(out=str(tmp_path), run=run, cases=cases_uri, group_by="template_reference", workers=2)
    # every sample's reference is case004: samples, their templates and case004 form one group,
    # leaving 4 groups (that one + case000, case001, case006) -- too few for 5 folds, refused before writing
    with pytest.raises(ValueError, match="4 groups"):
        export_nnunet(ExportSettings(**kw))
    assert not any(tmp_path.iterdir())
    export_nnunet(ExportSettings(**kw, folds=4))
    splits = json.loads((tmp_path / "Dataset501_FCaS" / "splits_final.json").read_text())
    fold = next(f for f in splits if "real_case004" in f["val"])
    linked = {"real_case002", "real_case003", "real_case004"} | {f"syn_s{i:08d}" for i in TEMPLATES if i != CORRUPT_SAMPLE}
    assert set(fold["val"]) == linked


@pytest.mark.parametrize("sizes,folds", [
    ([1] * 10, 5),
    ([5, 1, 1, 1, 1, 1, 3, 2], 5),
    ([40, 1, 1, 1, 1], 5),
    ([2, 2, 2], 2),
])
def test_group_kfold_keeps_groups_whole(sizes, folds):
    cases = [f"c{g}_{i}" for g, n in enumerate(sizes) for i in range(n)]
    groups = [c.split("_")[0] for c in cases]
    splits = group_kfold_splits(cases, groups, folds, seed=3)
    assert splits == group_kfold_splits(cases, groups, folds, seed=3)
    assert len(splits) == folds and all(f["val"] for f in splits)
    assert sorted(c for f in splits for c in f["val"]) == sorted(cases)
    for f in splits:
        assert sorted(f["train"] + f["val"]) == sorted(cases)
        assert not {c.split("_")[0] for c in f["val"]} & {c.split("_")[0] for c in f["train"]}


def test_group_kfold_seed_changes_assignment_and_refuses_too_few_groups():
    cases = [f"c{i}" for i in range(20)]
    a, b = group_kfold_splits(cases, cases, 5, seed=0), group_kfold_splits(cases, cases, 5, seed=1)
    assert a != b and all(len(f["val"]) == 4 for f in a + b)
    with pytest.raises(ValueError, match="3 groups"):
        group_kfold_splits(["a", "b", "c"], ["a", "b", "c"], 5)


@pytest.mark.parametrize("kw,match", [
    ({"dataset_id": 1000}, "1..999"),
    ({"name": "bad name"}, "dataset name"),
    ({"run": None, "cases": None}, "nothing to export"),
    ({"existing": "append"}, "existing"),
    ({"group_by": "sample"}, "group_by"),
    ({"train_splits": ("test",)}, "both train_splits and test_splits"),
])
def test_settings_refuse_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ExportSettings(**{"out": "x", "run": "r", **kw})


def test_case_names_are_sanitized():
    assert case_name("real", "ct 01.v2/a") == "real_ct_01_v2_a"
    assert case_name("syn", "s00000012") == "syn_s00000012"


def test_hydra_entry_point_exports_to_s3(tmp_path, sources, s3_uri):
    """The export_nnunet job (jobs/export_nnunet.py runs it) with its config (Hydra compose), local inputs -> s3:// output."""
    from hydra import compose, initialize_config_dir

    cases_uri, run, _, _ = sources
    job = importlib.import_module("fcas.pipeline.commands.export_nnunet")   # what jobs/export_nnunet.py runs
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="export_nnunet",
                      overrides=[f"run={run}", f"cases={cases_uri}", f"out={s3_uri}", "dataset_id=42",
                                 "name=Syn", "test_splits=[test,reference]", "workers=2"])
    assert settings_from_dict(dict(cfg)).test_splits == ("test", "reference")
    s = job.run(cfg)
    root = storage.join(s3_uri, "Dataset042_Syn")
    assert s["dataset"] == root and s["rejected"] == 1 and s["numTest"] == 2
    ds = json.loads(storage.read_bytes(storage.join(root, "dataset.json")))
    images = [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(root, "imagesTr"))]
    labels = [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(root, "labelsTr"))]
    assert ds["numTraining"] == len(images) == len(labels) == s["numTraining"] == 12
    assert [n.replace("_0000", "") for n in images] == labels
    img = nifti.read_nifti(storage.join(root, "imagesTr", images[0]))
    lab = nifti.read_nifti(storage.join(root, "labelsTr", labels[0]))
    assert img.shape == lab.shape == SHAPE and np.array_equal(img.affine, lab.affine)
    splits = json.loads(storage.read_bytes(storage.join(root, "splits_final.json")))
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == sorted(n[:-7] for n in labels)
