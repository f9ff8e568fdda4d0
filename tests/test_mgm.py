"""MGM (fcas.deform): parameters, field, one-gather warp + closing vs the literal scipy Eq. 6, inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fcas.deform import (CLOSINGS, MGMConfig, MGMParams, MGMRanges, draw_params, load_mgm_config,
                         mgm_deform, param_rng, warp_labels)
from fcas.deform.field import control_coordinates, dense_coordinates, index_affine
from fcas.deform.mgm import OFFSET, OVERLAPS
from fcas.deform.reference import literal_coordinates, literal_mgm
from fcas.labels import default_schema

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def phantom32():
    from fcas.phantom import make_case

    case = make_case(0, (32, 32, 32), (4.0, 4.0, 4.0))
    return default_schema().cardiac_only(case.label)


def _blobs(shape=(40, 36, 32), seed=0) -> np.ndarray:
    """Eight overlapping ellipsoids + a thin tube, away from the border (synthetic 8-class mask)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for cid in (2, 1, 4, 3, 7, 6, 5):
        c = [rng.uniform(0.35 * n, 0.65 * n) for n in shape]
        r = [rng.uniform(0.1 * n, 0.2 * n) for n in shape]
        mask[sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r)) < 1] = cid
    mask[shape[0] // 2, 6:shape[1] - 6, shape[2] // 2] = 8
    return mask


# ---- parameters -----------------------------------------------------------------------------------
def test_draw_is_deterministic_per_run_sample_try():
    r = MGMRanges()
    a = draw_params(r, param_rng(7, 3, 0))
    assert a == draw_params(r, param_rng(7, 3, 0))
    assert a != draw_params(r, param_rng(7, 4, 0))
    assert a != draw_params(r, param_rng(7, 3, 1))
    assert a != draw_params(r, param_rng(8, 3, 0))


def test_draws_stay_in_ranges():
    r = MGMRanges.from_dict(load_mgm_config().ranges.to_dict())
    for i in range(50):
        p = draw_params(r, param_rng(0, i))
        assert all(r.rotation_deg[0] <= v <= r.rotation_deg[1] for v in p.rotation_deg)
        assert r.scale_iso[0] <= p.scale_iso <= r.scale_iso[1]
        assert all(r.translation_mm[0] <= v <= r.translation_mm[1] for v in p.translation_mm)
        assert r.alpha_mm[0] <= p.alpha_mm <= r.alpha_mm[1] and r.zeta_mm[0] <= p.zeta_mm <= r.zeta_mm[1]


def test_params_flat_round_trip_is_exact_and_all_floats():
    p = draw_params(MGMRanges(), param_rng(1, 2))
    flat = p.to_flat(prefix="mgm_")
    assert all(type(v) is float for v in flat.values())
    assert set(flat) == {"mgm_" + n for n in MGMParams.field_names()}
    assert MGMParams.from_flat(flat, prefix="mgm_") == p
    with pytest.raises(ValueError, match="missing"):
        MGMParams.from_flat({"rotation_deg_0": 1.0})


@pytest.mark.parametrize(
    "ranges, field",
    [
        ({"scale_iso": [1.2, 1.0]}, "scale_iso"),          # low > high
        ({"zeta_mm": [-5.0, 10.0]}, "zeta_mm"),            # negative smoothness
        ({"zeta_mm": [0.0, 10.0]}, "zeta_mm"),             # zero smoothness
        ({"alpha_mm": [-1.0, 2.0]}, "alpha_mm"),           # negative magnitude
        ({"scale_axis": [0.0, 1.0]}, "scale_axis"),        # zero scale
        ({"rotation_deg": [-200.0, 0.0]}, "rotation_deg"),
        ({"shear": [-1.5, 0.1]}, "shear"),
        ({"translation_mm": [1.0]}, "translation_mm"),     # not a pair
        ({"translation_mm": ["a", "b"]}, "translation_mm"),
        ({"alpha_mm": [0.0, float("nan")]}, "alpha_mm"),
        ({"rotation": [0.0, 1.0]}, "rotation"),            # unknown key
    ],
)
def test_invalid_ranges_name_the_field(ranges, field):
    with pytest.raises(ValueError, match=field):
        MGMRanges.from_dict(ranges)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"scale_iso": 0.0}, "scale_iso"), ({"zeta_mm": -1.0}, "zeta_mm"), ({"alpha_mm": -0.1}, "alpha_mm"),
     ({"field_seed": 1.5}, "field_seed"), ({"rotation_deg_0": float("inf")}, "rotation_deg_0")],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MGMParams(**kwargs)


