"""fcas.metrics: Dice / RDice / SSIM / RMSE / FID on cases with known answers."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from fcas.metrics import (VAEEncoderFeatures, ball, dice_per_class, dilate_ball, fid, frechet_distance,
                          make_lpips, mean_score, rdice_per_class, rmse, ssim)

ROOT = Path(__file__).resolve().parent.parent


def _cube(shape=(16, 16, 16), lo=4, hi=10, value=1, dtype=np.uint8):
    a = np.zeros(shape, dtype)
    a[lo:hi, lo:hi, lo:hi] = value
    return a


def _line(n, idx, value=1):
    a = np.zeros((1, 1, n), np.uint8)
    a[0, 0, list(idx)] = value
    return a


# ---- Dice -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, label, expected",
    [
        (_cube(), _cube(), 1.0),                                    # identical
        (_cube(lo=0, hi=4), _cube(lo=8, hi=12), 0.0),               # disjoint
        (_line(10, [0, 1, 2, 3]), _line(10, [1, 2, 3, 4, 5, 6]), 2 * 3 / (4 + 6)),   # |A|=4, |B|=6, overlap 3
        (_line(10, [0]), _line(10, [0, 1, 2]), 2 * 1 / (1 + 3)),
        (_line(10, [5]), _line(10, []), 0.0),                       # predicted, absent from the ground truth
        (_line(10, []), _line(10, [5]), 0.0),                       # missed
    ],
)
def test_dice_known_answers(pred, label, expected):
    assert dice_per_class(pred, label, [1])[1] == pytest.approx(expected)


def test_dice_both_empty_is_nan_and_skipped_by_the_mean():
    pred = _line(10, [0, 1])
    label = _line(10, [0, 1, 2, 3])
    d = dice_per_class(pred, label, [1, 2])
    assert d[1] == pytest.approx(2 * 2 / 6) and math.isnan(d[2])
    assert mean_score(d) == pytest.approx(d[1])
    assert dice_per_class(pred, label, [2], both_empty=1.0)[2] == 1.0
    assert math.isnan(mean_score({1: math.nan}))


def test_dice_multiclass_default_classes_and_torch_input():
    label = np.array([[[0, 1, 1, 2, 2, 3]]])
    pred = np.array([[[1, 1, 1, 2, 0, 0]]])
    d = dice_per_class(torch.from_numpy(pred), torch.from_numpy(label))
    assert d == pytest.approx({1: 2 * 2 / 5, 2: 2 * 1 / 3, 3: 0.0})


@pytest.mark.parametrize("pred, label, match", [
    (np.zeros((2, 2)), np.zeros((2, 3)), "same shape"),
    (np.full((2, 2), 0.5), np.zeros((2, 2)), "integer class ids"),
])
def test_dice_refuses_bad_input(pred, label, match):
    with pytest.raises(ValueError, match=match):
        dice_per_class(pred, label, [1])


# ---- RDice ----------------------------------------------------------------------------------
def _gt():
    return _cube((24, 24, 24), 8, 14)       # 6^3 = 216 voxels


@pytest.mark.parametrize(
    "fp_offset, radius, inside_band",
    [
        (10, 3, False),   # FP 10 voxels past the cube's face: outside the dilated ground truth
        (4, 3, False),    # 4 > radius
        (3, 3, True),     # |d| == radius: inside the ball
        (1, 3, True),
        (2, 1, False),
        (1, 0, False),    # radius 0: P' = P ∩ Q
    ],
)
def test_rdice_ignores_fps_outside_the_band_and_counts_those_inside(fp_offset, radius, inside_band):
    gt = _gt()
    pred = gt.copy()
    pred[13 + fp_offset, 10, 10] = 1        # one false positive on the +x side (the face is at x = 13)
    q = int(gt.sum())
    dice = dice_per_class(pred, gt, [1])[1]
    rdice = rdice_per_class(pred, gt, [1], radius=radius)[1]
    assert dice == pytest.approx(2 * q / (2 * q + 1)) and dice < 1
    assert rdice == pytest.approx(2 * q / (2 * q + 1) if inside_band else 1.0)


def test_rdice_blob_far_away_dice_below_one_rdice_one():
    gt = _gt()
    pred = gt.copy()
    pred[0:4, 0:4, 0:4] = 1                  # a 64-voxel false blob in a corner
    assert dice_per_class(pred, gt, [1])[1] == pytest.approx(2 * 216 / (216 + 280))
    assert rdice_per_class(pred, gt, [1])[1] == 1.0


def test_rdice_still_penalises_misses_and_empty_ground_truth_is_nan():
    gt = _gt()
    pred = gt.copy()
    pred[8:14, 8:14, 8] = 0                  # miss one 36-voxel slab
    assert rdice_per_class(pred, gt, [1])[1] == pytest.approx(2 * 180 / (180 + 216))
    assert math.isnan(rdice_per_class(pred, np.zeros_like(gt), [1])[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rdice_cropped_dilation_equals_full_volume_definition(seed):
    rng = np.random.default_rng(seed)
    gt = np.zeros((20, 22, 18), np.uint8)
    gt[3:9, 15:21, 0:5] = 1                 # touches borders
    gt[12:15, 2:6, 10:16] = 2
    pred = rng.integers(0, 3, gt.shape).astype(np.uint8)
    got = rdice_per_class(pred, gt, [1, 2], radius=2)
    for c in (1, 2):
        q = gt == c
        p_prime = (pred == c) & (ndimage.distance_transform_edt(~q) <= 2)   # P' = P ∩ dilate(Q)
        want = 2 * (p_prime & q).sum() / (p_prime.sum() + q.sum())
        assert got[c] == pytest.approx(want)


@pytest.mark.parametrize("radius, voxels", [(0, 1), (1, 7), (2, 33), (3, 123)])
def test_ball_sizes(radius, voxels):
    assert int(ball(radius).sum()) == voxels
    m = np.zeros((9, 9, 9), bool)
    m[4, 4, 4] = True
    assert int(dilate_ball(m, radius).sum()) == voxels


def test_rdice_refuses_bad_radius():
    with pytest.raises(ValueError, match="radius"):
        rdice_per_class(_gt(), _gt(), [1], radius=-1)


# ---- SSIM / RMSE ----------------------------------------------------------------------------
def _image(seed=0, shape=(20, 20, 20)):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)


@pytest.mark.parametrize("mask", [None, _cube((20, 20, 20), 5, 15).astype(bool)])
def test_identical_volumes_ssim_one_rmse_zero(mask):
    x = _image()
    assert ssim(x, x, mask) == pytest.approx(1.0, abs=1e-5)
    assert rmse(x, x, mask) == 0.0


@pytest.mark.parametrize("offset", [0.05, 0.1, 0.3])
def test_rmse_of_a_constant_offset(offset):
    x = _image() * 0.5
    assert rmse(x + offset, x) == pytest.approx(offset, rel=1e-5)


@pytest.mark.parametrize("offset", [0.01, 0.1])
def test_psnr_of_a_constant_offset_and_of_identical_images(offset):
    from fcas.metrics.image import psnr

    x = _image() * 0.5
    assert psnr(x + offset, x) == pytest.approx(-20 * np.log10(offset), rel=1e-4)
    assert psnr(x, x) == pytest.approx(120.0)
    m = np.zeros(x.shape, bool)
    m[:4] = True
    y = x.copy()
    y[~m] += 0.2                      # errors outside the mask do not count
    assert psnr(y, x, m) == pytest.approx(120.0)


def test_masked_metrics_see_only_the_mask():
    x = _image()
    y = x.copy()
    y[:, :, 14:] += 0.5                      # change outside the mask (and its SSIM windows)
    mask = np.zeros(x.shape, bool)
    mask[4:16, 4:16, 3:8] = True
    assert rmse(x, y, mask) == 0.0
    assert ssim(x, y, mask) == pytest.approx(1.0, abs=1e-5)
    assert rmse(x, y) == pytest.approx(0.5 * math.sqrt(6 / 20), rel=1e-5)
    assert ssim(x, y) < 0.9
    assert math.isnan(rmse(x, y, np.zeros(x.shape, bool)))


def test_ssim_without_mask_equals_monai_ssimmetric_and_drops_with_noise():
    from monai.metrics import SSIMMetric

    x = _image(1)
    y = np.clip(x + np.random.default_rng(2).normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    want = float(SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)(torch.from_numpy(y)[None, None],
                                                                         torch.from_numpy(x)[None, None]).mean())
    assert ssim(y, x) == pytest.approx(want, rel=1e-5)
    z = np.clip(x + np.random.default_rng(3).normal(0, 0.15, x.shape), 0, 1).astype(np.float32)
    assert ssim(z, x) < ssim(y, x) < 1


# ---- FID ------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_norm():
    f = np.random.default_rng(0).normal(size=(12, 40))     # fewer samples than features: singular covariance
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)
    prev = 0.0
    for s in (0.1, 0.5, 1.0, 2.0):
        got = fid(f + s, f)                                 # same covariance: FID = |shift|^2 = 40 s^2
        assert got == pytest.approx(40 * s * s, abs=1e-4)   # sqrt of round-off eigenvalues of the null space
        assert got > prev
        prev = got


def test_frechet_distance_closed_form_and_monai_sqrtm_reference():
    # diagonal Gaussians: sum (mu_a - mu_b)^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(want)
    from monai.metrics.fid import get_fid_score     # scipy.linalg.sqrtm of S_a S_b

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = float(get_fid_score(torch.from_numpy(x), torch.from_numpy(y)))
    assert fid(x, y) == pytest.approx(ref, rel=1e-6)


def test_fid_refuses_sets_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        fid(np.zeros((1, 4)), np.zeros((3, 4)))


@pytest.fixture(scope="module")
def demo_features():
    return VAEEncoderFeatures.from_checkpoint("checkpoints/demo")


def test_vae_encoder_features_name_the_network_and_fid_on_volumes(demo_features):
    assert "checkpoints/demo" in demo_features.description and "digest" in demo_features.description
    channels = json.loads((ROOT / "checkpoints" / "demo" / "config.json").read_text())["model"]["vae"]["channels"]
    assert demo_features.dim == sum(channels)   # one mean-pooled feature per channel of every encoder level
    imgs = torch.from_numpy(np.stack([_image(s, (16, 16, 16)) for s in range(4)]))[:, None]
    f = demo_features(imgs)
    assert f.shape == (4, sum(channels)) and f.dtype == torch.float64
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)
    shifted = [fid(demo_features((imgs * 0.5 + s).clamp(0, 1)), f) for s in (0.25, 0.35, 0.5)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_vae_encoder_features_refuse_untrained_and_bad_layers(demo_features):
    with pytest.raises(ValueError, match="trained VAE"):
        VAEEncoderFeatures.from_checkpoint("random")
    with pytest.raises(ValueError, match="feature layers"):
        VAEEncoderFeatures(demo_features.vae, layers=[99])


def test_lpips_is_skipped_without_weights_and_refuses_a_missing_file(tmp_path):
    assert make_lpips(None) is None
    with pytest.raises(ValueError, match="do not exist"):
        make_lpips(str(tmp_path / "nope.pt"))


def test_sub_volume_features_pool_the_same_blocks_over_a_grid():
    from monai.networks.nets import AutoencoderKL

    from fcas.metrics.fid import VAEEncoderFeatures

    torch.manual_seed(0)
    vae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=2,
                        num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=4)
    f = VAEEncoderFeatures(vae)
    x = torch.rand(2, 1, 16, 16, 16)
    whole, parts = f(x), f.patches(x, 2)
    assert parts.shape == (2 * 8, whole.shape[1])
    # equal sub-volumes: their mean is the global pool, per volume
    assert torch.allclose(parts.view(2, 8, -1).mean(1), whole, atol=1e-6)
    assert torch.allclose(f.patches(x, 1), whole, atol=1e-6)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        f.patches(x, 0)
