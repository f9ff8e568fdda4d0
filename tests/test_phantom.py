"""Procedural cardiac CTA phantom: determinism, grid contract, HU per class, topology, variation, previews."""
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from fcas.labels import default_schema
from fcas.phantom import HU_MAX, HU_MIN, SINGLE_COMPONENT, check_topology, class_volumes, make_case
from fcas.preview import _views, grid_png, triplanar_png

SCHEMA = default_schema()
FAST_SEEDS = range(10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@lru_cache(maxsize=None)
def case(seed, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0)):
    return make_case(seed, shape, spacing)


def test_same_seed_is_bit_identical_and_seeds_differ():
    a, b = make_case(7), case(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    c = case(8)
    assert not np.array_equal(a.label, c.label)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 20


@pytest.mark.parametrize("shape,spacing", [((64, 64, 64), (2.0, 2.0, 2.0)), ((32, 32, 32), (4.0, 4.0, 4.0)),
                                           ((40, 48, 36), (3.0, 2.5, 3.5))])
def test_dtypes_shapes_and_centred_ras_affine(shape, spacing):
    c = case(1, shape, spacing)
    assert c.image.dtype == np.int16 and c.label.dtype == np.uint8
    assert c.image.shape == c.label.shape == shape
    assert c.affine.dtype == np.float64 and c.affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(c.affine)[:3], spacing)
    np.testing.assert_allclose(c.affine[:3, :3], np.diag(spacing))  # RAS+: no flips, no rotation
    centre = c.affine @ np.r_[(np.asarray(shape) - 1) / 2, 1.0]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)
    assert HU_MIN <= c.image.min() and c.image.max() <= HU_MAX
    assert set(np.unique(c.label).tolist()) <= set(SCHEMA.classes.values())
    assert c.seed == 1


# medians per class over a few seeds; coronaries are thin, so partial volume lowers their median
HU_RANGES = {
    "left_ventricle": (300, 460), "left_atrium": (300, 460), "ascending_aorta": (300, 470),
    "right_ventricle": (280, 460), "right_atrium": (280, 460), "pulmonary_artery": (280, 460),
    "lv_myocardium": (80, 150), "coronary_arteries": (150, 460), "lung": (-900, -800),
    "bone": (400, 1500), "soft_tissue": (20, 80), "background": (-150, -40),
}


@pytest.mark.parametrize("name", sorted(HU_RANGES))
def test_hu_median_per_class_in_range(name):
    lo, hi = HU_RANGES[name]
    for seed in (0, 3, 5):
        c = case(seed)
        med = float(np.median(c.image[c.label == SCHEMA.id(name)]))
        assert lo <= med <= hi, f"seed {seed}: median HU of {name} is {med}, expected [{lo}, {hi}]"


def test_left_heart_brighter_than_myocardium_and_blood_contrast():
    c = case(2)
    med = {n: np.median(c.image[c.label == SCHEMA.id(n)]) for n in ("left_ventricle", "lv_myocardium", "lung")}
    assert med["left_ventricle"] - med["lv_myocardium"] > 150
    assert med["lv_myocardium"] - med["lung"] > 800


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_topology_at_demo_grid(seed):
    c = case(seed)
    topo = check_topology(c.label)
    assert topo["missing"] == []
    assert topo["components"] == {n: 1 for n in SINGLE_COMPONENT}
    assert topo["coronary_components"] == 2  # left and right tree, apart from each other
    assert topo["coronary_attached"]
    assert topo["myo_wrap"] >= 0.75
    assert topo["ok"]
    assert c.info["fixed_voxels"] <= 5  # the safety net is (almost) never needed


@pytest.mark.parametrize("seed", range(5))
def test_tiny_grid_keeps_all_classes_and_attached_coronaries(seed):
    c = case(seed, (32, 32, 32), (4.0, 4.0, 4.0))
    topo = check_topology(c.label)
    assert topo["missing"] == []
    assert topo["coronary_attached"] and topo["coronary_components"] in (1, 2)
    assert topo["ok"]


def test_coronaries_lie_outside_the_myocardium_and_are_thin():
    c = case(4)
    cor = c.label == SCHEMA.id("coronary_arteries")
    vols = class_volumes(c.label)
    assert 100 < vols["coronary_arteries"] < 0.5 * vols["lv_myocardium"]
    # most coronary voxels have non-cardiac-chamber neighbours (fat): they run on the surface
    shell = ndimage.binary_dilation(cor) & ~cor
    assert (c.label[shell] == 0).mean() > 0.3


def test_volumes_vary_across_seeds():
    vols = [class_volumes(case(s).label) for s in FAST_SEEDS]
    for name in ("left_ventricle", "right_ventricle", "left_atrium", "right_atrium", "lv_myocardium",
                 "ascending_aorta", "pulmonary_artery", "coronary_arteries"):
        v = np.array([row[name] for row in vols], float)
        assert v.min() > 0
        assert v.std() / v.mean() > 0.05, f"{name}: CV {v.std() / v.mean():.3f}"


