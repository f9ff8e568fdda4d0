"""MAISI's diffusion UNet + ControlNet as a starting point (model=maisi / maisi-rflow, init=maisi:...).

The released files are imitated at a reduced width: networks built with MONAI's MAISI classes and the
keyword arguments of MAISI's released configs (config_maisi3d-{ddpm,rflow}.json; only the channel
widths and group count smaller), saved in MAISI's layouts. Nothing is downloaded.
"""
from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from fcas.diffusion.conditioning import ConditionConfig
from fcas.diffusion.sampling import sample
from fcas.training.tcdm import TCDMSettings, train_tcdm_loop
from fcas.config_files import read_config
from fcas.diffusion.bundle import load_tcdm
from fcas.models.maisi import load_maisi_init, parse_init
from fcas.models.networks import ModelConfig, build_tcdm, maisi_inputs

torch.set_num_threads(1)

VERSIONS = ("maisi", "maisi-rflow")
SMALL = {"channels": [8, 16, 16, 32], "num_res_blocks": [2, 2, 2, 2], "attention_levels": [False, False, True, True],
         "num_head_channels": [0, 0, 8, 8], "norm_num_groups": 8, "cond_embedding_channels": [8, 16, 16]}
TINY_VAE = {"channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8}
REINIT = ("controlnet.controlnet_cond_embedding.conv_in.conv.weight",)
TINY = {"shape": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "preset": "tiny", "data": "phantom:3"}


def small_model(version: str) -> dict:
    """The released config of ``version`` (configs/model/<version>.yaml) at reduced widths, tiny VAE."""
    return {**read_config("model", version, "model config"), "unet": SMALL, "vae": TINY_VAE}


def released_files(tmp_path, version: str) -> tuple[str, str, dict, dict]:
    """MAISI-layout files of networks built as MAISI's config builds them (MAISI's 8 condition channels)."""
    rflow = version == "maisi-rflow"
    extra = dict(num_class_embeds=128, resblock_updown=True, include_fc=True) if rflow else {}
    common = dict(spatial_dims=3, in_channels=4, num_channels=SMALL["channels"], num_res_blocks=2,
                  attention_levels=SMALL["attention_levels"], num_head_channels=SMALL["num_head_channels"],
                  norm_num_groups=8, use_flash_attention=False, **extra)
    g = torch.Generator().manual_seed(7)
    unet = DiffusionModelUNetMaisi(out_channels=4, include_top_region_index_input=not rflow,
                                   include_bottom_region_index_input=not rflow, include_spacing_input=True, **common)
    control = ControlNetMaisi(conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 16, 16],
                              use_checkpointing=False, **common)
    sds = []
    for net in (unet, control):   # random everywhere: zero-initialised layers would match by chance
        sds.append({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()})
    paths = str(tmp_path / f"diff_unet_3d_{version}.pt"), str(tmp_path / f"controlnet_3d_{version}.pt")
    torch.save({"unet_state_dict": sds[0], "scale_factor": torch.tensor(0.8)}, paths[0])
    torch.save({"epoch": 1, "controlnet_state_dict": sds[1]}, paths[1])
    return *paths, *sds


@pytest.mark.parametrize("version", VERSIONS)
def test_init_loads_released_files_and_reinitialises_only_the_condition_conv(tmp_path, version):
    unet_pt, control_pt, unet_sd, control_sd = released_files(tmp_path, version)
    model = build_tcdm(ModelConfig.from_dict(small_model(version)), ConditionConfig().channels)   # 9 channels
    fresh = model.controlnet.state_dict()[REINIT[0].partition(".")[2]].clone()
    got = load_maisi_init(model, f"maisi:{unet_pt},{control_pt}")
    assert got.reinitialised == REINIT and got.scale_factor == pytest.approx(0.8)
    assert len(got.loaded) == len(unet_sd) + len(control_sd) - 1 and not set(got.loaded) & set(REINIT)
    for prefix, net, sd in (("unet", model.unet, unet_sd), ("controlnet", model.controlnet, control_sd)):
        for key, value in net.state_dict().items():
            if f"{prefix}.{key}" in REINIT:
                assert value.shape == (8, 9, 3, 3, 3) and torch.equal(value, fresh)
            else:
                assert torch.equal(value, sd[key]), f"{prefix}.{key} is not the file's"
    # MAISI's own 8 condition channels: nothing to re-initialise
    model8 = build_tcdm(ModelConfig.from_dict(small_model(version)), 8)
    assert load_maisi_init(model8, f"maisi:{unet_pt},{control_pt}").reinitialised == ()


