"""fcas.evaluation + jobs/evaluate.py on tiny phantom data written in the test."""
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fcas.diffusion.conditioning import hu_to_unit
from fcas.evaluation import (EvaluateSettings, evaluate_pairs, read_learning_curve, run_evaluation,
                             settings_from_dict)
from fcas.io import manifest, nifti, storage
from fcas.labels import default_schema
from fcas.metrics import VAEEncoderFeatures, dice_per_class, fid, rdice_per_class, rmse, ssim
from fcas.phantom import make_case
from fcas.synthesis.outputs import write_sample, write_shard

ROOT = Path(__file__).resolve().parent.parent
SHAPE, SPACING = (32, 32, 32), (4.0, 4.0, 4.0)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def phantoms():
    return [make_case(s, SHAPE, SPACING) for s in range(4)]


def _cases_parquet(root: Path, phantoms, splits) -> str:
    rows = []
    for case, split in zip(phantoms, splits):
        cid = f"phantom_{case.seed:05d}"
        img, lab = str(root / "cases" / f"{cid}_image.nii.gz"), str(root / "cases" / f"{cid}_label.nii.gz")
        nifti.write_nifti(img, case.image, case.affine, kind="image")
        nifti.write_nifti(lab, case.label, case.affine, kind="label")
        rows.append({"case_id": cid, "image_uri": img, "label_uri": lab, "shape": list(SHAPE), "spacing": list(SPACING),
                     "class_voxels": None, "split": split, "source": f"phantom:{case.seed}"})
    uri = str(root / "cases.parquet")
    manifest.write_table(uri, rows, manifest.CASES_SCHEMA)
    return uri


def _perturb(label: np.ndarray, kind: str) -> np.ndarray:
    p = label.copy()
    if kind == "drop_coronaries_far_fp":
        p[p == 8] = 0
        p[0:3, 0:3, 0:3] = 1                 # far false positive of the LV
    elif kind == "shift":
        p = np.roll(p, 1, axis=0)
    return p


PERTURBATIONS = ("identity", "drop_coronaries_far_fp", "shift")


@pytest.fixture()
def seg_folders(tmp_path, phantoms):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    arrays = {}
    for case, kind in zip(phantoms, PERTURBATIONS):
        cid = f"case{case.seed}"
        nifti.write_nifti(str(gt / f"{cid}_label.nii.gz"), case.label, case.affine, kind="label")
        p = _perturb(case.label, kind)
        nifti.write_nifti(str(pred / f"{cid}.nii.gz"), p, case.affine, kind="label")
        arrays[cid] = (p, case.label)
    return gt, pred, arrays


def test_segmentation_report_matches_direct_metric_calls(tmp_path, seg_folders):
    gt, pred, arrays = seg_folders
    out = tmp_path / "report"
    m = run_evaluation(EvaluateSettings(mode="segmentation", data=str(gt), pred=str(pred), out=str(out)))
    schema = default_schema()
    names = schema.names
    assert m["n_cases"] == 3 and m["missing_predictions"] == []
    for case in m["per_case"]:
        p, q = arrays[case["case_id"]]
        d = dice_per_class(p, q, schema.cardiac_ids)
        r = rdice_per_class(p, q, schema.cardiac_ids, radius=3)
        assert case["dice"] == pytest.approx({names[c]: v for c, v in d.items()})
        assert case["rdice"] == pytest.approx({names[c]: v for c, v in r.items()})
    by_case = {c["case_id"]: c for c in m["per_case"]}
    assert by_case["case0"]["mean_dice"] == 1.0
    c1 = by_case["case1"]
    assert c1["dice"]["coronary_arteries"] == 0.0 and c1["dice"]["left_ventricle"] < 1.0
    assert c1["rdice"]["left_ventricle"] == 1.0           # the far false positive is ignored by RDice
    lv = m["per_class"]["left_ventricle"]
    assert lv["dice_mean"] == pytest.approx(np.mean([by_case[c]["dice"]["left_ventricle"] for c in by_case]))
    assert m["mean_dice"] == pytest.approx(np.mean([v["dice_mean"] for v in m["per_class"].values()]))

    report = (out / "report.md").read_text()
    assert f"{lv['dice_mean']:.4f}" in report and f"{m['mean_rdice']:.4f}" in report
    assert "| case1 |" in report and "dice_per_class.png" in report
    assert (out / "dice_per_class.png").read_bytes().startswith(PNG)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["per_class"]["left_ventricle"]["dice_mean"] == pytest.approx(lv["dice_mean"])


