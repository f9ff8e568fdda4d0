"""TCDM training: resume equals an uninterrupted run (in-process), a 2-worker Ray Train run that is
killed mid-way and restarted resumes from its checkpoint, Hydra config composition, VAE loop."""
from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
import torch

from fcas.diffusion.data import load_cases
from fcas.training.tcdm import TCDMSettings, train_tcdm_loop
from fcas.models.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fcas.training.vae import VAESettings, train_vae_loop

torch.set_num_threads(1)
TINY = {"shape": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "preset": "tiny"}


@pytest.fixture(scope="module")
def tiny_cases():
    return load_cases("phantom:3", TINY["shape"], TINY["spacing"])


def _settings(out, steps, **train):
    return TCDMSettings.from_dict({**TINY, "data": "phantom:3", "out": str(out), "model": {"name": "tiny"},
                                   "train": {"steps": steps, "checkpoint_every": 2, "keep_checkpoints": 0, **train}})


def _tensors(ck, name):
    sd = ck.state_dict(name)
    if name == "optimizer":
        return {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return sd


def test_phantom_cases_load_on_the_preset_grid(tiny_cases):
    assert tiny_cases.images.shape == (3, 1, 32, 32, 32) and tiny_cases.labels.shape == (3, 32, 32, 32)
    assert 0.0 <= float(tiny_cases.images.min()) and float(tiny_cases.images.max()) <= 1.0
    assert set(torch.unique(tiny_cases.labels).tolist()) <= set(range(12))


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny_cases):
    straight = train_tcdm_loop(_settings(tmp_path / "a", 4), cases=tiny_cases, progress=False)
    first = train_tcdm_loop(_settings(tmp_path / "b", 2), cases=tiny_cases, progress=False)
    resumed = train_tcdm_loop(_settings(tmp_path / "b", 4), cases=tiny_cases, progress=False)
    assert (straight["start_step"], first["final_step"], resumed["start_step"], resumed["steps_run"]) == (0, 2, 2, 2)
    a, b = load_checkpoint(latest_checkpoint(str(tmp_path / "a"))), load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    assert a.step == b.step == 4
    for name in ("unet", "controlnet", "optimizer"):
        ta, tb = _tensors(a, name), _tensors(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs after resume"
    assert torch.equal(a.state_dict("history")["loss"], b.state_dict("history")["loss"])
    # nothing left to do: a rerun trains no step
    assert train_tcdm_loop(_settings(tmp_path / "b", 4), cases=tiny_cases, progress=False)["steps_run"] == 0


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
def test_ema_and_cosine_schedule_resume_bit_exactly_and_ship_the_ema(tmp_path, tiny_cases):
    """train.ema_decay keeps an EMA of the weights (ema.pt), resumed bit-exactly with the cosine lr;
    load_tcdm and the export use the EMA weights, which differ from the raw ones."""
    from fcas.diffusion.bundle import load_tcdm
    from fcas.models.export import export_inference_checkpoint
    from fcas.models.optim import lr_at

    kw = {"ema_decay": 0.5, "schedule": "cosine", "warmup_steps": 1, "lr": 1e-3, "lr_min": 1e-5}
    train_tcdm_loop(_settings(tmp_path / "a", 4, **kw), cases=tiny_cases, progress=False)
    # the same run interrupted after its step-2 checkpoint (the lr schedule depends on train.steps)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(latest_checkpoint(str(tmp_path / "b")))
    assert train_tcdm_loop(_settings(tmp_path / "b", 4, **kw), cases=tiny_cases, progress=False)["start_step"] == 2
    a, b = load_checkpoint(latest_checkpoint(str(tmp_path / "a"))), load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    assert "ema" in a.files and a.state_dict("ema").keys() == b.state_dict("ema").keys()
    for k, v in a.state_dict("ema").items():
        assert torch.equal(v, b.state_dict("ema")[k]), f"ema {k} differs after resume"
    bundle = load_tcdm(str(tmp_path / "a"))
    ema_w = bundle.model.unet.state_dict()
    raw_w = a.state_dict("unet")
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in raw_w if raw_w[k].is_floating_point())
    assert all(torch.equal(ema_w[k], a.state_dict("ema")[f"module.unet.{k}"]) for k in raw_w)
    export_inference_checkpoint(str(tmp_path / "a"), str(tmp_path / "exp"), half=False)
    exp = load_tcdm(str(tmp_path / "exp"))
    assert exp.config["weights"] == "ema"
    assert all(torch.equal(exp.model.unet.state_dict()[k], ema_w[k]) for k in ema_w)
    tc = _settings(tmp_path / "c", 4, **kw).train
    assert lr_at(tc, 1) == tc.lr and abs(lr_at(tc, 4) - tc.lr_min) < 1e-12 and tc.lr_min < lr_at(tc, 3) < tc.lr
    with pytest.raises(ValueError, match="ema_decay"):
        _settings(tmp_path / "d", 4, ema_decay=1.5)


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
def test_resume_refuses_other_architecture(tmp_path, tiny_cases):
    train_tcdm_loop(_settings(tmp_path, 2), cases=tiny_cases, progress=False)
    other = TCDMSettings.from_dict({**_settings(tmp_path, 4).to_dict(), "condition": {"mask_only": True}})
    with pytest.raises(ValueError, match="different model/condition/scheduler"):
        train_tcdm_loop(other, cases=tiny_cases, progress=False)