def test_anisotropic_spacing_gives_the_same_anatomy_in_mm():
    iso = case(6)
    ani = case(6, (52, 64, 40), (2.5, 2.0, 3.2))
    assert check_topology(ani.label)["missing"] == []
    for name in ("left_ventricle", "lv_myocardium", "right_ventricle", "ascending_aorta"):
        v_iso = class_volumes(iso.label)[name] * 8.0
        v_ani = class_volumes(ani.label)[name] * 2.5 * 2.0 * 3.2
        assert abs(v_ani / v_iso - 1) < 0.2, f"{name}: {v_ani:.0f} mm3 vs {v_iso:.0f} mm3"


@pytest.mark.parametrize("shape,spacing", [((64, 64), (2.0, 2.0, 2.0)), ((64, 64, 4), (2, 2, 2)),
                                           ((64, 64, 64), (2.0, 0.0, 2.0)), ((64, 64, 64), (2.0, 2.0))])
def test_bad_grid_raises(shape, spacing):
    with pytest.raises(ValueError):
        make_case(0, shape, spacing)


def test_check_topology_detects_broken_labels():
    lab = case(0).label.copy()
    aorta = SCHEMA.id("ascending_aorta")
    cor = SCHEMA.id("coronary_arteries")
    lab[lab == cor] = 0
    lab[2:4, 2:4, 2:4] = cor                     # a detached coronary blob
    lab[60:62, 60:62, 60:62] = SCHEMA.id("left_ventricle")  # a second LV component
    topo = check_topology(lab)
    assert not topo["ok"] and not topo["coronary_attached"]
    assert topo["components"]["left_ventricle"] == 2
    lab[lab == aorta] = 0
    assert "ascending_aorta" in check_topology(lab)["missing"]


# ---- previews ----------------------------------------------------------------------------------
def test_noise_free_variant_is_the_same_case_without_its_noise():
    from fcas.phantom import make_case

    noisy, clean = make_case(3, (32, 32, 32), (4.0, 4.0, 4.0)), make_case(3, (32, 32, 32), (4.0, 4.0, 4.0), noise=False)
    assert np.array_equal(noisy.label, clean.label) and noisy.info == clean.info
    diff = noisy.image.astype(np.float32) - clean.image.astype(np.float32)
    assert 15 < diff.std() < 40 and abs(diff.mean()) < 3   # the drawn 20-35 HU noise, nothing else


def test_sample_preview_shows_image_overlay_and_confidence_rows(tmp_path):
    from fcas.preview import sample_png

    c = case(0)
    conf = np.linspace(0, 1, c.image.size, dtype=np.float32).reshape(c.image.shape)
    three = sample_png(c.image, c.label, conf, tmp_path / "s.png", title="sample 0", affine=c.affine)
    two = sample_png(c.image, c.label, None)
    assert three.startswith(PNG_MAGIC) and (tmp_path / "s.png").read_bytes() == three
    h3, h2 = int.from_bytes(three[20:24], "big"), int.from_bytes(two[20:24], "big")  # PNG IHDR height
    assert h3 > h2 * 1.3  # one more row of panels
    with pytest.raises(ValueError, match="confidence map shape"):
        sample_png(c.image, c.label, conf[:-1])


def test_triplanar_png_is_a_png_and_written_atomically(tmp_path):
    c = case(0)
    out = tmp_path / "sub" / "p.png"
    data = triplanar_png(c.image, c.label, out, title="seed 0", affine=c.affine)
    assert data.startswith(PNG_MAGIC) and out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["p.png"]  # no temporary file left
    assert triplanar_png(c.image, c.label, None).startswith(PNG_MAGIC)
    grid = grid_png([case(0), case(1)], tmp_path / "g.png")
    assert grid.startswith(PNG_MAGIC) and len(grid) > len(data)


def test_preview_orientation_follows_the_affine():
    """Anterior up in the axial panel, superior up in coronal/sagittal, also for LPS-stored arrays."""
    img = np.zeros((20, 24, 28), np.int16)
    lab = np.zeros_like(img, dtype=np.uint8)
    lab[2:18, 16:22, 2:26] = 1    # anterior slab (high j)
    lab[2:18, 2:22, 20:26] = 3    # superior slab (high k)
    lab[15:19, 2:22, 2:26] = 4    # right-sided slab (high i = patient right)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    views = _views(img, lab, ras, SCHEMA)
    axial, coronal, sagittal = (v[1] for v in views)
    rows = lambda m, cid: np.nonzero((m == cid).any(1))[0]  # noqa: E731
    cols = lambda m, cid: np.nonzero((m == cid).any(0))[0]  # noqa: E731
    assert rows(axial, 1).max() < axial.shape[0] / 2            # anterior at the top of the axial view
    assert cols(sagittal, 1).max() < sagittal.shape[1] / 2      # and on the left of the sagittal view
    assert rows(coronal, 3).max() < coronal.shape[0] / 2       # superior at the top of the coronal view
    assert rows(sagittal, 3).max() < sagittal.shape[0] / 2
    assert cols(axial, 4).max() < axial.shape[1] / 2            # patient right on the left (radiological)
    # the same volume stored LPS (i and j flipped) renders identically
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:2, 3] = [2.0 * 19, 2.0 * 23]
    views_lps = _views(img[::-1, ::-1], lab[::-1, ::-1], lps, SCHEMA)
    for a, b in zip(views, views_lps):
        assert np.array_equal(a[1], b[1])