def test_segmentation_lists_missing_predictions_and_refuses_no_match(tmp_path, seg_folders):
    gt, pred, _ = seg_folders
    (pred / "case2.nii.gz").unlink()
    m = run_evaluation(EvaluateSettings(data=str(gt), pred=str(pred), out=str(tmp_path / "r")))
    assert m["n_cases"] == 2 and m["missing_predictions"] == ["case2"]
    with pytest.raises(ValueError, match="no prediction"):
        run_evaluation(EvaluateSettings(data=str(gt), pred=str(pred), pred_pattern="{case_id}_x.nii.gz",
                                        out=str(tmp_path / "r2")))


def test_segmentation_with_a_predictor_on_a_cases_parquet(tmp_path, phantoms):
    cases = _cases_parquet(tmp_path, phantoms[:3], ["train", "test", "test"])
    truth = {f"phantom_{c.seed:05d}": c.label for c in phantoms[:3]}
    calls = []

    def predictor(image_hu):                 # a "network": ground truth of the case with that image, shifted
        calls.append(image_hu.shape)
        cid = next(k for k, c in zip(truth, phantoms) if np.array_equal(c.image, image_hu))
        return _perturb(truth[cid], "shift")

    out = tmp_path / "r"
    m = run_evaluation(EvaluateSettings(data=cases, splits=("test",), out=str(out), classes="all"), predictor)
    assert len(calls) == 2 and [c["case_id"] for c in m["per_case"]] == ["phantom_00001", "phantom_00002"]
    assert len(m["per_class"]) == 11                          # classes=all: every foreground class
    pred = nifti.read_nifti(str(out / "predictions" / "phantom_00001.nii.gz")).array
    want = dice_per_class(pred, truth["phantom_00001"], default_schema().foreground_ids)
    assert m["per_case"][0]["mean_dice"] == pytest.approx(np.mean(list(want.values())))


def test_segmentation_checkpoint_without_cal_module_says_what_to_do(tmp_path, seg_folders, monkeypatch):
    gt, _, _ = seg_folders
    monkeypatch.setitem(sys.modules, "fcas.cal", None)         # as if fcas.cal did not exist
    with pytest.raises(ValueError, match="load_predictor"):
        run_evaluation(EvaluateSettings(data=str(gt), checkpoint="ck", out=str(tmp_path / "r")))


