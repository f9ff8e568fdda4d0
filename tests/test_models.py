"""TCDM networks, VAE helpers, MAISI loader and checkpoint folders (tiny sizes, CPU)."""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from fcas.labels import CONFIG_DIR
from fcas.models.checkpoint import (
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    load_into,
    load_state_file,
    save_checkpoint,
)
from fcas.models.networks import (
    ModelConfig,
    UNetConfig,
    VAEConfig,
    build_tcdm,
    build_vae,
    count_parameters,
    set_activation_checkpointing,
    set_flash_attention,
)
from fcas.models.vae import MAISI_VAE, load_maisi_autoencoder, sliding_window_decode, vae_decode, vae_encode

torch.set_num_threads(1)


def model_cfg(name: str) -> ModelConfig:
    with open(CONFIG_DIR / "model" / f"{name}.yaml") as fh:
        return ModelConfig.from_dict(yaml.safe_load(fh))


@pytest.mark.parametrize("name,size", [("tiny", 32), ("demo", 32)])
def test_vae_maps_image_to_quarter_resolution_latent_and_back(name, size):
    torch.manual_seed(0)
    vae = build_vae(model_cfg(name).vae).eval()
    x = torch.rand(2, 1, size, size, size)
    with torch.no_grad():
        z = vae_encode(vae, x, scale_factor=2.0)
        y = vae_decode(vae, z, scale_factor=2.0)
    assert z.shape == (2, 4, size // 4, size // 4, size // 4)
    assert y.shape == x.shape
    # scale_factor only rescales: decode(encode) with factor 2 equals the unscaled path
    with torch.no_grad():
        assert torch.allclose(vae_decode(vae, vae_encode(vae, x)), y, atol=1e-5)


@pytest.mark.parametrize("mask_only,c_in", [(False, 9), (True, 4)])
def test_controlnet_embeds_full_resolution_condition_to_latent_grid(mask_only, c_in):
    cfg = model_cfg("tiny")
    torch.manual_seed(0)
    model = build_tcdm(cfg, c_in).eval()
    c_raw = torch.rand(2, c_in, 32, 32, 32)
    emb = model.embed_condition(c_raw)
    assert emb.shape == (2, cfg.unet.channels[0], 8, 8, 8)
    z_t, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        out = model(z_t, t, c_raw)
        cached = model(z_t, t, cond_embedding=emb)
    assert out.shape == z_t.shape
    assert torch.equal(out, cached)  # embedding once and reusing it is the same computation


def test_controlnet_starts_as_copy_of_unet_and_with_zero_residuals():
    torch.manual_seed(0)
    model = build_tcdm(model_cfg("tiny"), 9).eval()
    u, c = model.unet.state_dict(), model.controlnet.state_dict()
    shared = [k for k in c if k in u]
    assert len(shared) > 10 and all(torch.equal(u[k], c[k]) for k in shared)
    z_t, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    with torch.no_grad():
        for p in model.unet.out.parameters():  # MONAI zero-initialises the UNet output conv too
            p.normal_(0, 0.1)
        plain = model.unet(z_t, t)
        assert plain.abs().max() > 0
        # zero-initialised ControlNet outputs: the condition has no effect yet
        assert torch.equal(model(z_t, t, torch.rand(1, 9, 32, 32, 32)), plain)


def test_condition_at_wrong_resolution_is_refused():
    model = build_tcdm(model_cfg("tiny"), 9)
    with pytest.raises(ValueError, match="4x the latent"):
        model(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]), torch.rand(1, 9, 16, 16, 16))
    with pytest.raises(ValueError, match="controlnet_cond"):
        model.controlnet(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(channels=(8, 16, 16, 16)), "downsampling of 8"),
        (dict(channels=(8, 12, 16)), "multiples of norm_num_groups"),
        (dict(kind="vqgan"), "unknown VAE kind"),
    ],
)
def test_vae_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_unet_config_needs_two_stride2_condition_stages():
    with pytest.raises(ValueError, match="3 entries"):
        UNetConfig(cond_embedding_channels=(8, 16, 32, 64))


