"""CAL: the confidence-aware loss (Eq. 9 vs MONAI's DiceCELoss), data loading, the Ray-free loop with
bit-exact resume, and the Ray Train job end to end at the tiny preset (12 synthetic samples + 6 phantoms)."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from fcas.cal import cal_loss, load_predictor, load_segnet
from fcas.cal.data import (AugmentConfig, augment_batch, build_augment, class_lut, load_finetune_set, load_sample,
                           local_synthetic_batches, synthetic_rows)
from fcas.training.cal import CALSettings, read_metrics, train_cal_loop
from fcas.io.nifti import NiftiError
from fcas.models.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fcas.presets import load_preset

TINY = load_preset("tiny")


# ---- the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 9, 8, 8, 8), (1, 3, 4, 6, 5), (3, 2, 5, 5, 5), (2, 9, 16, 8, 4)])
def test_cal_with_unit_confidence_is_monai_dicece(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g) * 3
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    if shape[1] > 2:
        target[target == 1] = 0   # one class absent everywhere: Dice smoothing matters
    want = DiceCELoss(softmax=True, to_onehot_y=True)(logits, target)
    got = cal_loss(logits, target, torch.ones(shape[0], 1, *shape[2:]))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (float(got), float(want))
    assert torch.allclose(cal_loss(logits, target), want, rtol=1e-6, atol=1e-7)   # cm=None is Eq. 8


def test_constant_confidence_scales_cross_entropy_and_keeps_dice():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 9, 8, 8, 8, generator=g), torch.randint(0, 9, (2, 1, 8, 8, 8), generator=g)
    _, plain = cal_loss(logits, target, return_parts=True)
    _, half = cal_loss(logits, target, torch.full((2, 1, 8, 8, 8), 0.5), return_parts=True)
    assert half["ce"] == pytest.approx(0.5 * plain["ce"], rel=1e-6)
    assert half["dice"] == pytest.approx(plain["dice"], rel=1e-4)


def test_zero_confidence_region_has_no_influence():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 8, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 9, (2, 1, 8, 8, 8), generator=g)
    cm = torch.rand(2, 1, 8, 8, 8, generator=g)
    cm[:, :, :4] = 0.0
    loss = cal_loss(logits, target, cm)
    loss.backward()
    assert torch.all(logits.grad[:, :, :4] == 0) and torch.any(logits.grad[:, :, 4:] != 0)
    other = logits.detach().clone()
    other[:, :, :4] = torch.randn(2, 9, 4, 8, 8, generator=g) * 10
    assert torch.allclose(cal_loss(other, target, cm), loss.detach(), rtol=1e-6)


@pytest.mark.parametrize("target_shape, cm_shape, ids, match", [
    ((2, 1, 4, 4, 4), (2, 1, 4, 4, 3), (0, 3), "cm must have shape"),
    ((2, 3, 4, 4, 4), (2, 1, 4, 4, 4), (0, 3), "target must have shape"),
    ((2, 1, 4, 4, 4), (2, 1, 4, 4, 4), (0, 5), r"target ids must lie in \[0, 4\)"),
])
def test_loss_refuses_bad_inputs(target_shape, cm_shape, ids, match):
    target = torch.full(target_shape, ids[1])
    with pytest.raises(ValueError, match=match):
        cal_loss(torch.zeros(2, 4, 4, 4, 4), target, torch.ones(cm_shape))


def test_job_config_sizes_the_net_by_preset():
    from hydra import compose, initialize_config_dir

    from fcas.labels import CONFIG_DIR
    from fcas.pipeline.pretrain_cal import cal_settings_from_cfg

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        tiny = cal_settings_from_cfg(compose("pretrain_cal", overrides=["syn=/x"]))
        paper = cal_settings_from_cfg(compose("pretrain_cal", overrides=["syn=/x", "preset=paper",
                                                                          "train.crop=[128,128,128]", "train.loss=plain"]))
    assert tiny.shape == (32, 32, 32) and tiny.net.filters == (8, 16, 32) and tiny.net.out_channels == 9
    assert tiny.train.loss == "cal" and tiny.real == "phantom:6" and tiny.out == "outputs/cal-tiny"
    assert paper.net.filters == (32, 64, 128, 256, 320, 320) and paper.window == (128, 128, 128)
    assert paper.train.loss == "plain"
    with pytest.raises(ValueError, match="needs syn="):
        CALSettings.from_dict({"syn": None, "real": "phantom:2", "out": "/x", "shape": TINY.shape,
                               "spacing": TINY.spacing, "train": {"pretrain_steps": 1}})


# ---- data -----------------------------------------------------------------------------------------


def test_class_lut_maps_surroundings_to_background():
    lut = class_lut("cardiac")
    assert lut.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]


@pytest.mark.parametrize("content", [b"", b"not a nifti at all" * 20, b"\x1f\x8b\x08\x00broken-gzip"])
def test_bad_file_raises_one_line_error_naming_it(tmp_path, content):
    bad = tmp_path / "s00000001_image.nii.gz"
    bad.write_bytes(content)
    with pytest.raises((NiftiError, ValueError)) as err:
        load_sample(str(bad), str(bad), str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_augmentation_is_seeded_and_keeps_classes():
    ft = load_finetune_set("phantom:2", TINY.shape, TINY.spacing)
    assert ft.image.shape == (2, 1, *TINY.shape) and int(ft.label.max()) <= 8
    batch = {"image": ft.image, "label": ft.label, "cm": torch.ones_like(ft.image)}
    t = build_augment(AugmentConfig(flip_prob=0.5, affine_prob=1.0, intensity_prob=1.0))
    a, b = augment_batch(batch, t, (0, 5, 0)), augment_batch(batch, t, (0, 5, 0))
    c = augment_batch(batch, t, (0, 6, 0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])
    assert set(a["label"].unique().tolist()) <= set(range(9)) and a["label"].dtype == torch.int64


# ---- a 12-sample tiny synthesis run, shared ------------------------------------------------------


@pytest.fixture(scope="module")
def syn12(tiny_run12):
    """The session's 12-sample tiny synthesis run (tests/conftest.py), read only."""
    out = str(tiny_run12[0])
    assert synthetic_rows(out).num_rows == 12
    return out