@pytest.mark.parametrize(
    "cfg, field",
    [({"closing": "open"}, "closing"), ({"max_tries": 0}, "max_tries"), ({"keep": "lungs"}, "keep"),
     ({"overlap": "first"}, "overlap"),
     ({"on_fail": "explode"}, "on_fail"), ({"colsing": "closing"}, "colsing"),
     ({"qc": {"volume_ratio": [1.2, 2.0]}}, "volume_ratio"), ({"qc": {"connectivity": 8}}, "connectivity"),
     ({"qc": {"adjacency": [["left_ventricle"]]}}, "adjacency"), ({"ranges": {"zeta_mm": [3, 1]}}, "zeta_mm")],
)
def test_invalid_config_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        MGMConfig.from_dict(cfg)


def test_config_from_an_omegaconf_node():
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "configs" / "mgm" / "default.yaml")
    node.ranges.alpha_mm = [0.5, 2.0]  # a Hydra override
    cfg = MGMConfig.from_dict(node)
    assert cfg.ranges.alpha_mm == (0.5, 2.0) and cfg.ranges.zeta_mm == load_mgm_config().ranges.zeta_mm
    assert cfg.qc == load_mgm_config().qc


def test_default_config_loads_and_round_trips():
    cfg = load_mgm_config("default")
    assert (cfg.closing, cfg.overlap) == ("closing", "keep")  # the measured default (fcas.deform.mgm docstring)
    assert MGMConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cfg.digest()) == 16
    for path in sorted((ROOT / "configs" / "mgm").glob("*.yaml")):
        load_mgm_config(str(path))  # every file of the group is valid
    with pytest.raises(ValueError, match="unknown MGM config"):
        load_mgm_config("nope")


# ---- identity, equivalence with the literal Eq. 6 ---------------------------------------------------
@pytest.mark.parametrize("closing", CLOSINGS)
def test_identity_returns_the_mask_bit_exact(closing, phantom32):
    out = mgm_deform(phantom32, (4.0, 4.0, 4.0), MGMParams(), closing=closing)
    assert out.dtype == np.uint8 and np.array_equal(out, phantom32)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 2.5)])
def test_identity_warp_itself_is_bit_exact(spacing):
    mask = _blobs()
    mask[0, 0, 0] = mask[-1, -1, -1] = 3  # corners too
    grid = control_coordinates(MGMParams(), mask.shape, spacing)
    assert np.array_equal(warp_labels(mask, grid), mask)


def _random_params(seed: int, **over) -> MGMParams:
    r = MGMRanges(rotation_deg=(-15, 15), alpha_mm=(1.0, 3.0), zeta_mm=(8.0, 14.0))
    p = draw_params(r, param_rng(99, seed)).to_flat()
    p.update(over)
    return MGMParams(**p)


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("closing", CLOSINGS)
@pytest.mark.parametrize("seed, spacing", [(0, (1.0, 1.0, 1.0)), (1, (0.8, 1.1, 1.6)), (2, (2.0, 1.0, 1.0))])
def test_fast_path_equals_literal_per_class_formulation(closing, overlap, seed, spacing):
    """Same coordinates -> per-class map_coordinates + max/min filters + union == one gather + bit closing."""
    mask = _blobs(seed=seed)
    p = _random_params(seed)
    ours = mgm_deform(mask, spacing, p, closing=closing, overlap=overlap)
    coords = dense_coordinates(p, mask.shape, spacing, offset=OFFSET) - np.float32(OFFSET)
    ref = literal_mgm(mask, coords, closing=closing, overlap=overlap)
    assert np.array_equal(ours, ref), int((ours != ref).sum())