def test_paper_preset_builds_and_counts_parameters(capsys):
    cfg = model_cfg("paper")
    assert cfg.vae == MAISI_VAE
    model = build_tcdm(cfg, 9)
    vae = build_vae(cfg.vae)
    counts = {"vae": count_parameters(vae), "unet": count_parameters(model.unet),
              "controlnet": count_parameters(model.controlnet)}
    print("paper preset parameter counts:", counts)
    assert counts["unet"] > 50e6 and counts["controlnet"] > 10e6 and counts["vae"] > 10e6


# ---- sliding-window decode -----------------------------------------------------------------------
def test_sliding_window_decode_single_window_is_exact_and_two_windows_blend():
    torch.manual_seed(0)
    vae = build_vae(model_cfg("tiny").vae).eval()
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        whole = vae_decode(vae, z)
        one = sliding_window_decode(vae, z, (8, 8, 8), overlap=0.5)
        assert one.shape == whole.shape == (1, 1, 32, 32, 32)
        assert torch.allclose(one, whole, atol=1e-5)
        # latent 2x the window along one axis: seams blended; the error is that of GroupNorm seeing
        # window statistics and of zero padding at window borders. Measured on an untrained tiny VAE:
        # mean |diff| ~0.3 of the output std.
        z2 = torch.randn(1, 4, 16, 8, 8)
        whole2 = vae_decode(vae, z2)
        sw = sliding_window_decode(vae, z2, (8, 8, 8), overlap=0.5)
    assert sw.shape == whole2.shape == (1, 1, 64, 32, 32)
    assert float((sw - whole2).abs().mean()) < 0.5 * float(whole2.std())


# ---- MAISI loader --------------------------------------------------------------------------------
SMALL_MAISI = VAEConfig(channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=8, kind="maisi")


def test_maisi_autoencoder_loads_a_state_dict_of_its_architecture(tmp_path):
    torch.manual_seed(1)
    src = build_vae(SMALL_MAISI).eval()
    path = tmp_path / "autoencoder_epoch273.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    vae = load_maisi_autoencoder(str(path), SMALL_MAISI)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(vae_encode(vae, x), vae_encode(src, x))
        assert torch.equal(vae_decode(vae, vae_encode(vae, x)), src.decode(src.encode(x)[0]))


def test_maisi_autoencoder_of_other_width_names_the_file(tmp_path):
    src = build_vae(SMALL_MAISI)
    path = tmp_path / "wrong.pt"
    torch.save(src.state_dict(), path)
    other = VAEConfig(channels=(16, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=8, kind="maisi")
    with pytest.raises(ValueError, match="wrong.pt.*shape mismatches"):
        load_maisi_autoencoder(str(path), other)
    with pytest.raises(ValueError, match="not found"):
        load_maisi_autoencoder(str(tmp_path / "absent.pt"), SMALL_MAISI)


# ---- checkpoints ---------------------------------------------------------------------------------
def _ckpt(tmp_path, step=3):
    torch.manual_seed(0)
    net = build_vae(VAEConfig())
    opt = torch.optim.AdamW(net.parameters())
    net(torch.rand(1, 1, 16, 16, 16))[0].mean().backward()
    opt.step()
    uri = str(tmp_path / f"step_{step:09d}")
    digest = save_checkpoint(uri, config={"model": {"a": 1}}, step=step,
                             state_dicts={"vae": net.state_dict(), "optimizer": opt.state_dict()})
    return uri, net, opt, digest


def test_checkpoint_round_trip_weights_only(tmp_path):
    uri, net, opt, digest = _ckpt(tmp_path)
    ck = load_checkpoint(uri)
    assert ck.step == 3 and ck.digest == digest and ck.config == {"model": {"a": 1}}
    assert ck.config_hash == config_hash({"model": {"a": 1}})
    sd = ck.state_dict("vae")
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    # plain torch.load with weights_only=True reads every file
    for name in ("vae", "optimizer"):
        torch.load(os.path.join(uri, f"{name}.pt"), weights_only=True)
    osd = ck.state_dict("optimizer")
    opt2 = torch.optim.AdamW(build_vae(VAEConfig()).parameters())
    opt2.load_state_dict(osd)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_truncated_checkpoint_file_is_named(tmp_path):
    uri, *_ = _ckpt(tmp_path)
    f = os.path.join(uri, "vae.pt")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"vae\.pt.*truncated or replaced"):
        load_checkpoint(uri).state_dict("vae")
    # without a manifest (a bare .pt) the damage is still reported with the file name
    with pytest.raises(ValueError, match=r"vae\.pt cannot be loaded"):
        load_state_file(f)