def _settings(syn, out, pretrain, finetune, **train):
    return CALSettings.from_dict({
        "syn": syn, "real": "phantom:6", "out": str(out), "shape": TINY.shape, "spacing": TINY.spacing,
        "preset": "tiny", "net": {"filters": [8, 16, 32], "kernel_size": [3, 3, 3], "strides": [1, 2, 2]},
        "train": {"pretrain_steps": pretrain, "finetune_steps": finetune, "batch_size": 1,
                  "checkpoint_every": 2, "keep_checkpoints": 0, **train},
    })


def test_synthetic_reader_is_deterministic_and_resumable(syn12):
    rows = synthetic_rows(syn12)
    it = local_synthetic_batches(rows, 2, seed=0)
    first = [next(it) for _ in range(7)]   # 14 draws: one full epoch of 12 + 2
    assert sorted(np.concatenate([b["sample_id"] for b in first])[:12].tolist()) == list(range(12))
    resumed = next(local_synthetic_batches(rows, 2, seed=0, start_step=5))
    assert np.array_equal(resumed["sample_id"], first[5]["sample_id"])
    b = first[0]
    assert b["image"].shape == (2, 1, *TINY.shape) and b["cm"].dtype == np.float32
    assert 0.0 <= b["cm"].min() and b["cm"].max() <= 1.0 and b["label"].max() <= 8


