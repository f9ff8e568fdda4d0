"""TCDM condition (Eq. 1), losses (Eq. 3-4), pair sampling and scheduler glue."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fcas.diffusion.conditioning import build_c_raw, condition_channels, hu_to_unit, unit_to_hu
from fcas.diffusion.losses import bidirectional_loss, min_snr_weight, p_losses, q_sample
from fcas.diffusion.pairs import sample_pairs, step_rng
from fcas.diffusion.schedulers import SchedulerConfig, build_sampling_scheduler, build_train_scheduler
from fcas.labels import default_schema, from_bits, from_onehot

torch.set_num_threads(1)
SCHEMA = default_schema()


def random_masks(b=2, shape=(8, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SCHEMA.max_id + 1, (b, *shape), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "encoding,mask_only,channels",
    [("bits", False, 2 * 4 + 1), ("bits", True, 4), ("onehot", False, 2 * 12 + 1), ("onehot", True, 12)],
)
def test_condition_channel_counts(encoding, mask_only, channels):
    m_a, m_b = random_masks(seed=1), random_masks(seed=2)
    img = torch.rand(2, 1, 8, 8, 8)
    c = build_c_raw(m_a, m_b, img, SCHEMA, encoding, mask_only)
    assert condition_channels(SCHEMA, encoding, mask_only) == channels
    assert c.shape == (2, channels, 8, 8, 8) and c.dtype == torch.float32


def test_c_raw_bits_round_trip_and_channel_order():
    m_a, m_b = random_masks(seed=3), random_masks(seed=4)
    img = torch.rand(2, 1, 8, 8, 8)
    c = build_c_raw(m_a, m_b, img, SCHEMA, "bits")
    n = SCHEMA.n_bits
    # M'_A: the reference mask with every non-cardiac class removed
    assert torch.equal(from_bits(c[:, :n], channel_dim=1), SCHEMA.cardiac_only(m_a).long())
    assert not torch.equal(from_bits(c[:, :n], channel_dim=1), m_a.long())  # lung/bone/soft tissue were there
    # M'_B: the whole template mask, surroundings included
    assert torch.equal(from_bits(c[:, n:2 * n], channel_dim=1), m_b.long())
    assert torch.equal(c[:, 2 * n:], img)  # I_B last


def test_c_raw_onehot_round_trip():
    m_a, m_b = random_masks(seed=5), random_masks(seed=6)
    c = build_c_raw(m_a, m_b, torch.rand(2, 1, 8, 8, 8), SCHEMA, "onehot")
    k = SCHEMA.max_id + 1
    assert torch.equal(from_onehot(c[:, :k], channel_dim=1), SCHEMA.cardiac_only(m_a).long())
    assert torch.equal(from_onehot(c[:, k:2 * k], channel_dim=1), m_b.long())


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(mask_ref=torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8)), r"mask_ref must be \(B, D, H, W\)"),
        (dict(mask_tmpl=None), "needs mask_tmpl and image_tmpl"),
        (dict(mask_tmpl=torch.zeros(2, 8, 8, 4, dtype=torch.uint8)), "mask_tmpl shape"),
        (dict(image_tmpl=torch.rand(2, 8, 8, 8)), r"image_tmpl must be \(B, 1, D, H, W\)"),
    ],
)
def test_c_raw_errors(args, match):
    kw = dict(mask_ref=random_masks(), mask_tmpl=random_masks(), image_tmpl=torch.rand(2, 1, 8, 8, 8))
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        build_c_raw(schema=SCHEMA, **kw)


def test_hu_scaling_round_trip_and_clipping():
    hu = torch.tensor([-3000.0, -1000.0, 0.0, 400.0, 1000.0, 2500.0])
    unit = hu_to_unit(hu)
    assert torch.allclose(unit, torch.tensor([0.0, 0.0, 0.5, 0.7, 1.0, 1.0]))
    assert torch.allclose(unit_to_hu(unit), hu.clamp(-1000, 1000))
    assert hu_to_unit(np.array([0], dtype=np.int16)).dtype == torch.float32


# ---- pairs ----------------------------------------------------------------------------------------
def test_pairs_are_distinct_deterministic_and_cover_all_ordered_pairs():
    p = sample_pairs(5, 4000, step_rng(0, 1))
    assert p.shape == (4000, 2) and (p[:, 0] != p[:, 1]).all()
    assert len({tuple(r) for r in p}) == 5 * 4  # N(N-1) ordered pairs (x2 directions each)
    assert np.array_equal(p, sample_pairs(5, 4000, step_rng(0, 1)))
    assert not np.array_equal(p, sample_pairs(5, 4000, step_rng(0, 2)))
    with pytest.raises(ValueError, match="at least 2 cases"):
        sample_pairs(1, 3, step_rng(0, 0))


# ---- schedulers and losses --------------------------------------------------------------------------
def test_q_sample_is_the_ddpm_forward_process():
    s = build_train_scheduler(SchedulerConfig())
    z0, noise, t = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2), torch.tensor([0, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    assert torch.allclose(q_sample(s, z0, t, noise), ab.sqrt() * z0 + (1 - ab).sqrt() * noise, atol=1e-6)


class ZeroModel(torch.nn.Module):
    def forward(self, z_t, t, c_raw=None):
        return torch.zeros_like(z_t)


def test_p_losses_of_zero_predictor_is_noise_power_and_deterministic():
    s = build_train_scheduler(SchedulerConfig())
    z0, c = torch.randn(2, 4, 4, 4, 4), torch.rand(2, 9, 16, 16, 16)
    l1 = p_losses(ZeroModel(), s, z0, c, torch.Generator().manual_seed(7))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(l1, noise.pow(2).mean())
    assert torch.equal(l1, p_losses(ZeroModel(), s, z0, c, torch.Generator().manual_seed(7)))


def test_rflow_target_is_clean_minus_noise():
    s = build_train_scheduler(SchedulerConfig(kind="rflow"))
    z0 = torch.randn(2, 4, 4, 4, 4)
    loss = p_losses(ZeroModel(), s, z0, torch.rand(2, 9, 16, 16, 16), torch.Generator().manual_seed(3))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loss, (z0 - noise).pow(2).mean())


def test_bidirectional_loss_is_sum_of_both_directions():
    s = build_train_scheduler(SchedulerConfig())
    z_a, z_b = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4) * 3
    c_ba, c_ab = torch.rand(2, 9, 16, 16, 16), torch.rand(2, 9, 16, 16, 16)
    loss, parts = bidirectional_loss(ZeroModel(), s, z_a, z_b, c_ba, c_ab, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(parts["loss_a_at_b"] + parts["loss_b_at_a"], rel=1e-6)
    one, p1 = bidirectional_loss(ZeroModel(), s, z_a, z_b, c_ba, None, torch.Generator().manual_seed(0))
    assert set(p1) == {"loss_b_at_a"}


def test_min_snr_weight_clamps_the_low_noise_steps():
    s = build_train_scheduler(SchedulerConfig())
    t = torch.tensor([0, 10, 100, 500, 999])
    ac = s.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = min_snr_weight(s, t, 5.0)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.05 and w[-1] == 1.0          # t = 0: SNR ~ 650, damped; t = 999: SNR < 5, untouched
    assert torch.all(w[1:] >= w[:-1])           # monotone in t
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(s, t, 0.0)
    with pytest.raises(ValueError, match="RFlow"):
        min_snr_weight(build_train_scheduler(SchedulerConfig(kind="rflow")), t, 5.0)


def test_p_losses_with_min_snr_is_the_weighted_per_sample_loss():
    s = build_train_scheduler(SchedulerConfig())
    z0, c = torch.randn(4, 4, 4, 4, 4), torch.rand(4, 9, 16, 16, 16)
    plain = p_losses(ZeroModel(), s, z0, c, torch.Generator().manual_seed(5), "none")
    weighted = p_losses(ZeroModel(), s, z0, c, torch.Generator().manual_seed(5), "none", snr_gamma=5.0)
    g = torch.Generator().manual_seed(5)
    torch.randn(z0.shape, generator=g)                     # p_losses draws the noise first, then t
    t = torch.randint(0, s.num_train_timesteps, (4,), generator=g)
    assert torch.allclose(weighted, plain * min_snr_weight(s, t, 5.0))
    loss, parts = bidirectional_loss(ZeroModel(), s, z0[:2], z0[2:], c[:2], c[2:], torch.Generator().manual_seed(5),
                                     snr_gamma=5.0)
    assert loss.item() == pytest.approx(weighted.mean().item() * 2, rel=1e-5)


@pytest.mark.parametrize("kind,sampler", [("ddpm", "rflow"), ("rflow", "ddim")])
def test_sampler_must_fit_training_scheduler(kind, sampler):
    with pytest.raises(ValueError, match="does not fit"):
        build_sampling_scheduler(SchedulerConfig(kind=kind), sampler, 10)


def test_loss_decreases_on_one_fixed_batch_at_tiny():
    import yaml

    from fcas.labels import CONFIG_DIR
    from fcas.models.networks import ModelConfig, build_tcdm

    with open(CONFIG_DIR / "model" / "tiny.yaml") as fh:
        cfg = ModelConfig.from_dict(yaml.safe_load(fh))
    torch.manual_seed(0)
    model = build_tcdm(cfg, 9)
    s = build_train_scheduler(SchedulerConfig())
    z_a, z_b = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    m_a, m_b = random_masks(1, (32, 32, 32), 1), random_masks(1, (32, 32, 32), 2)
    i_a, i_b = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    c_ba, c_ab = build_c_raw(m_a, m_b, i_b, SCHEMA), build_c_raw(m_b, m_a, i_a, SCHEMA)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = bidirectional_loss(model, s, z_a, z_b, c_ba, c_ab, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


# ---- sampling ---------------------------------------------------------------------------------------
def _tiny_model(seed=0, perturb=True):
    import yaml

    from fcas.labels import CONFIG_DIR
    from fcas.models.networks import ModelConfig, build_tcdm

    with open(CONFIG_DIR / "model" / "tiny.yaml") as fh:
        cfg = ModelConfig.from_dict(yaml.safe_load(fh))
    torch.manual_seed(seed)
    model = build_tcdm(cfg, 9).eval()
    if perturb:  # MONAI zero-initialises the UNet's output conv and the ControlNet's outputs
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return model


def _cond(seed=0):
    return build_c_raw(random_masks(1, (32, 32, 32), seed), random_masks(1, (32, 32, 32), seed + 1),
                       torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed)), SCHEMA)


def test_ddim_sampling_is_deterministic_collects_every_kth_x0_and_caching_is_exact():
    from fcas.diffusion.sampling import sample

    model, c = _tiny_model(), _cond()
    r1 = sample(model, c, torch.Generator().manual_seed(5), steps=6, scheduler="ddim", collect_every=2)
    latent, x0s = r1
    assert latent.shape == (1, 4, 8, 8, 8) and len(x0s) == 3 and r1.step_indices == [0, 2, 4]
    assert r1.timesteps == sorted(r1.timesteps, reverse=True)
    r2 = sample(model, c, torch.Generator().manual_seed(5), steps=6, collect_every=2, cache_condition=False)
    assert torch.equal(r1.latent, r2.latent) and all(torch.equal(a, b) for a, b in zip(x0s, r2.intermediates))
    r3 = sample(model, c, torch.Generator().manual_seed(6), steps=6)
    assert not torch.equal(r1.latent, r3.latent) and r3.intermediates == []
    r4 = sample(model, _cond(7), torch.Generator().manual_seed(5), steps=6)
    assert not torch.equal(r1.latent, r4.latent)  # the condition steers the sample
    # the last DDIM step lands on its own x0 prediction (alpha_prev = 1)
    r5 = sample(model, c, torch.Generator().manual_seed(5), steps=5, collect_every=1)
    assert torch.allclose(r5.intermediates[-1], r5.latent, atol=1e-5)
    # SSV late window: the same trajectory, collected from step floor(0.5 * 6) = 3 on
    late = sample(model, c, torch.Generator().manual_seed(5), steps=6, collect_every=1, collect_from=0.5)
    assert late.step_indices == [3, 4, 5] and torch.equal(late.latent, r1.latent)
    assert torch.equal(late.intermediates[1], x0s[2])   # step 4 in both collections
    with pytest.raises(ValueError, match="collect_from"):
        sample(model, c, None, steps=6, collect_every=1, collect_from=1.0)


def test_rflow_and_ddpm_samplers_and_windowed_denoising():
    from fcas.diffusion.sampling import sample

    model, c = _tiny_model(), _cond()
    rf = sample(model, c, torch.Generator().manual_seed(0), steps=4, scheduler="rflow", collect_every=2,
                scheduler_config=SchedulerConfig(kind="rflow"), collect="latent")
    assert rf.latent.shape == (1, 4, 8, 8, 8) and len(rf.intermediates) == 2 and torch.isfinite(rf.latent).all()
    dd = sample(model, c, torch.Generator().manual_seed(0), steps=3, scheduler="ddpm")
    assert torch.isfinite(dd.latent).all()
    whole = sample(model, c, torch.Generator().manual_seed(0), steps=3)
    win = sample(model, c, torch.Generator().manual_seed(0), steps=3, window=(8, 8, 8))  # one window = whole
    assert torch.allclose(whole.latent, win.latent, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        sample(model, c, None, steps=3, scheduler="rflow", scheduler_config=SchedulerConfig(kind="ddpm"))


def test_sliding_window_denoising_runs_window_by_window_on_a_latent_larger_than_the_window():
    """A 64^3 condition (16^3 latent) denoised in 8^3 windows: the windowed path really runs (27
    windows a step with MONAI's SlidingWindowInferer), agrees with the whole-latent denoiser away from
    the seams, is deterministic, and a window as large as the latent is the whole-latent path exactly."""
    from unittest import mock

    from monai.inferers import SlidingWindowInferer

    from fcas.diffusion.sampling import sample

    model = _tiny_model()
    c = build_c_raw(random_masks(1, (64, 64, 64), 3), random_masks(1, (64, 64, 64), 4),
                    torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3)), SCHEMA)
    whole = sample(model, c, torch.Generator().manual_seed(0), steps=2)
    calls = []
    real_call = SlidingWindowInferer.__call__

    def counting(self, inputs, network, *a, **k):
        calls.append(tuple(inputs.shape[2:]))
        return real_call(self, inputs, network, *a, **k)

    with mock.patch.object(SlidingWindowInferer, "__call__", counting):
        win = sample(model, c, torch.Generator().manual_seed(0), steps=2, window=(8, 8, 8))
    assert win.latent.shape == whole.latent.shape == (1, 4, 16, 16, 16)
    assert calls == [(16, 16, 16)] * 2                       # one windowed pass over the latent per step
    assert torch.isfinite(win.latent).all() and not torch.allclose(win.latent, whole.latent, atol=1e-4)
    r = torch.corrcoef(torch.stack([win.latent.flatten(), whole.latent.flatten()]))[0, 1]
    assert r > 0.9, r                                         # the same denoiser, seams blended
    again = sample(model, c, torch.Generator().manual_seed(0), steps=2, window=(8, 8, 8))
    assert torch.equal(again.latent, win.latent)
    full = sample(model, c, torch.Generator().manual_seed(0), steps=2, window=(16, 16, 16))
    assert torch.equal(full.latent, whole.latent)


def test_clip_x0_bounds_the_predictions_and_auto_reads_the_bundle():
    from types import SimpleNamespace

    from fcas.diffusion.sampling import sample

    model, c = _tiny_model(), _cond()
    free = sample(model, c, torch.Generator().manual_seed(0), steps=4, collect_every=1)
    clipped = sample(model, c, torch.Generator().manual_seed(0), steps=4, collect_every=1, clip_x0=0.5)
    assert max(float(x.abs().max()) for x in free.intermediates) > 0.5
    assert max(float(x.abs().max()) for x in clipped.intermediates) <= 0.5 + 1e-6
    bundle = SimpleNamespace(model=model, scheduler=SchedulerConfig(), config={"sampling": {"clip_x0": 0.5}})
    auto = sample(bundle, c, torch.Generator().manual_seed(0), steps=4)
    assert torch.equal(auto.latent, clipped.latent)
    with pytest.raises(ValueError, match="clip_x0"):
        sample(model, c, None, steps=2, clip_x0=-1.0)


def test_pairs_within_sites_stay_in_the_site_and_cover_its_ordered_pairs():
    sites = ["s0", "s0", "s0", "s1", "s1", ""]
    p = sample_pairs(6, 3000, step_rng(0, 1), sites)
    assert (p[:, 0] != p[:, 1]).all()
    assert np.array_equal(p[:, 0], sample_pairs(6, 3000, step_rng(0, 1))[:, 0])   # a is drawn as without sites
    for a, b in p:
        if a < 5:
            assert sites[a] == sites[b]
    seen = {tuple(r) for r in p}
    assert {(a, b) for a in range(3) for b in range(3) if a != b} <= seen and {(3, 4), (4, 3)} <= seen
    assert {b for a, b in p if a == 5} == {0, 1, 2, 3, 4}      # no site: any other case
    assert np.array_equal(p, sample_pairs(6, 3000, step_rng(0, 1), sites))
    with pytest.raises(ValueError, match="sites names 2 cases, expected 6"):
        sample_pairs(6, 3, step_rng(0, 0), ["a", "b"])


def test_held_out_partner_is_the_next_case_of_the_site():
    from fcas.diffusion.pairs import held_out_partner

    sites = ["x", "y", "x", "y", "z", "x"]
    assert [held_out_partner(i, 6, sites) for i in range(6)] == [2, 3, 5, 1, 5, 0]   # z alone: i + 1
    assert [held_out_partner(i, 3) for i in range(4)] == [1, 2, 0, 1]


def test_phantom_sources_name_sites_and_refuse_bad_ones():
    from fcas.diffusion.data import case_rows, load_cases, parse_phantom_source

    assert parse_phantom_source("phantom:12@5/4:lowdose") == (12, 5, 4, "lowdose")
    assert parse_phantom_source("phantom:3") == (3, 0, None, "standard")
    assert parse_phantom_source("outputs/cases") is None
    with pytest.raises(ValueError, match=r"'phantom:4/0'.*K >= 1"):
        parse_phantom_source("phantom:4/0")
    rows = case_rows("phantom:4@6/4")
    assert [(r["phantom_seed"], r["phantom_site"], r["site"]) for r in rows] == [
        (6, 1, "phantom_site_0001"), (7, 1, "phantom_site_0001"), (8, 2, "phantom_site_0002"), (9, 2, "phantom_site_0002")]
    cases = load_cases("phantom:2@7/4", (32, 32, 32), (4.0, 4.0, 4.0))
    assert cases.sites == ["phantom_site_0001", "phantom_site_0002"]
    assert load_cases("phantom:2@7", (32, 32, 32), (4.0, 4.0, 4.0)).sites is None
    from fcas.phantom import make_case
    assert np.array_equal(cases.labels[1].numpy(), make_case(8, (32, 32, 32), (4.0, 4.0, 4.0), site=2).label)