def test_vae_loop_trains_checkpoints_and_resumes(tmp_path, tiny_cases):
    s = VAESettings.from_dict({**TINY, "data": "phantom:3", "out": str(tmp_path),
                               "train": {"steps": 3, "checkpoint_every": 2, "crop": [16, 16, 16]}})
    r1 = train_vae_loop(s, cases=tiny_cases, progress=False)
    ck = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert ck.step == 3 and ck.config["scale_factor"] > 0 and ck.config["model"]["vae"]["latent_channels"] == 4
    s2 = VAESettings.from_dict({**s.to_dict(), "train": {**s.to_dict()["train"], "steps": 4}})
    r2 = train_vae_loop(s2, cases=tiny_cases, progress=False)
    assert (r1["steps_run"], r2["start_step"], r2["steps_run"]) == (3, 3, 1)


def test_vae_recipe_terms_schedule_validation_and_discriminator(tmp_path, tiny_cases):
    """L1 + SSIM + KL with a patch adversarial term after a 1-step warm-up, cosine lr with warm-up,
    flips: the discriminator is checkpointed and resumed, the held-out curve lands in the history."""
    from fcas.training.vae import augment_crop, lr_at

    train = {"steps": 3, "checkpoint_every": 2, "ssim_weight": 0.2, "adv_weight": 0.1, "adv_start": 1,
             "schedule": "cosine", "warmup_steps": 1, "lr_min": 1e-5, "augment": True, "val_data": "phantom:1@900"}
    s = VAESettings.from_dict({**TINY, "data": "phantom:3", "out": str(tmp_path), "train": train})
    assert train_vae_loop(s, cases=tiny_cases, progress=False)["steps_run"] == 3
    ck = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert {"vae", "optimizer", "discriminator", "disc_optimizer", "history"} <= set(ck.files)
    h = ck.state_dict("history")
    assert h["val_step"].tolist() == [2.0, 3.0] and 0 < float(h["val_ssim"][-1]) < 1 and float(h["val_psnr"][-1]) > 0
    s4 = VAESettings.from_dict({**s.to_dict(), "train": {**s.to_dict()["train"], "steps": 4}})
    assert train_vae_loop(s4, cases=tiny_cases, progress=False)["start_step"] == 3
    tc = s.train
    assert lr_at(tc, 1) == tc.lr and abs(lr_at(tc, 3) - tc.lr_min) < 1e-12 and tc.lr_min < lr_at(tc, 2) < tc.lr
    x = torch.rand(1, 8, 8, 8)
    a, b = augment_crop(x, np.random.default_rng(4)), augment_crop(x, np.random.default_rng(4))
    assert torch.equal(a, b) and torch.allclose(a.sum(), x.sum())  # flips move voxels, keep values