@pytest.mark.parametrize("case", range(6))
def test_fast_path_equals_literal_on_random_grids_up_to_the_border_rule(case):
    """Random labels up to the border, odd shapes (a length-1 axis too), strong transforms.

    Our reads keep the half voxel beyond the outer voxel centres; scipy (mode="constant") does not.
    Emulating our rule in the literal (pad one zero voxel, shift coordinates by one) is bit-exact.
    """
    rng = np.random.default_rng(case)
    shape = tuple(int(v) for v in rng.integers(2, 30, 3))
    if case == 0:
        shape = (1, *shape[1:])
    mask = rng.integers(0, 9, shape).astype(np.uint8)
    mask[rng.random(shape) < 0.5] = 0
    mask.flat[0] = 1
    sp = tuple(rng.uniform(0.5, 3.0, 3))
    strong = MGMRanges(rotation_deg=(-40, 40), scale_iso=(0.5, 1.6), shear=(-0.3, 0.3),
                       translation_mm=(-20, 20), alpha_mm=(0, 8), zeta_mm=(2, 30))
    p = draw_params(strong, param_rng(5, case))
    coords = dense_coordinates(p, shape, sp, offset=OFFSET) - np.float32(OFFSET) + np.float32(1)
    for closing in CLOSINGS:
        ours = mgm_deform(mask, sp, p, closing=closing, overlap="priority")
        assert np.array_equal(ours, literal_mgm(np.pad(mask, 1), coords, closing=closing))


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_surroundings_warped_but_not_closed(overlap):
    """closed_classes='cardiac': lung/bone/soft tissue are warped only, cardiac classes closed (literal check)."""
    mask = _blobs(seed=3)
    mask[mask == 2] = default_schema().id("lung")
    mask[mask == 4] = default_schema().id("soft_tissue")
    p = _random_params(3)
    ours = mgm_deform(mask, 1.0, p, closing="closing", overlap=overlap, closed_classes="cardiac")
    coords = dense_coordinates(p, mask.shape, 1.0, offset=OFFSET) - np.float32(OFFSET)
    closed = literal_mgm(default_schema().cardiac_only(mask), coords, closing="closing", overlap=overlap)
    plain = literal_mgm(mask, coords, closing="none")
    if overlap == "keep":
        expect = np.where(plain != 0, plain, closed)
    else:  # priority among all classes; surroundings rank lowest in the schema
        expect = np.where(closed != 0, closed, plain)
    assert np.array_equal(ours, expect)


@pytest.mark.parametrize("seed, spacing", [(3, (1.0, 1.0, 1.0)), (4, (0.6, 0.9, 1.7)), (5, (1.5, 1.5, 1.5))])
def test_affine_only_agrees_with_literal_scipy_reference(seed, spacing, phantom32):
    """Independent per-voxel affine (no control grid) through scipy: >= 99% identical voxels.

    Away from the border the two agree exactly (blobs); the phantom touches the grid border, where
    scipy's mode="constant" drops the outer half voxel and we do not (fcas.deform.mgm docstring).
    """
    p = _random_params(seed, alpha_mm=0.0)
    blobs = _blobs(seed=seed)
    for mask, need in ((blobs, 1.0), (phantom32, 0.99)):
        ref = literal_mgm(mask, literal_coordinates(p, mask.shape, spacing), closing="maxpool")
        ours = mgm_deform(mask, spacing, p, closing="maxpool", overlap="priority")
        assert (ours == ref).mean() >= need


def test_affine_index_matrix_matches_the_dense_field():
    p = _random_params(6, alpha_mm=0.0)
    shape, sp = (20, 24, 28), (0.9, 1.3, 2.0)
    m = index_affine(p, shape, sp)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    expect = (m[:3, :3] @ idx + m[:3, 3:]).reshape(3, *shape)
    assert np.abs(dense_coordinates(p, shape, sp) - expect).max() < 1e-3


def test_translation_in_mm_shifts_by_whole_voxels():
    mask = _blobs()
    out = mgm_deform(mask, (1.0, 1.0, 2.0), MGMParams(translation_mm_2=4.0), closing="none")
    assert np.array_equal(out[:, :, 2:], mask[:, :, :-2])  # +4 mm at 2 mm spacing = +2 voxels
    assert not out[:, :, :2].any()


def test_rotation_is_physical_under_anisotropic_spacing():
    """A ball in mm is an ellipsoid in voxels at spacing (1, 1, 2); a 90 deg turn about axis 0 keeps it."""
    shape, sp = (32, 48, 24), (1.0, 1.0, 2.0)
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    c = [(n - 1) / 2 for n in shape]
    ball = (sum(((gi - ci) * s) ** 2 for gi, ci, s in zip(g, c, sp)) < 14.0**2).astype(np.uint8)
    out = mgm_deform(ball, sp, MGMParams(rotation_deg_0=90.0), closing="none")
    inter, union = np.logical_and(out, ball).sum(), np.logical_or(out, ball).sum()
    assert inter / union > 0.93
    assert abs(int(out.sum()) / int(ball.sum()) - 1) < 0.05