def test_loop_resume_is_bit_exact(syn12, tmp_path):
    """Stop after 2 pretraining steps, rerun with more: step, weights and AdamW state carry over, and the
    result equals an uninterrupted run (Ray-free reader: every draw is keyed by the step)."""
    whole = train_cal_loop(_settings(syn12, tmp_path / "whole", 3, 1), progress=False)
    part = train_cal_loop(_settings(syn12, tmp_path / "split", 2, 0), progress=False)
    assert part["final_step"] == 2
    saved = load_checkpoint(latest_checkpoint(str(tmp_path / "split")))
    rest = train_cal_loop(_settings(syn12, tmp_path / "split", 3, 1), progress=False)
    assert rest["start_step"] == 2 and rest["steps_run"] == 2 and whole["steps_run"] == 4
    a = load_checkpoint(latest_checkpoint(str(tmp_path / "whole")))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "split")))
    assert a.step == b.step == 4 and a.config["stage"] == "finetune"
    for k, v in a.state_dict("net").items():
        assert torch.equal(v, b.state_dict("net")[k]), k
    # the pretraining optimizer state at step 2 is what the split run resumed with
    mid = load_checkpoint(str(tmp_path / "whole" / "step_000000002"))
    sa, sb = mid.state_dict("optimizer")["state"], saved.state_dict("optimizer")["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert [r["step"] for r in read_metrics(str(tmp_path / "split"))] == [1, 2, 3, 4]
    assert [r["stage"] for r in read_metrics(str(tmp_path / "split"))] == ["pretrain"] * 3 + ["finetune"]


def test_fine_tuning_stops_early_on_validation_and_keeps_the_best(tmp_path):
    """lr 0: the validation Dice can never improve after the first check, so with patience 2 fine-tuning
    stops at the third validation (step 6 of 12), out/best holds step 2, and a rerun trains nothing."""
    from fcas.training.cal import BEST, VAL_FILE

    s = _settings(None, tmp_path, 0, 12, finetune_lr=0.0, val="phantom:2@700", val_every=2, patience=2,
                  checkpoint_every=100)
    r = train_cal_loop(s, progress=False)
    assert r["stopped_at"] == 6 and r["steps_run"] == 6
    rows = read_metrics(str(tmp_path), VAL_FILE)
    assert [v["step"] for v in rows] == [2, 4, 6] and [v["best"] for v in rows] == [True, False, False]
    assert rows[0]["val_dice"] == rows[1]["val_dice"] == rows[2]["val_dice"]
    assert 0.0 <= rows[0]["val_dice"] <= 1.0 and len(rows[0]["val_dice_per_class"]) == 8
    assert load_checkpoint(str(tmp_path / BEST)).step == 2 and r["best_checkpoint"] == str(tmp_path / BEST)
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000006")
    again = train_cal_loop(s, progress=False)
    assert again["steps_run"] == 0 and again["stopped_at"] == 6
    with pytest.raises(ValueError, match="val_every > 0 needs val"):
        _settings(None, tmp_path, 0, 4, val_every=2)


def test_bfloat16_autocast_trains_on_cpu_and_tracks_fp32(tmp_path):
    """amp_dtype=bfloat16 autocasts on CPU too (float16 stays fp32 there): the same seeded run in bf16 ends
    with other weights than in fp32 (autocast really ran) but losses within a few per cent, validation included."""
    kw = dict(checkpoint_every=100, val="phantom:1@700", val_every=3, patience=0)
    runs = {dt: train_cal_loop(_settings(None, tmp_path / dt, 0, 3, amp_dtype=dt, **kw), progress=False)
            for dt in ("float16", "bfloat16")}
    losses = {dt: [r["loss"] for r in read_metrics(str(tmp_path / dt))] for dt in runs}
    assert losses["float16"][0] == pytest.approx(losses["bfloat16"][0], rel=0.05)
    assert all(np.isfinite(losses["bfloat16"]))
    nets = {dt: load_checkpoint(latest_checkpoint(str(tmp_path / dt))).state_dict("net") for dt in runs}
    assert any(not torch.equal(v, nets["bfloat16"][k]) for k, v in nets["float16"].items())
    assert all(v.dtype == torch.float32 for v in nets["bfloat16"].values() if v.is_floating_point())
    val = {dt: runs[dt]["validation"][0]["val_dice"] for dt in runs}
    assert 0.0 <= val["bfloat16"] <= 1.0 and val["bfloat16"] == pytest.approx(val["float16"], abs=0.1)
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        _settings(None, tmp_path, 0, 2, amp_dtype="int8")


def test_resume_refuses_another_net(tmp_path):
    train_cal_loop(_settings(None, tmp_path, 0, 2), progress=False)
    other = CALSettings.from_dict({**_settings(None, tmp_path, 0, 4).to_dict(),
                                   "net": {"filters": [8, 16, 64], "kernel_size": [3, 3, 3], "strides": [1, 2, 2]}})
    with pytest.raises(ValueError, match="step_000000002 was trained with a different net/schema; use another out="):
        train_cal_loop(other, progress=False)


# ---- the Ray Train job ---------------------------------------------------------------------------


def test_pretrain_cal_job_on_ray_train_resumes_and_fine_tunes(syn12, ray_local, tmp_path):
    from fcas.pipeline.pretrain_cal import run

    out = tmp_path / "cal"
    base = {"syn": syn12, "real": "phantom:6", "out": str(out),
            "preset": {"name": "tiny", "shape": list(TINY.shape), "spacing": list(TINY.spacing)},
            "segnet": {"name": "tiny", "filters": [8, 16, 32], "kernel_size": [3, 3, 3], "strides": [1, 2, 2]},
            "data": {"cpus": 0.25, "rows_per_block": 2},
            "trainer": {"num_workers": 2, "cpus_per_worker": 0.5, "progress": False}}
    # steps 1-2 by the Ray-free loop (cheap); one Ray Train run then resumes at step 2 with the saved
    # weights and AdamW state, streams the synthetic run through Ray Data into 2 DDP workers (0.5 CPU
    # each) for pretraining step 3 and fine-tunes steps 4-5 on 6 phantoms
    train_cal_loop(_settings(syn12, out, 2, 0), progress=False)
    saved = load_checkpoint(latest_checkpoint(str(out)))
    assert saved.step == 2 and saved.config["stage"] == "pretrain"
    summary = run({**base, "train": {"pretrain_steps": 3, "finetune_steps": 2, "checkpoint_every": 2,
                                     "keep_checkpoints": 0}})
    assert summary["step"] == 5 and summary["last_loss"]["pretrain"] > 0 and summary["last_loss"]["finetune"] > 0
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 3, 4, 5]
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == ["pretrain"] * 3 + ["finetune"] * 2
    # step 3 continued from the saved AdamW state (its step count goes on from 2); fine-tuning starts afresh
    opt3 = load_checkpoint(str(out / "step_000000003")).state_dict("optimizer")["state"]
    opt5 = load_checkpoint(str(out / "step_000000005")).state_dict("optimizer")["state"]
    assert {float(v["step"]) for v in saved.state_dict("optimizer")["state"].values()} == {2.0}
    assert {float(v["step"]) for v in opt3.values()} == {3.0} and {float(v["step"]) for v in opt5.values()} == {2.0}
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(r["cm_mean"] < 1.0 for r in rows[:3])   # pretraining saw the confidence maps
    final = load_checkpoint(summary["latest_checkpoint"])
    assert final.step == 5 and final.config["stage"] == "finetune"
    net, cfg = load_segnet(summary["latest_checkpoint"])
    assert cfg["net"]["out_channels"] == 9
    ft = load_finetune_set("phantom:1@100", TINY.shape, TINY.spacing)
    with torch.no_grad():
        assert net(ft.image).shape == (1, 9, *TINY.shape)
    from fcas.phantom import make_case

    case = make_case(seed=100, shape=TINY.shape, spacing=TINY.spacing)
    pred = load_predictor(summary["latest_checkpoint"])(case.image)
    assert pred.shape == TINY.shape and pred.dtype == np.uint8 and set(np.unique(pred).tolist()) <= set(range(9))