# ---- synthesis ------------------------------------------------------------------------------
@pytest.fixture()
def synthesis_run(tmp_path, phantoms):
    """A hand-made run: samples = template image + 400 HU in a box, confidence 0.25 in the box, 0.9 elsewhere."""
    run = tmp_path / "run"
    _cases_parquet(run / "templates", phantoms, ["template", "template", "reference", "reference"])
    rows = []
    for sid in range(4):
        t, r = phantoms[sid % 2], phantoms[2 + sid // 2]
        image = t.image.astype(np.int32)
        conf = np.full(SHAPE, 0.9, np.float32)
        box = (slice(8 + sid, 20), slice(10, 22), slice(6, 18))
        image[box] += 400
        conf[box] = 0.25
        label = np.where(t.label <= 8, t.label, 0).astype(np.uint8)
        uris = write_sample(str(run), sid, np.clip(image, -1024, 3071).astype(np.int16), label, conf, t.affine)
        rows.append({"sample_id": sid, "seed": sid, "template_id": f"phantom_{t.seed:05d}",
                     "reference_id": f"phantom_{r.seed:05d}", **uris})
    rows.append({**rows[0], "sample_id": 9, "image_uri": str(run / "samples" / "missing.nii.gz")})
    write_shard(str(run), rows)
    return run


@pytest.fixture(scope="module")
def features():
    """The demo VAE's encoder on volumes resampled to 16^3 (an encoder pass at 32^3 takes ~0.5 s on a busy core)."""
    return VAEEncoderFeatures.from_checkpoint(str(ROOT / "checkpoints" / "demo"), resize=(16, 16, 16))


def _unit(uri):
    return hu_to_unit(nifti.read_nifti(uri).array).numpy()


def test_synthesis_report_matches_direct_metric_calls(tmp_path, synthesis_run, features, phantoms):
    out = tmp_path / "eval"
    s = EvaluateSettings(mode="synthesis", run=str(synthesis_run), out=str(out), cm_bins=5,
                         fid_features=str(ROOT / "checkpoints" / "demo"), fid_resize=(16, 16, 16))
    m = run_evaluation(s)
    assert m["n_samples"] == 4 and [r["sample_id"] for r in m["rejects"]] == [9]
    lib = {r["case_id"]: r for r in manifest.read_table(str(synthesis_run / "templates" / "cases.parquet")).to_pylist()}
    feats = []
    for rec in m["per_sample"]:
        base = synthesis_run / "samples" / f"s{rec['sample_id']:08d}"
        img, tgt = _unit(f"{base}_image.nii.gz"), _unit(lib[rec["template_id"]]["image_uri"])
        mask = nifti.read_nifti(f"{base}_label.nii.gz").array > 0
        assert rec["target_id"] == rec["template_id"]
        assert rec["ssim"] == pytest.approx(ssim(img, tgt, mask), abs=1e-6)
        assert rec["rmse"] == pytest.approx(rmse(img, tgt, mask), abs=1e-6)
        assert 0 < rec["rmse"] < 0.2 and rec["ssim"] < 1
        feats.append(features(torch.from_numpy(img)[None, None])[0])
    real = torch.stack([features(torch.from_numpy(_unit(lib[c]["image_uri"]))[None, None])[0] for c in sorted(lib)])
    assert m["fid"]["value"] == pytest.approx(fid(torch.stack(feats), real), rel=1e-6)
    assert m["fid"]["n_real"] == 4 and "checkpoints/demo" in m["fid"]["features"] and "(16, 16, 16)" in m["fid"]["features"]
    assert "real_vs_real" in m["fid"]
    cm = m["confidence_vs_error"]
    assert cm["n_voxels"] == 4 * 32 ** 3 and cm["pearson"] < -0.9 and cm["spearman_subsample"] < -0.5
    low, high = cm["bins"][1], cm["bins"][4]                  # [0.2, 0.4) holds the box, [0.8, 1.0] the rest
    assert low["mean_abs_error"] == pytest.approx(400 / 2000, abs=0.02) and high["mean_abs_error"] < 1e-6
    report = (out / "report.md").read_text()
    assert f"{m['ssim_mean']:.4f}" in report and f"{m['fid']['value']:.4f}" in report
    assert m["fid"]["features"] in report and "LPIPS: not computed" in report
    assert (out / "cm_vs_error.png").read_bytes().startswith(PNG)
    assert json.loads((out / "metrics.json").read_text())["rmse_mean"] == pytest.approx(m["rmse_mean"])


def test_synthesis_against_the_reference_image_same_figures_with_any_thread_count(tmp_path, synthesis_run):
    kw = dict(mode="synthesis", run=str(synthesis_run), target="reference", mask="all", fid_real=("reference",),
              max_samples=3, fid_features=str(ROOT / "checkpoints" / "demo"), fid_resize=(16, 16, 16))
    m = run_evaluation(EvaluateSettings(out=str(tmp_path / "e1"), workers=1, **kw))
    assert [r["target_id"] for r in m["per_sample"]] == [r["reference_id"] for r in m["per_sample"]]
    assert all(r["mask_voxels"] == 32 ** 3 for r in m["per_sample"])
    assert m["fid"]["n_real"] == 2 and m["fid"]["n_synth"] == 3 and "real_vs_real" not in m["fid"]
    m3 = run_evaluation(EvaluateSettings(out=str(tmp_path / "e3"), workers=3, **kw))
    for key in ("per_sample", "fid", "confidence_vs_error", "ssim_mean", "rmse_mean"):
        assert m3[key] == m[key]


def test_evaluate_pairs_in_memory(features, phantoms):
    targets = [_unit_hu(c.image) for c in phantoms[:3]]
    images = [np.clip(t + 0.05, 0, 1) for t in targets]
    masks = [c.label > 0 for c in phantoms[:3]]
    m = evaluate_pairs(images, targets, masks, features)
    assert m["rmse"] == pytest.approx([rmse(a, b, k) for a, b, k in zip(images, targets, masks)])
    assert m["ssim_mean"] == pytest.approx(np.mean([ssim(a, b, k) for a, b, k in zip(images, targets, masks)]))
    assert m["fid"] > 0 and evaluate_pairs(targets, targets, None, features)["fid"] == pytest.approx(0, abs=1e-6)
    assert evaluate_pairs(targets, targets)["ssim_mean"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="as many"):
        evaluate_pairs(images, targets[:2])


def _unit_hu(hu):
    return hu_to_unit(hu).numpy()


# ---- learning curves, settings, job ---------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("m.jsonl", '{"step": 0, "loss": 2.0}\n{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5, "lr": 1e-4}\n'),
    ("m.csv", "step,loss\n0,2.0\n10,1.0\n20,0.5\n"),
    ("m.json", '{"step": [0, 10, 20], "loss": [2.0, 1.0, 0.5]}'),
    ("history.pt", None),
])
def test_learning_curve_formats(tmp_path, name, text):
    uri = tmp_path / name
    if text is None:
        torch.save({"step": torch.tensor([0.0, 10, 20], dtype=torch.float64),
                    "loss": torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)}, uri)
    else:
        uri.write_text(text)
    curve = read_learning_curve(str(uri))
    assert curve["step"].tolist() == [0, 10, 20] and curve["loss"].tolist() == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("kw, match", [
    ({"mode": "train"}, "mode"), ({"target": "x"}, "target"), ({"rdice_radius": -1}, "rdice_radius"),
    ({"nope": 1}, "unknown evaluate settings"),
])
def test_settings_refuse_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        settings_from_dict(kw)