def test_wrong_files_are_refused_in_one_line_naming_the_file(tmp_path):
    ddpm_unet, ddpm_control, _, _ = released_files(tmp_path, "maisi")
    rflow = build_tcdm(ModelConfig.from_dict(small_model("maisi-rflow")), 9)
    ddpm = build_tcdm(ModelConfig.from_dict(small_model("maisi")), 9)
    cases = [
        (ddpm, f"maisi:{ddpm_control},{ddpm_control}", ddpm_control, "no 'unet_state_dict'"),   # swapped files
        (rflow, f"maisi:{ddpm_unet},{ddpm_control}", ddpm_unet, "missing keys"),   # the other release
        (ddpm, f"maisi:{tmp_path / 'absent.pt'},{ddpm_control}", str(tmp_path / "absent.pt"), "not found"),
    ]
    for model, spec, named, why in cases:
        with pytest.raises(ValueError, match=why) as err:
            load_maisi_init(model, spec)
        assert named in str(err.value) and "\n" not in str(err.value)
    torch.save({"controlnet_state_dict": {"conv_in.conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt does not fit"):
        load_maisi_init(ddpm, f"maisi:{ddpm_unet},{tmp_path / 'other.pt'}")
    with pytest.raises(ValueError, match="model=maisi"):
        load_maisi_init(build_tcdm(ModelConfig.from_dict(read_config("model", "tiny", "m")), 9),
                        f"maisi:{ddpm_unet},{ddpm_control}")
    with pytest.raises(ValueError, match="expected maisi:<unet file>,<controlnet file>"):
        parse_init(f"maisi:{ddpm_unet}")


def test_maisi_networks_get_spacing_region_and_modality_as_maisi_feeds_them():
    z = torch.zeros(2, 4, 8, 8, 8)
    ddpm, rflow = (ModelConfig.from_dict(small_model(v)).maisi for v in VERSIONS)
    unet, control = maisi_inputs(ddpm, z, (0.8, 0.8, 2.5))
    assert torch.allclose(unet["spacing_tensor"], torch.tensor([[80.0, 80.0, 250.0]] * 2))
    assert torch.equal(unet["top_region_index_tensor"], torch.tensor([[0.0, 100.0, 0.0, 0.0]] * 2))   # thorax
    assert torch.equal(unet["bottom_region_index_tensor"], unet["top_region_index_tensor"]) and control == {}
    unet, control = maisi_inputs(rflow, z, (0.8, 0.8, 2.5))
    assert set(unet) == {"spacing_tensor", "class_labels"}
    assert torch.equal(control["class_labels"], torch.ones(2, dtype=torch.long))   # 1 = "ct"
    # MONAI configs serialise as before model.kind existed (old checkpoints keep their config hash)
    assert set(ModelConfig.from_dict(read_config("model", "tiny", "m")).to_dict()) == {"name", "vae", "unet"}


@pytest.mark.parametrize("version", VERSIONS)
def test_unet_computes_what_maisis_unet_computes(version):
    """Our out-of-place MaisiUNet gives MONAI's DiffusionModelUNetMaisi's exact output, and trains jointly."""
    torch.manual_seed(0)
    model = build_tcdm(ModelConfig.from_dict(small_model(version)), 9)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    z, t, c = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500]), torch.rand(2, 9, 32, 32, 32)
    reference = DiffusionModelUNetMaisi.__new__(DiffusionModelUNetMaisi)
    reference.__dict__ = model.unet.__dict__   # the same modules, MONAI's forward
    with torch.no_grad():
        unet_kw, control_kw = model.extra_inputs(z, (4.0, 4.0, 4.0))
        down, mid = model.controlnet(z, t, c, **control_kw)
        ours = model.unet(z, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **unet_kw)
        theirs = reference(z, t, down_block_additional_residuals=[d.clone() for d in down],
                           mid_block_additional_residual=mid.clone(), **unet_kw)   # MONAI's adds in place
    assert torch.equal(ours, theirs)
    model(z, t, c, spacing=(4.0, 4.0, 4.0)).square().mean().backward()   # MONAI's in-place adds refuse this
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
@pytest.mark.parametrize("version,scheduler", [("maisi", "ddim"), ("maisi-rflow", "rflow")])
def test_train_step_and_sample_from_maisi_init(tmp_path, version, scheduler):
    unet_pt, control_pt, _, _ = released_files(tmp_path, version)
    settings = TCDMSettings.from_dict({
        **TINY, "out": str(tmp_path / "run"), "model": small_model(version), "init": f"maisi:{unet_pt},{control_pt}",
        "scheduler": {"kind": "ddpm" if scheduler == "ddim" else "rflow"},
        "train": {"steps": 1, "checkpoint_every": 1, "scale_factor_cases": 2},
    })
    summary = train_tcdm_loop(settings, progress=False)
    assert summary["steps_run"] == 1 and torch.isfinite(torch.tensor(summary["last_loss"]))
    assert summary["init"]["reinitialised"] == REINIT and summary["scale_factor"] == pytest.approx(0.8)
    bundle = load_tcdm(summary["latest_checkpoint"])
    assert bundle.config["init"] == settings.init and bundle.config["model"]["kind"] == "maisi"
    c_raw = torch.rand(1, bundle.condition.channels, 32, 32, 32)
    res = sample(bundle, c_raw, torch.Generator().manual_seed(0), steps=3, scheduler=scheduler, collect_every=1)
    assert res.latent.shape == (1, 4, 8, 8, 8) and torch.isfinite(res.latent).all() and len(res.intermediates) == 3
    with pytest.raises(ValueError, match="spacing"):
        sample(bundle.model, c_raw, None, steps=1, scheduler=scheduler, scheduler_config=bundle.scheduler)