def test_preview_rejects_mismatched_arrays():
    with pytest.raises(ValueError):
        triplanar_png(np.zeros((8, 8, 8)), np.zeros((8, 8, 9), np.uint8), None)


def test_lowdose_domain_keeps_the_anatomy_and_lowers_contrast_and_raises_noise():
    std = make_case(4, (32, 32, 32), (4.0, 4.0, 4.0))
    low = make_case(4, (32, 32, 32), (4.0, 4.0, 4.0), domain="lowdose")
    assert np.array_equal(std.label, low.label) and low.info["domain"] == "lowdose"
    lv, myo = SCHEMA.id("left_ventricle"), SCHEMA.id("lv_myocardium")
    contrast = lambda c: np.median(c.image[c.label == lv]) - np.median(c.image[c.label == myo])  # noqa: E731
    assert 0.4 < contrast(low) / contrast(std) < 0.7           # the blood's enhancement over myocardium at 55 %
    assert low.info["hu"]["noise"] == pytest.approx(2.8 * std.info["hu"]["noise"], abs=0.2)
    noise = lambda c, d: np.std(c.image.astype(np.float32) - make_case(4, (32, 32, 32), (4.0, 4.0, 4.0), noise=False,  # noqa: E731
                                                                        domain=d).image)
    assert noise(low, "lowdose") == pytest.approx(2.8 * noise(std, "standard"), rel=0.05)


def test_unknown_domain_is_refused_in_the_case_and_in_the_source():
    from fcas.diffusion.data import load_cases

    with pytest.raises(ValueError, match="unknown phantom domain 'mri'"):
        make_case(0, (32, 32, 32), (4.0, 4.0, 4.0), domain="mri")
    with pytest.raises(ValueError, match="phantom:1@3:mri.*unknown phantom domain"):
        load_cases("phantom:1@3:mri", (32, 32, 32), (4.0, 4.0, 4.0))
    a = load_cases("phantom:1@3:lowdose", (32, 32, 32), (4.0, 4.0, 4.0))
    assert a.case_ids == ["phantom_00003"] and np.array_equal(a.labels[0].numpy(), make_case(3, (32, 32, 32), (4.0, 4.0, 4.0)).label)


# ---- sites: families sharing HU table and surroundings ---------------------------------------------
def test_a_site_at_spread_one_is_the_independent_case_and_at_zero_shares_its_table():
    g = ((32, 32, 32), (4.0, 4.0, 4.0))
    free = make_case(5, *g)
    same = make_case(5, *g, site=3, site_spread=1.0)
    assert np.array_equal(free.image, same.image) and np.array_equal(free.label, same.label)
    assert same.info["site"] == 3 and free.info["site"] is None
    a, b = (make_case(s, *g, site=3, site_spread=0.0) for s in (5, 6))
    assert a.info["hu"] == b.info["hu"]                        # the site's table exactly
    assert not np.array_equal(a.label, b.label)                # each case keeps its own heart
    free_b = make_case(6, *g)
    assert np.array_equal(np.isin(b.label, SCHEMA.cardiac_ids), np.isin(free_b.label, SCHEMA.cardiac_ids))
    with pytest.raises(ValueError, match="site spread must be in"):
        make_case(5, *g, site=3, site_spread=1.5)


def test_cases_of_one_site_are_closer_than_cases_of_two_sites():
    from fcas.phantom.sites import DEFAULT_SPREAD

    g = ((32, 32, 32), (4.0, 4.0, 4.0))
    keys = ("blood_l", "myo", "noise", "lung", "soft")
    table = lambda s, k: np.array([make_case(s, *g, site=k).info["hu"][x] for x in keys])  # noqa: E731
    within = np.abs(table(10, 0) - table(11, 0)).mean()
    across = np.abs(table(10, 0) - table(12, 1)).mean()
    assert within < 0.6 * across
    # the spread scales the case's deviation from its site: spread 0.3 keeps 30 % of it
    t0 = np.array([make_case(10, *g, site=0, site_spread=0.0).info["hu"][x] for x in keys])
    t1 = np.array([make_case(10, *g, site=0, site_spread=1.0).info["hu"][x] for x in keys])
    assert np.allclose(table(10, 0), t0 + DEFAULT_SPREAD * (t1 - t0), atol=0.06)   # info rounds to 0.1 HU
