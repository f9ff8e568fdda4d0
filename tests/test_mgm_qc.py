"""MGM topology QC, mgm_with_qc redraws and the Ray Data stage (fcas.deform.qc/generate/stage)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from fcas.deform import (MGMConfig, MGMParams, QCThresholds, draw_params, load_mgm_config, mask_stats,
                         mgm_with_qc, param_rng, prepare_template, qc_compare)
from fcas.deform.stage import MGMStage
from fcas.labels import default_schema

S = default_schema()
LV, MYO, AO, COR, LA = (S.id(n) for n in ("left_ventricle", "lv_myocardium", "ascending_aorta",
                                          "coronary_arteries", "left_atrium"))
SPACING = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def cases():
    from fcas.phantom import make_case

    return [make_case(s, (32, 32, 32), SPACING) for s in range(3)]


@pytest.fixture(scope="module")
def template(cases):
    return S.cardiac_only(cases[0].label)


def _qc(before_mask, after_mask, th=None):
    th = th or QCThresholds()
    return qc_compare(mask_stats(before_mask, th), mask_stats(after_mask, th), th)


# ---- QC on hand-made defects ------------------------------------------------------------------------
def test_template_against_itself_passes(template):
    q = _qc(template, template)
    assert q.passed and q.failures == ()
    assert all(v == 1.0 for v in q.volume_ratio.values())
    assert q.coronary_attached_before == q.coronary_attached_after == 1.0
    flat = q.to_flat()
    assert flat["qc_passed"] == 1.0 and all(isinstance(v, float) for v in flat.values())


def _cut_coronaries_off_the_aorta(m):
    m = m.copy()
    near = ndi.binary_dilation(m == AO, np.ones((3, 3, 3), bool), iterations=2)
    m[near & (m == COR)] = 0
    return m


def _split_lv(m):
    m = m.copy()
    idx = np.argwhere(m == LV)
    mid = int(np.median(idx[:, 2]))
    m[:, :, mid - 1:mid + 1][m[:, :, mid - 1:mid + 1] == LV] = 0
    return m


def _strip_myocardium(m):
    m = m.copy()
    m[m == MYO] = 0
    return m


def _shrink_la(m):
    m = m.copy()
    la = m == LA
    m[la & ~ndi.binary_erosion(la, iterations=1)] = 0
    return m


@pytest.mark.parametrize(
    "defect, reason",
    [
        (_cut_coronaries_off_the_aorta, "coronary attached"),
        (_split_lv, "left_ventricle components"),
        (_strip_myocardium, "lv_myocardium missing"),
        (_shrink_la, "left_atrium volume ratio"),
    ],
)
def test_qc_catches_defects(template, defect, reason):
    q = _qc(template, defect(template))
    assert not q.passed
    assert any(f.startswith(reason) for f in q.failures), q.failures


def test_lost_wrap_is_reported(template):
    m = template.copy()
    lv = m == LV
    ring = ndi.binary_dilation(lv, np.ones((3, 3, 3), bool)) & ~lv & (m == MYO)
    m[ring] = 0  # a gap between LV and myocardium: myocardium no longer wraps the LV
    q = _qc(template, m, QCThresholds(volume_ratio=(0.0, 10.0), max_extra_components=10))
    assert q.wrap_after["left_ventricle__lv_myocardium"] < 0.5 * q.wrap_before["left_ventricle__lv_myocardium"]
    assert any("wraps left_ventricle" in f for f in q.failures)


def test_qc_thresholds_are_configurable(template):
    shrunk = _shrink_la(template)
    assert _qc(template, shrunk, QCThresholds(volume_ratio=(0.0, 2.0))).passed
    assert not _qc(template, _split_lv(template), QCThresholds(max_extra_components=0)).passed
    assert _qc(template, _split_lv(template), QCThresholds(max_extra_components=1, volume_ratio=(0.0, 2.0))).passed


def test_qc_flat_keys_are_fixed_per_config(template):
    a = _qc(template, template).to_flat()
    b = _qc(template, _strip_myocardium(template)).to_flat()
    assert a.keys() == b.keys()
    assert math.isnan(b["qc_wrap_left_ventricle__lv_myocardium_after"]) or b["qc_wrap_left_ventricle__lv_myocardium_after"] == 0


def test_qc_rejects_unknown_class_names():
    with pytest.raises(ValueError, match="unknown class"):
        QCThresholds(adjacency=(("left_ventricle", "liver"),)).check_schema(S)


# ---- mgm_with_qc --------------------------------------------------------------------------------------
def test_mgm_with_qc_is_deterministic_and_records_tries(cases):
    cfg = load_mgm_config()
    a = mgm_with_qc(cases[0].label, SPACING, 11, 5, cfg)
    b = mgm_with_qc(cases[0].label, SPACING, 11, 5, cfg)
    c = mgm_with_qc(cases[0].label, SPACING, 11, 6, cfg)
    assert np.array_equal(a.mask, b.mask) and a.params == b.params and a.tries == b.tries
    assert not np.array_equal(a.mask, c.mask)
    assert a.tries == len(a.failures) and 1 <= a.tries <= cfg.max_tries
    assert a.params == draw_params(cfg.ranges, param_rng(11, 5, a.tries - 1))
    assert set(np.unique(a.mask)) <= set(S.cardiac_ids) | {0}  # keep: cardiac
    row = a.to_flat()
    assert row["mgm_tries"] == a.tries and row["qc_passed"] == float(a.qc.passed)


def test_failing_qc_redraws_up_to_max_tries_then_flags_or_falls_back(cases):
    impossible = MGMConfig.from_dict({"qc": {"volume_ratio": [1.0, 1.0]}, "max_tries": 3})
    r = mgm_with_qc(cases[1].label, SPACING, 0, 0, impossible)
    assert r.tries == 3 and not r.qc.passed and not r.fallback
    assert r.params == draw_params(impossible.ranges, param_rng(0, 0, 2))
    assert all(f for f in r.failures)
    ident = MGMConfig.from_dict({"qc": {"volume_ratio": [1.0, 1.0]}, "max_tries": 2, "on_fail": "identity"})
    r = mgm_with_qc(cases[1].label, SPACING, 0, 0, ident)
    assert r.fallback and r.qc.passed and r.params.is_identity and r.tries == 2
    assert np.array_equal(r.mask, S.cardiac_only(cases[1].label))


def test_plan_params_are_used_for_the_first_try(cases):
    cfg = load_mgm_config()
    plan = MGMParams(rotation_deg_0=4.0, alpha_mm=1.0, field_seed=3.0)
    r = mgm_with_qc(cases[0].label, SPACING, 1, 2, cfg, params=plan)
    assert r.tries == 1 and r.params == plan  # a mild transform passes QC on the first try


def test_mgm_with_qc_bad_template_raises():
    only_lung = np.zeros((16, 16, 16), np.uint8)
    only_lung[4:10, 4:10, 4:10] = S.id("lung")
    with pytest.raises(ValueError, match="empty"):
        mgm_with_qc(only_lung, 1.0, 0, 0, load_mgm_config())  # nothing cardiac to deform
    with pytest.raises(ValueError, match="max_tries"):
        mgm_with_qc(np.ones((8, 8, 8), np.uint8), 1.0, 0, 0, load_mgm_config(), max_tries=0)


def test_phantoms_pass_qc_with_default_ranges(cases):
    """Acceptance in miniature (32^3; the 64^3 phantom:20 figures come from benchmarks/mgm.py --study)."""
    cfg = load_mgm_config()
    for case in cases:
        for sid in range(2):
            r = mgm_with_qc(case.label, SPACING, 3, sid, cfg)
            assert r.qc.passed, r.failures
            for name in S.cardiac:
                assert (r.mask == S.id(name)).any()
            for name in ("left_ventricle", "right_ventricle", "left_atrium", "right_atrium",
                         "lv_myocardium", "ascending_aorta", "pulmonary_artery"):
                assert r.qc.components_after[name] == 1
            assert r.qc.coronary_attached_after >= 0.99
            lo, hi = cfg.qc.volume_ratio
            assert all(lo <= v <= hi for v in r.qc.volume_ratio.values())


# ---- the Ray Data stage -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template_uris(cases, tmp_path_factory):
    from fcas.io.nifti import write_nifti

    d = tmp_path_factory.mktemp("mgm_templates")
    uris = []
    for c in cases:
        uri = str(d / f"template_{c.seed:03d}.nii.gz")
        write_nifti(uri, c.label, c.affine, kind="label")
        uris.append(uri)
    return uris


def _plans(n, uris, run_seed=7):
    ids = np.arange(n, dtype=np.int64)
    return {"sample_id": ids, "template_uri": np.array([uris[i % len(uris)] for i in ids]),
            "run_seed": np.full(n, run_seed, np.int64), "reference_id": ids + 100}


def test_stage_batch_matches_mgm_with_qc(template_uris, cases):
    stage = MGMStage(load_mgm_config())
    out = stage(_plans(4, template_uris))
    assert out["mask"].shape == (4, 32, 32, 32) and out["mask"].dtype == np.uint8
    assert np.array_equal(out["reference_id"], np.arange(4) + 100)  # other columns pass through
    assert out["affine"].shape == (4, 4, 4) and np.allclose(out["spacing"], 4.0)
    for i in range(4):
        c = cases[i % len(cases)]
        r = mgm_with_qc(c.label, SPACING, 7, i, load_mgm_config())
        assert np.array_equal(out["mask"][i], r.mask)
        assert out["mgm_tries"][i] == r.tries and out["qc_passed"][i] == float(r.qc.passed)
        assert MGMParams.from_flat({k: out[k][i] for k in out if k.startswith("mgm_")}, prefix="mgm_") == r.params
    assert out["mgm_read_s"][3] == 0.0  # template 0 came from the cache
    assert all(isinstance(s, str) for s in out["qc_failures"])


def test_stage_uses_plan_params_and_checks_columns(template_uris):
    stage = MGMStage(load_mgm_config())
    plan = MGMParams(rotation_deg_2=-3.0, alpha_mm=0.5, field_seed=1.0)
    batch = _plans(2, template_uris)
    batch.update({f"mgm_{k}": np.full(2, v) for k, v in plan.to_flat().items()})
    out = stage(batch)
    assert out["mgm_rotation_deg_2"].tolist() == [-3.0, -3.0]
    with pytest.raises(ValueError, match="template_uri"):
        stage({"sample_id": np.arange(2), "run_seed": np.zeros(2)})


@pytest.mark.slow
def test_stage_runs_in_ray_data_map_batches(ray_local, template_uris):
    import ray

    cfg = load_mgm_config()
    uris = template_uris

    def plan(batch):
        ids = batch["id"].astype(np.int64)
        return {"sample_id": ids, "template_uri": np.array([uris[i % len(uris)] for i in ids]),
                "run_seed": np.full(len(ids), 7, np.int64)}

    # a stage instance is a plain function to Ray Data: CPU tasks, fused with the plan step
    ds = (ray.data.range(6, override_num_blocks=1)
          .map_batches(plan, batch_format="numpy")
          .map_batches(MGMStage(cfg.to_dict()), batch_size=3, num_cpus=1, batch_format="numpy"))
    rows = sorted(ds.take_all(), key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in rows] == list(range(6))
    direct = MGMStage(cfg)(_plans(6, uris))
    for i, r in enumerate(rows):
        assert np.array_equal(np.asarray(r["mask"]), direct["mask"][i])  # same bits in a Ray worker
        assert r["mgm_tries"] == direct["mgm_tries"][i]