def test_hydra_entry_point_segmentation_with_learning_curve(tmp_path, seg_folders):
    from hydra import compose, initialize_config_dir

    gt, pred, _ = seg_folders
    curve = tmp_path / "train.csv"
    curve.write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(60)))
    job = importlib.import_module("fcas.pipeline.commands.evaluate")   # what jobs/evaluate.py runs
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="evaluate", overrides=[f"data={gt}", f"pred={pred}", f"out={tmp_path / 'out'}",
                                                          f"learning_curve={curve}", "rdice_radius=2"])
    m = job.run(cfg)
    assert m["rdice_radius_voxels"] == 2 and m["learning_curve"]["points"] == 60
    assert m["learning_curve"]["last_loss"] == pytest.approx(1 / 60)
    for name in ("report.md", "metrics.json", "dice_per_class.png", "learning_curve.png"):
        assert storage.exists(str(tmp_path / "out" / name))
    assert "learning_curve.png" in (tmp_path / "out" / "report.md").read_text()


def test_segmentation_on_s3(s3_uri, phantoms):
    """Ground truth, predictions and the report all on s3:// (the test's moto server)."""
    case = phantoms[0]
    nifti.write_nifti(f"{s3_uri}/gt/a_label.nii.gz", case.label, case.affine, kind="label")
    nifti.write_nifti(f"{s3_uri}/pred/a.nii.gz", _perturb(case.label, "shift"), case.affine, kind="label")
    m = run_evaluation(EvaluateSettings(data=f"{s3_uri}/gt", pred=f"{s3_uri}/pred", out=f"{s3_uri}/out"))
    want = dice_per_class(_perturb(case.label, "shift"), case.label, default_schema().cardiac_ids)
    assert m["per_case"][0]["mean_dice"] == pytest.approx(np.mean(list(want.values())))
    saved = json.loads(storage.read_bytes(f"{s3_uri}/out/metrics.json"))
    assert saved["mean_dice"] == pytest.approx(m["mean_dice"])
    assert storage.read_bytes(f"{s3_uri}/out/dice_per_class.png").startswith(PNG)


def test_template_oracles_with_sites_pair_within_the_site_and_the_site_mean_beats_the_population_mean():
    from fcas.evaluation.template_oracles import MASKED, SITE, WHOLE, template_information

    g = dict(shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    out = template_information(range(20, 24), mean_seeds=range(200, 206), site_size=2, **g)
    assert out["site_size"] == 2 and set(out["table"]) == set(MASKED + WHOLE + SITE)
    assert all(len(v["per_pair"]) == 4 and -1 <= min(v["per_pair"]) <= max(v["per_pair"]) <= 1 for v in out["table"].values())
    t = {k: v["mean"] for k, v in out["table"].items()}
    assert t["own_hu_of_B"] > 0.98                              # B (same site) has nearly A's table
    assert t["A_heart_in_site_mean"] > t["A_heart_in_mean"]     # the site's context is information about I_A
    free = template_information(range(20, 24), mean_seeds=range(200, 206), **g)
    assert set(free["table"]) == set(MASKED + WHOLE) and free["site_size"] is None