def test_hydra_config_composes_per_preset():
    from hydra import compose, initialize_config_dir

    from fcas.labels import CONFIG_DIR
    from fcas.pipeline.train_tcdm import tcdm_settings_from_cfg
    from fcas.pipeline.train_vae import vae_settings_from_cfg

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train_tcdm", overrides=["preset=paper", "model=paper", "condition.mask_only=true"])
        vcfg = compose("train_vae", overrides=["preset=demo", "model=demo"])
    s = tcdm_settings_from_cfg(cfg)
    assert s.shape == (512, 512, 256) and s.train.crop == (512, 512, 128)  # the paper's training crop
    assert s.model.unet.channels == (64, 128, 256, 512) and s.condition.channels == 4
    assert s.out == "outputs/tcdm-paper"
    v = vae_settings_from_cfg(vcfg)
    assert v.shape == (64, 64, 64) and v.vae.channels == (16, 32, 64)


def _local_stream(rows, seed=0, **kw):
    """Ray-free stand-in for a worker's shard: ``rows`` loaded one case at a time, reshuffled every epoch."""
    from fcas.diffusion.data import load_case_batch

    epoch = 0
    while True:
        for i in np.random.default_rng([seed, epoch]).permutation(len(rows)):
            if not kw:   # rows are cases already
                yield rows[i]
                continue
            b = load_case_batch({k: [v] for k, v in rows[i].items()}, **kw)
            yield {"case_id": b["case_id"][0], "image": b["image"][0], "label": b["label"][0]}
        epoch += 1


