"""SSV confidence maps (the paper's Eq. 7 as docs/method.md reads it): known variances, shapes, modes, errors."""
import pytest
import torch

from fcas.diffusion.ssv import normalize_variance, ssv_confidence, ssv_variance


def test_variance_matches_a_hand_computed_value():
    xs = [torch.full((1, 4, 2, 2, 2), v) for v in (1.0, 3.0)]
    assert torch.allclose(ssv_variance(xs), torch.ones(1, 4, 2, 2, 2))  # population variance of {1, 3}


def test_stable_voxels_get_high_confidence_and_unstable_ones_low():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 4, 4, 4, generator=g)
    xs = []
    for k in range(5):
        x = base.clone()
        x[..., :2] += 0.5 * k          # half the latent drifts across the steps
        xs.append(x)
    cm = ssv_confidence(xs, "latent", quantile=1.0)
    assert cm.shape == (1, 1, 16, 16, 16)
    assert 0.0 <= cm.min() and cm.max() <= 1.0
    assert cm[..., :4].mean() < 0.2 and cm[..., -4:].mean() > 0.99   # drifting half vs stable half


@pytest.mark.parametrize("out_shape", [(16, 16, 16), (12, 20, 16)])
def test_latent_mode_upsamples_to_the_image_grid(out_shape):
    xs = [torch.rand(2, 4, 4, 5, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    assert ssv_confidence(xs, "latent", out_shape=out_shape).shape == (2, 1, *out_shape)


def test_identical_intermediates_give_full_confidence():
    xs = [torch.ones(1, 4, 2, 2, 2)] * 3
    assert torch.equal(ssv_confidence(xs, "latent"), torch.ones(1, 1, 8, 8, 8))


class _Upsampling(torch.nn.Module):
    """A stand-in decoder (4x nearest upsampling of channel 0) to check image mode's plumbing."""

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=4, mode="nearest")


def test_image_mode_decodes_each_intermediate():
    xs = [torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2)]
    xs[1][:, 0, 0] = 0.5   # differs only in channel 0 of the first latent slab
    cm = ssv_confidence(xs, "image", vae=_Upsampling(), quantile=1.0)
    assert cm.shape == (1, 1, 8, 8, 8)
    assert torch.all(cm[0, 0, :4] == 0) and torch.all(cm[0, 0, 4:] == 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "pixels"}, "unknown SSV mode"),
    ({"mode": "image"}, "needs the VAE"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ssv_confidence([torch.zeros(1, 4, 2, 2, 2)] * 2, **kwargs)


def test_needs_two_intermediates_and_a_valid_quantile():
    with pytest.raises(ValueError, match="at least 2"):
        ssv_variance([torch.zeros(1)])
    with pytest.raises(ValueError, match="quantile"):
        normalize_variance(torch.zeros(1, 1, 2, 2, 2), quantile=0.0)


def test_sampler_settings_count_the_late_window():
    from fcas.synthesis.sampler import SamplerSettings

    assert SamplerSettings(steps=10, ssv_every=1, ssv_start=0.5).ssv_steps() == [5, 6, 7, 8, 9]
    assert SamplerSettings(steps=20, ssv_every=4).ssv_steps() == [0, 4, 8, 12, 16]
    with pytest.raises(ValueError, match="collects 1 intermediates"):
        SamplerSettings(steps=10, ssv_every=4, ssv_start=0.7)
    with pytest.raises(ValueError, match="ssv.start"):
        SamplerSettings(steps=10, ssv_start=1.0)