def test_mismatched_checkpoint_is_named(tmp_path):
    uri, *_ = _ckpt(tmp_path)
    other = build_vae(VAEConfig(channels=(16, 16, 16), norm_num_groups=8))
    src = os.path.join(uri, "vae.pt")
    with pytest.raises(ValueError, match=r"vae\.pt does not fit AutoencoderKL.*shape mismatches"):
        load_into(other, load_checkpoint(uri).state_dict("vae"), src)
    with pytest.raises(ValueError, match="has no 'unet'"):
        load_checkpoint(uri).state_dict("unet")


def test_latest_checkpoint_skips_unfinished_folders(tmp_path):
    _ckpt(tmp_path, step=2)
    uri5, *_ = _ckpt(tmp_path, step=5)
    assert latest_checkpoint(str(tmp_path)) == uri5
    os.remove(os.path.join(uri5, "checkpoint.json"))  # a write interrupted before its manifest
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000002")
    assert latest_checkpoint(str(tmp_path / "nothing")) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(uri5)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_fused_attention_switch_keeps_weights_and_outputs(name):
    cfg = model_cfg(name)
    torch.manual_seed(0)
    model = build_tcdm(cfg, 9).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output convs would hide any difference
            p.add_(0.02 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z_t, t, c_raw = torch.randn(1, 4, 8, 8, 8), torch.tensor([300]), torch.rand(1, 9, 32, 32, 32)
    with torch.no_grad():
        explicit = model(z_t, t, c_raw)
        n = set_flash_attention(model, True)
        fused = model(z_t, t, c_raw)
    # the UNet's and the ControlNet's middle blocks always attend, plus two blocks per attention level each
    assert n >= 2 + 2 * sum(cfg.unet.attention_levels)
    assert explicit.abs().max() > 0
    assert torch.allclose(fused, explicit, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set_flash_attention(model, False) == n


def test_activation_checkpointing_keeps_the_loss_the_gradients_and_the_weights():
    cfg = model_cfg("tiny")
    torch.manual_seed(0)
    model, vae = build_tcdm(cfg, 9), build_vae(cfg.vae)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output convs would hide any difference
            p.add_(0.02 * torch.randn_like(p))
    z_t, t, c_raw, x = torch.randn(1, 4, 8, 8, 8), torch.tensor([300]), torch.rand(1, 9, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)

    def loss_and_grads():
        torch.manual_seed(1)   # the VAE's posterior sample
        model.zero_grad(set_to_none=True)
        vae.zero_grad(set_to_none=True)
        loss = model(z_t, t, c_raw).square().mean() + (vae(x)[0] - x).abs().mean()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *vae.named_parameters()] if p.grad is not None}
        return float(loss), grads

    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(z_t, t, c_raw)
    plain_loss, plain = loss_and_grads()
    n = set_activation_checkpointing(model, True) + set_activation_checkpointing(vae, True)
    # UNet and ControlNet: every down block and the middle block, the UNet's up blocks; the VAE itself
    assert n == 2 * (len(cfg.unet.channels) + 1) + len(cfg.unet.channels) + 1 and vae.use_checkpoint
    ck_loss, ck = loss_and_grads()
    assert ck_loss == pytest.approx(plain_loss, rel=1e-6) and ck.keys() == plain.keys()
    assert all(torch.allclose(ck[k], plain[k], atol=1e-6, rtol=1e-5) for k in plain)
    assert set(model.state_dict()) == keys
    with torch.no_grad():   # no gradients: the plain forward, same output
        assert torch.allclose(model(z_t, t, c_raw), ref, atol=1e-6)
    set_activation_checkpointing(model, False)
    assert all("forward" not in b.__dict__ for b in model.unet.down_blocks)