def test_non_rigid_field_has_the_requested_magnitude():
    p = MGMParams(alpha_mm=2.5, zeta_mm=12.0, field_seed=5.0)
    shape, sp = (48, 48, 48), (1.5, 1.5, 1.5)
    c = (np.asarray(shape) - 1) / 2
    disp = dense_coordinates(p, shape, sp) - np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    rms_mm = math.sqrt(float(np.mean(np.sum((disp * sp[0]) ** 2, axis=0))))
    assert 2.0 < rms_mm < 3.0  # the control-grid RMS is exactly alpha; voxels sample it
    assert np.abs(disp).max() * sp[0] < 6 * 2.5
    del c


def test_same_params_same_mask_different_seeds_differ(phantom32):
    r = load_mgm_config().ranges
    a = mgm_deform(phantom32, 4.0, draw_params(r, param_rng(0, 1)))
    b = mgm_deform(phantom32, 4.0, draw_params(r, param_rng(0, 1)))
    c = mgm_deform(phantom32, 4.0, draw_params(r, param_rng(0, 2)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_threads_do_not_change_the_result():
    mask = _blobs(shape=(64, 40, 36))
    p = _random_params(7)
    assert np.array_equal(mgm_deform(mask, 1.0, p, num_threads=1), mgm_deform(mask, 1.0, p, num_threads=2))


def test_large_transform_falls_back_to_clipping():
    mask = _blobs()
    p = MGMParams(translation_mm_0=-300.0)  # everything leaves the grid
    assert not mgm_deform(mask, 1.0, p, closing="none").any()
    p = MGMParams(scale_iso=0.2)  # zoom out: coordinates reach far outside, padding would be huge
    out = mgm_deform(mask, 1.0, p, closing="none")
    ref = literal_mgm(mask, dense_coordinates(p, mask.shape, 1.0, offset=OFFSET) - np.float32(OFFSET), closing="none")
    assert np.array_equal(out, ref)


def test_closing_variants_relate_as_documented(phantom32):
    """maxpool ⊇ closing ⊇ none per foreground voxel; closing keeps volumes, maxpool grows thin classes."""
    p = draw_params(load_mgm_config().ranges, param_rng(3, 3))
    none, mp, cl = (mgm_deform(phantom32, 4.0, p, closing=v, overlap="priority") for v in ("none", "maxpool", "closing"))
    assert (mp > 0).sum() >= (cl > 0).sum() >= (none > 0).sum()
    assert not ((none > 0) & (cl == 0)).any() and not ((cl > 0) & (mp == 0)).any()
    cor = default_schema().id("coronary_arteries")
    assert (mp == cor).sum() > 1.5 * (none == cor).sum()
    assert (cl == cor).sum() < 1.3 * (none == cor).sum()


# ---- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, match",
    [
        (np.ones((8, 8, 8), np.float32), "integer"),
        (np.ones((8, 8, 8), bool), "integer"),
        (np.ones((8, 8), np.uint8), "3D"),
        (np.ones((2, 8, 8, 8), np.uint8), "3D"),
        (np.full((8, 8, 8), 200, np.uint8), "not in schema"),
        (np.full((8, 8, 8), -1, np.int16), "0..255"),
        (np.zeros((8, 8, 8), np.uint8), "empty"),
        (np.zeros((0, 8, 8), np.uint8), "empty"),
    ],
)
def test_bad_masks_raise_value_error(mask, match):
    with pytest.raises(ValueError, match=match):
        mgm_deform(mask, 1.0, MGMParams(rotation_deg_0=5.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"spacing": (1.0, -1.0, 1.0)}, "spacing"), ({"spacing": (1.0, 1.0)}, "spacing"),
     ({"closing": "dilate"}, "closing"), ({"closed_classes": "lungs"}, "closed_classes"),
     ({"overlap": "max"}, "overlap"),
     ({"params": {"alpha_mm": 1.0}}, "MGMParams")],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(mask=_blobs(), spacing=1.0, params=MGMParams(rotation_deg_0=5.0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mgm_deform(**args)


def test_integer_masks_of_other_dtypes_are_accepted():
    mask = _blobs()
    p = _random_params(8)
    assert np.array_equal(mgm_deform(mask.astype(np.int64), 1.0, p), mgm_deform(mask, 1.0, p))