def test_case_buffer_is_bounded_and_draws_every_ordered_pair():
    from fcas.diffusion.data import CaseBuffer
    from fcas.diffusion.pairs import refill_rng, sample_pairs, step_rng

    rows = [{"case_id": f"c{i}", "image": np.full((1, 4, 4, 4), i, np.float32), "label": np.zeros((4, 4, 4), np.uint8)}
            for i in range(6)]
    buf = CaseBuffer(_local_stream(rows), 3)
    assert len(buf.cases) == 3 and buf.cases.images.shape == (3, 1, 4, 4, 4)
    seen = set()
    for step in range(1, 400):
        slot = buf.refill(refill_rng(0, step))
        assert float(buf.cases.images[slot].mean()) == float(buf.cases.case_ids[slot][1:])  # slot holds its case
        for a, b in sample_pairs(len(buf.cases), 2, step_rng(0, step)):
            seen.add((buf.cases.case_ids[a], buf.cases.case_ids[b]))
    assert len(buf.cases) == 3
    assert {(a, b) for a, b in seen if a != b} == {(f"c{i}", f"c{j}") for i in range(6) for j in range(6) if i != j}


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
def test_streamed_cases_match_loaded_cases_and_the_streamed_loops_train(tmp_path, tiny_cases):
    from fcas.diffusion.data import case_rows, load_case_batch

    rows = case_rows("phantom:3")
    assert [r["case_id"] for r in rows] == tiny_cases.case_ids and "image" not in rows[0]
    b = load_case_batch({k: [r[k] for r in rows] for k in rows[0]}, TINY["shape"], TINY["spacing"])
    assert torch.equal(torch.from_numpy(b["image"]), tiny_cases.images)
    assert torch.equal(torch.from_numpy(b["label"]), tiny_cases.labels)
    kw = {"shape": TINY["shape"], "spacing": TINY["spacing"]}
    outs = []
    for name in ("a", "b"):   # the same stream gives the same run: the draws are keyed by (seed, step)
        s = _settings(tmp_path / name, 3, buffer_cases=2)
        r = train_tcdm_loop(s, case_stream=lambda: _local_stream(rows, **kw), progress=False)
        assert r["steps_run"] == 3
        outs.append(load_checkpoint(r["latest_checkpoint"]).state_dict("controlnet"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    # a buffer that holds every case, delivered in another order (as Ray Data's parallel tasks may): the same run
    orders = [[c["case_id"] for c in itertools.islice(_local_stream(rows, seed, **kw), 3)] for seed in (0, 3)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
    held = []
    for seed in (0, 3):
        s = _settings(tmp_path / f"all{seed}", 3, buffer_cases=3, refill_every=0)
        r = train_tcdm_loop(s, case_stream=lambda seed=seed: _local_stream(rows, seed, **kw), progress=False)
        held.append(load_checkpoint(r["latest_checkpoint"]).state_dict("controlnet"))
    assert all(torch.equal(held[0][k], held[1][k]) for k in held[0])
    v = VAESettings.from_dict({**TINY, "data": "phantom:3", "out": str(tmp_path / "vae"),
                               "train": {"steps": 2, "batch_size": 1, "checkpoint_every": 2, "buffer_cases": 2}})
    assert train_vae_loop(v, case_stream=lambda: _local_stream(rows, **kw), progress=False)["steps_run"] == 2
    with pytest.raises(ValueError, match="buffer_cases"):
        _settings(tmp_path / "c", 1, buffer_cases=1)


def test_refills_follow_refill_every_and_stop_when_one_worker_holds_every_case(tmp_path, tiny_cases):
    from fcas.diffusion.pairs import refill_due
    from fcas.pipeline.train_tcdm import stream_plan

    assert [s for s in range(1, 10) if refill_due(3, s)] == [3, 6, 9] and not any(refill_due(0, s) for s in range(9))
    t = _settings(tmp_path / "p", 1).train
    assert (stream_plan(t, 3, 1, 2).buffer_cases, stream_plan(t, 3, 1, 2).refill_every) == (3, 0)  # holds all 3
    assert (stream_plan(t, 20, 1, 2).buffer_cases, stream_plan(t, 20, 1, 2).refill_every) == (8, 1)
    assert (stream_plan(t, 6, 2, 2).buffer_cases, stream_plan(t, 6, 2, 2).refill_every) == (3, 1)  # shards re-split
    rows = [{"case_id": c, "image": tiny_cases.images[i].numpy(), "label": tiny_cases.labels[i].numpy()}
            for i, c in enumerate(tiny_cases.case_ids)]
    for every, pulls in ((1, 2 + 4), (2, 2 + 2), (0, 2)):   # 2 slots filled first, then one pull per refill
        taken = []

        def stream():
            for c in _local_stream(rows):
                taken.append(c["case_id"])
                yield c
        s = _settings(tmp_path / f"r{every}", 4, buffer_cases=2, refill_every=every)
        assert train_tcdm_loop(s, case_stream=stream, progress=False)["steps_run"] == 4
        assert len(taken) == pulls, (every, taken)
    with pytest.raises(ValueError, match="refill_every"):
        _settings(tmp_path / "bad", 1, refill_every=-1)


@pytest.mark.slow
def test_ray_train_two_workers_killed_and_resumed(tmp_path, ray_local):
    """2 DDP workers on local Ray; both are killed after step 3 (checkpoint at 2); Ray restarts the
    group, which resumes from step 2's checkpoint and finishes step 4 with the optimizer restored."""
    from fcas.pipeline.train_tcdm import run

    out = tmp_path / "tcdm"
    cfg = {"preset": {"name": "tiny", **{k: TINY[k] for k in ("shape", "spacing")}}, "model": {"name": "tiny"},
           "data": "phantom:3", "out": str(out), "vae": None,
           "train": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0},
           "trainer": {"num_workers": 2, "progress": False, "max_failures": 1, "fail_at_step": 3,
                       "storage_path": str(tmp_path / "ray")}}
    summary = run(cfg)
    assert (out / "_injected_failure").exists()  # the first attempt did die at step 3
    assert summary["step"] == 4 and [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    ck = load_checkpoint(summary["latest_checkpoint"])
    hist = ck.state_dict("history")
    assert hist["step"].tolist() == [1.0, 2.0, 3.0, 4.0]  # step 3 of the dead attempt was redone, once
    # AdamW counts its own steps: 4 means the restarted attempt continued the restored optimizer
    opt = ck.state_dict("optimizer")
    assert {float(st["step"]) for st in opt["state"].values()} == {4.0}
    assert ck.config["train"]["steps"] == 4 and ck.config["preset"] == "tiny"


@pytest.mark.filterwarnings("ignore:TCDM uses an untrained")
def test_export_gives_a_loadable_fp16_bundle_that_samples(tmp_path, tiny_cases):
    from fcas.diffusion.conditioning import build_c_raw
    from fcas.diffusion.sampling import decode_latent, sample
    from fcas.diffusion.bundle import load_tcdm
    from fcas.models.export import export_inference_checkpoint

    train_tcdm_loop(_settings(tmp_path / "run", 2), cases=tiny_cases, progress=False)
    digest = export_inference_checkpoint(str(tmp_path / "run"), str(tmp_path / "demo"))
    assert (tmp_path / "demo" / "DIGEST").read_text().strip() == digest
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 1000
    assert not (tmp_path / "demo" / "optimizer.pt").exists()
    sd = torch.load(tmp_path / "demo" / "unet.pt", weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    bundle = load_tcdm(str(tmp_path / "demo"))
    assert bundle.digest == digest and bundle.shape == (32, 32, 32)
    full = load_tcdm(latest_checkpoint(str(tmp_path / "run")))
    for k, v in full.model.unet.state_dict().items():  # fp16 export is within fp16 rounding of fp32
        assert torch.allclose(bundle.model.unet.state_dict()[k], v, rtol=1e-3, atol=1e-4), k
    schema = bundle.condition.label_schema
    c = build_c_raw(tiny_cases.labels[:1], tiny_cases.labels[1:2], tiny_cases.images[1:2], schema)
    res = sample(bundle, c, torch.Generator().manual_seed(0), steps=3, collect_every=1)
    img = decode_latent(bundle.vae, res.latent, bundle.scale_factor)
    assert img.shape == (1, 1, 32, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert len(res.intermediates) == 3


def test_vae_resume_is_bit_exact_and_refuses_another_architecture(tmp_path, tiny_cases):
    def settings(out, steps, **vae):
        return VAESettings.from_dict({**TINY, "data": "phantom:3", "out": str(out),
                                      **({"vae": {**TINY.get("vae", {}), **vae}} if vae else {}),
                                      "train": {"steps": steps, "checkpoint_every": 2, "crop": [16, 16, 16]}})

    train_vae_loop(settings(tmp_path / "whole", 4), cases=tiny_cases, progress=False)
    train_vae_loop(settings(tmp_path / "split", 2), cases=tiny_cases, progress=False)
    r = train_vae_loop(settings(tmp_path / "split", 4), cases=tiny_cases, progress=False)
    assert (r["start_step"], r["steps_run"]) == (2, 2)
    a = load_checkpoint(latest_checkpoint(str(tmp_path / "whole")))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "split")))
    for k, v in a.state_dict("vae").items():
        assert torch.equal(v, b.state_dict("vae")[k]), k
    assert a.state_dict("history")["loss"].tolist() == b.state_dict("history")["loss"].tolist()
    with pytest.raises(ValueError, match="different VAE architecture; use another out="):
        train_vae_loop(settings(tmp_path / "split", 6, latent_channels=8), cases=tiny_cases, progress=False)


def test_training_run_refuses_a_non_finite_loss_and_keeps_its_checkpoints(tmp_path):
    from fcas.training import TrainingRun

    run = TrainingRun("t", str(tmp_path), 3, arch={"w": 1}, every=1, progress=False)
    saved = []
    for step in run.steps():
        loss = torch.tensor(float("nan") if step == 3 else 1.0 / step)
        if step == 3:
            with pytest.raises(FloatingPointError, match="t: loss is nan at step 3"):
                run.finite(loss, step)
            break
        run.end_step(step, {"loss": run.finite(loss, step)}, checkpoint=lambda: ({"arch": {"w": 1}}, {"x": {}}))
        saved.append(step)
    assert saved == [1, 2] and load_checkpoint(latest_checkpoint(str(tmp_path))).step == 2
    again = TrainingRun("t", str(tmp_path), 3, arch={"w": 1}, progress=False)
    assert again.resume().step == 2 and again.history["loss"] == [1.0, 0.5]
    with pytest.raises(ValueError, match="different architecture"):
        TrainingRun("t", str(tmp_path), 3, arch={"w": 2}, progress=False).resume()


def test_vae_memory_levers_train_the_same_model(tmp_path, tiny_cases):
    """Activation checkpointing and the channels-last layout change memory and speed, not the maths (amp with
    float16 is CUDA-only: a no-op here); a bad autocast dtype is refused."""
    def run(out, **levers):
        s = VAESettings.from_dict({**TINY, "data": "phantom:3", "out": str(tmp_path / out),
                                   "train": {"steps": 2, "checkpoint_every": 2, "crop": [16, 16, 16], **levers}})
        train_vae_loop(s, cases=tiny_cases, progress=False)
        return load_checkpoint(latest_checkpoint(str(tmp_path / out)))

    plain = run("plain")
    ckpt = run("checkpointed", activation_checkpointing=True, amp=True, amp_dtype="float16")
    for k, v in plain.state_dict("vae").items():   # the same ops recomputed: the same weights
        assert torch.allclose(v.float(), ckpt.state_dict("vae")[k].float(), atol=1e-6), k
    last = run("channels_last", channels_last=True)
    assert torch.isfinite(last.state_dict("history")["loss"]).all()
    # the layout changes neither encoder nor decoder (MONAI's posterior sample, randn_like, follows the memory
    # layout, so the loop's draws differ between layouts: compare the deterministic parts)
    from fcas.models.networks import VAEConfig, build_vae

    torch.manual_seed(0)
    vae, x = build_vae(VAEConfig()).eval(), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        mu, _ = vae.encode(x)
        rec = vae.decode(mu)
        vae.to(memory_format=torch.channels_last_3d)
        mu_cl, _ = vae.encode(x.to(memory_format=torch.channels_last_3d))
        rec_cl = vae.decode(mu_cl)
    assert torch.allclose(mu_cl, mu, atol=1e-5) and torch.allclose(rec_cl, rec, atol=1e-5)
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        VAESettings.from_dict({**TINY, "data": "phantom:3", "out": "x", "train": {"amp_dtype": "int8"}})


def test_tcdm_memory_levers_keep_the_loss(tmp_path, tiny_cases):
    """Activation checkpointing and channels-last change memory and speed, not the loss (float16 autocast and
    fused attention act on CUDA only); bfloat16 autocast runs on CPU too, close to fp32; a bad dtype is refused."""
    def run(out, **levers):
        s = _settings(tmp_path / out, 2)
        s = TCDMSettings.from_dict({**s.to_dict(), "train": {**s.to_dict()["train"], **levers}})
        train_tcdm_loop(s, cases=tiny_cases, progress=False)
        return load_checkpoint(latest_checkpoint(str(tmp_path / out))).state_dict("history")["loss"]

    plain = run("plain")
    assert torch.equal(run("checkpointed", activation_checkpointing=True, fused_attention=True), plain)
    last = run("channels_last", channels_last=True)
    assert last[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    bf16 = run("bf16", amp=True, amp_dtype="bfloat16")   # CPU autocast: bf16 convolutions, fp32 weights and loss
    assert not torch.equal(bf16, plain) and torch.allclose(bf16, plain, rtol=2e-2)
    from fcas.training.loop import amp_context

    conv, x = torch.nn.Conv3d(1, 2, 3), torch.rand(1, 1, 6, 6, 6)
    with amp_context("cpu", True, "bfloat16"):
        assert conv(x).dtype == torch.bfloat16
    with amp_context("cpu", True, "float16"):   # float16 norms fail on CPU: left fp32
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        TCDMSettings.from_dict({**_settings(tmp_path, 2).to_dict(), "train": {"amp_dtype": "fp8"}})


def test_min_snr_weighting_reaches_the_training_loop(tmp_path, tiny_cases):
    """train.min_snr_gamma weights each sample's loss by min(SNR, γ) / SNR <= 1: the first step (same weights,
    noise and timesteps) scores below the plain loss (10 training timesteps: every SNR > 5, every weight < 1);
    a non-positive γ is refused."""
    def first_loss(out, **train):
        s = _settings(tmp_path / out, 1, **train).to_dict()
        s = TCDMSettings.from_dict({**s, "scheduler": {**s["scheduler"], "num_train_timesteps": 10}})
        train_tcdm_loop(s, cases=tiny_cases, progress=False)
        return load_checkpoint(latest_checkpoint(str(tmp_path / out))).state_dict("history")["loss"][0].item()

    plain, weighted = first_loss("plain"), first_loss("snr", min_snr_gamma=5.0)
    assert weighted < plain and weighted > 0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        _settings(tmp_path / "bad", 1, min_snr_gamma=0)


def test_a_trainer_that_holds_every_local_cpu_is_refused_before_training(tmp_path, ray_local):
    """A worker of all the local Ray's CPUs would leave the data stream's loading tasks unschedulable (the
    job would wait forever for its first case): refused with one line that names the limit."""
    from fcas.pipeline.ray_env import check_training_cpus
    from fcas.pipeline.train_vae import run

    total = ray_local.cluster_resources()["CPU"]
    check_training_cpus(1, total - 0.25, 0.25)   # fits exactly
    check_training_cpus(1, total, 0.25, address="auto")   # a cluster may grow: not ours to refuse
    from hydra import compose, initialize_config_dir

    from fcas.bundled import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        model = compose(config_name="train_vae", overrides=["model=tiny"]).model
    cfg = {"preset": {"name": "tiny", **{k: TINY[k] for k in ("shape", "spacing")}}, "model": model,
           "data": "phantom:2", "out": str(tmp_path / "vae"),
           "train": {"steps": 2, "checkpoint_every": 2},
           "trainer": {"num_workers": 1, "cpus_per_worker": total, "progress": False}}
    with pytest.raises(ValueError, match=rf"hold {total:g} of this local Ray's {total:g} CPUs, leaving none for the "
                                         rf"data tasks \(0.25 CPU each\): use trainer.cpus_per_worker<={total - 0.25:g}"):
        run(cfg)
    assert not (tmp_path / "vae").exists()


def test_the_case_buffer_keeps_the_site_of_every_slot_and_the_stream_carries_it():
    from fcas.diffusion.data import CaseBuffer, case_rows, load_case_batch
    from fcas.diffusion.pairs import refill_rng

    rows = [{"case_id": f"c{i}", "image": np.full((1, 4, 4, 4), i, np.float32), "label": np.zeros((4, 4, 4), np.uint8),
             "site": f"s{i % 2}"} for i in range(6)]
    buf = CaseBuffer(_local_stream(rows), 3)
    for step in range(1, 60):
        buf.refill(refill_rng(0, step))
        assert buf.cases.sites == [f"s{int(c[1:]) % 2}" for c in buf.cases.case_ids]
    site_rows = case_rows("phantom:2@3/2")
    b = load_case_batch({k: [r[k] for r in site_rows] for k in site_rows[0]}, TINY["shape"], TINY["spacing"])
    assert list(b["site"]) == ["phantom_site_0001", "phantom_site_0002"]


def test_a_cases_manifest_names_sites_in_an_optional_column(tmp_path, tiny_templates):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcas.diffusion.data import case_rows, load_cases
    from fcas.io.manifest import read_cases

    table = read_cases(tiny_templates, schema=None)          # file URIs made absolute
    table = table.append_column("site", pa.array(["north", "south", "north", "south"][: table.num_rows]))
    pq.write_table(table, tmp_path / "cases.parquet")
    cases = load_cases(str(tmp_path), split=None)
    assert cases.sites == table.column("site").to_pylist()
    assert [r["site"] for r in case_rows(str(tmp_path), split=None)] == cases.sites
    assert load_cases(tiny_templates, split=None).sites is None   # no column: no sites
