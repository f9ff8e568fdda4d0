"""The experiments of the reproduction: Table 1 on held-out pairs, the segmentation arms of Tables 3 and 4,
and :func:`run_reproduce`, which runs (or resumes) every stage and writes the report (:mod:`.report`).
Hand-written orchestration; the science is in :mod:`fcas.diffusion`, :mod:`fcas.cal`, :mod:`fcas.metrics`
and :mod:`fcas.evaluation`."""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np
import torch

from fcas.io import storage
from fcas.reproduction.settings import ARMS, ReproduceSettings, Runners
from fcas.reproduction.stages import STAGE_DEPENDENCIES, log_event, run_stage, stage_key

log = logging.getLogger(__name__)

__all__ = ["run_reproduce", "sample_held_out_pairs", "table1_seed", "vae_reconstruction", "train_and_evaluate_seg"]


# ---- Table 1: held-out pairs ------------------------------------------------------------------


@torch.no_grad()
def sample_held_out_pairs(checkpoint: str, cases, pairs: int, steps: int, seed: int) -> list[np.ndarray]:
    """Direction B@A on the pairs ``(i, held_out_partner(i))`` of ``cases`` (:class:`fcas.diffusion.data.CaseArrays`;
    the template B is the next case of A's site, :func:`fcas.diffusion.pairs.held_out_partner`):
    ``I_A`` sampled from ``(M_A, M_B, I_B)`` (the mask-only checkpoint ignores ``M_B``/``I_B``) with
    DDIM; pair ``i``'s initial noise comes from ``rng([seed, i])``, the same for every checkpoint.

    Returns:
        ``pairs`` volumes ``(X, Y, Z)`` float32 in [0, 1].
    """
    from fcas.diffusion.conditioning import build_c_raw
    from fcas.diffusion.sampling import decode_latent, sample
    from fcas.diffusion.bundle import load_tcdm
    from fcas.diffusion.pairs import held_out_partner

    bundle = load_tcdm(checkpoint)
    cond = bundle.condition
    out = []
    for i in range(pairs):
        a = i % len(cases)
        b = held_out_partner(a, len(cases), cases.sites)
        c = build_c_raw(cases.labels[a:a + 1], cases.labels[b:b + 1], cases.images[b:b + 1], cond.label_schema,
                        cond.encoding, cond.mask_only)
        g = torch.Generator().manual_seed(int(np.random.default_rng([seed, i]).integers(2**62)))
        res = sample(bundle, c, g, steps=steps, scheduler="ddim")
        img = decode_latent(bundle.vae, res.latent, bundle.scale_factor).clamp(0, 1)
        out.append(img[0, 0].numpy())
    return out


def table1_seed(s: ReproduceSettings, seed: int, test, floor_set) -> dict:
    """SSIM / RMSE / FID of both checkpoints on the held-out pairs for one seed (+ the real-vs-real FID floor).

    SSIM and RMSE "under the same mask" (the paper's §4): over the cardiac voxels of the reference mask M_A
    (the figures named ``ssim`` / ``rmse``), and over the whole volume beside them (``*_whole``), where
    the surroundings of A, which neither model is given, dominate. ``ssim_zeroed``: the other reading of
    the paper's phrase, both images set to 0 outside M_A before SSIM over M_A's voxels, so that A's
    surroundings (seen by the SSIM window near the heart's border) enter neither figure.
    """
    from fcas.evaluation import evaluate_pairs
    from fcas.evaluation.synthesis import patch_features
    from fcas.labels import load_schema
    from fcas.metrics.fid import VAEEncoderFeatures, fid

    feats = VAEEncoderFeatures.from_checkpoint(s.checkpoint, resize=s.fid_resize)
    idx = [i % len(test) for i in range(s.pairs)]
    targets = [test.images[i, 0].numpy() for i in idx]
    schema = load_schema(s.schema)
    masks = [np.isin(test.labels[i].numpy(), schema.cardiac_ids) for i in idx]
    out: dict[str, Any] = {"seed": seed, "pairs": s.pairs, "steps": s.table1_steps, "region": "cardiac voxels of M_A"}
    for name, ck in (("template", s.checkpoint), ("mask_only", s.mask_only_checkpoint)):
        t0 = time.perf_counter()
        imgs = sample_held_out_pairs(ck, test, s.pairs, s.table1_steps, seed)
        r = evaluate_pairs(imgs, targets, masks, feats)
        w = evaluate_pairs(imgs, targets, None, None)
        z = evaluate_pairs([i * m for i, m in zip(imgs, masks)], [t * m for t, m in zip(targets, masks)], masks)
        out[name] = {k: r[k] for k in ("ssim_mean", "ssim_sd", "rmse_mean", "rmse_sd", "fid", "fid_patches", "ssim",
                                       "rmse")}
        out[name].update({f"{k}_whole": w[k] for k in ("ssim_mean", "rmse_mean")})
        out[name].update(ssim_zeroed_mean=z["ssim_mean"], ssim_zeroed_sd=z["ssim_sd"])
        out[name]["seconds_per_sample"] = (time.perf_counter() - t0) / s.pairs
        out["features"] = r["features"]
    enc = lambda vols: torch.stack([feats(torch.as_tensor(v)[None, None])[0] for v in vols])  # noqa: E731
    floor = [floor_set.images[i, 0].numpy() for i in range(len(floor_set))]
    out["fid_floor"] = fid(enc(targets), enc(floor))
    out["fid_patches_floor"] = fid(patch_features(feats, targets), patch_features(feats, floor))
    out["vae_reconstruction"] = vae_reconstruction(s.checkpoint, targets, masks)
    return out


def vae_reconstruction(checkpoint: str, targets, masks=None) -> dict:
    """SSIM / RMSE of the checkpoint's own VAE reconstructing ``targets`` (encode, decode) over ``masks``
    (and over the whole volume, ``*_whole``; ``ssim_zeroed_mean``: both set to 0 outside the mask first, as
    :func:`table1_seed` scores it): the ceiling a sample decoded by that VAE can reach, reported beside the
    pair figures."""
    from fcas.metrics.image import rmse, ssim
    from fcas.diffusion.bundle import load_tcdm
    from fcas.models.vae import vae_decode, vae_encode

    bundle = load_tcdm(checkpoint)
    vae = bundle.vae.float()
    masks = [None] * len(targets) if masks is None else list(masks)
    ss, rs, sw, rw, sz = [], [], [], [], []
    with torch.no_grad():
        for t, m in zip(targets, masks):
            x = torch.as_tensor(t, dtype=torch.float32)[None, None]
            r = vae_decode(vae, vae_encode(vae, x)).clamp(0, 1)[0, 0]
            ss.append(ssim(r, x[0, 0], m))
            rs.append(rmse(r, x[0, 0], m))
            sw.append(ssim(r, x[0, 0]))
            rw.append(rmse(r, x[0, 0]))
            if m is not None:
                mt = torch.as_tensor(np.asarray(m))
                sz.append(ssim(r * mt, x[0, 0] * mt, m))
    return {"ssim_mean": float(np.mean(ss)), "rmse_mean": float(np.mean(rs)),
            "ssim_mean_whole": float(np.mean(sw)), "rmse_mean_whole": float(np.mean(rw)),
            "ssim_zeroed_mean": float(np.mean(sz)) if sz else None}


# ---- Tables 3 and 4: segmentation -----------------------------------------------------------


def _cal_settings(s: ReproduceSettings, arm: str, seed: int, syn: str | None, out: str):
    from fcas.training.cal import CALSettings

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {ARMS}")
    if arm == "real_only" and s.val_every:   # from scratch until the validation Dice stops improving
        train = {"pretrain_steps": 0, "finetune_steps": s.finetune_steps, "finetune_lr": s.lr}
    elif arm == "real_only":   # the same number of gradient steps, all on the real cases, from scratch
        train = {"pretrain_steps": 0, "finetune_steps": s.pretrain_steps + s.finetune_steps, "finetune_lr": s.lr}
    else:
        train = {"pretrain_steps": s.pretrain_steps, "finetune_steps": s.finetune_steps, "loss": arm,
                 "finetune_lr": s.finetune_lr}
    train.update(batch_size=s.batch_size, lr=s.lr, seed=seed, crop=s.crop, keep_checkpoints=1,
                 checkpoint_every=max(1, s.pretrain_steps + s.finetune_steps))
    if s.seg_amp_dtype:
        train.update(amp=True, amp_dtype=s.seg_amp_dtype)
    if s.val_every:
        train.update(val=s.val_source, val_every=s.val_every, patience=s.patience)
    return CALSettings.from_dict({"syn": syn if arm != "real_only" else None, "real": s.train_source, "real_split": None,
                                  "out": out, "shape": s.shape, "spacing": s.spacing, "preset": s.preset,
                                  "schema": s.schema, "net": dict(s.segnet), "augment": dict(s.augment), "train": train})


def train_and_evaluate_seg(s: ReproduceSettings, arm: str, seed: int, syn: str | None, train_set, test) -> dict:
    """Train one arm with :func:`fcas.training.cal.train_cal_loop` (Ray-free) and score it on ``test``.

    Returns:
        ``{"train": loop summary, "eval": segmentation summary (per-class Dice / RDice), "curve": [...]}``.
    """
    from fcas.cal.data import class_lut
    from fcas.cal.predict import load_segnet, predict_classes
    from fcas.training.cal import read_metrics, train_cal_loop
    from fcas.evaluation import evaluate_segmentation, segmentation_summary
    from fcas.labels import load_schema

    out = storage.join(s.work, "seg", arm, f"seed{seed}")
    settings = _cal_settings(s, arm, seed, syn, out)
    summary = train_cal_loop(settings, finetune=train_set, progress=False)
    net, config = load_segnet(summary.get("best_checkpoint") or summary["latest_checkpoint"])
    lut = class_lut(s.schema)
    to_schema = np.zeros(int(lut.max()) + 1, dtype=np.uint8)
    for sid, k in enumerate(lut):
        if k:
            to_schema[k] = sid
    preds, labels = {}, {}
    for i, cid in enumerate(test.case_ids):
        cls = predict_classes(net, test.images[i:i + 1], config["window"])[0, 0].numpy()
        preds[cid], labels[cid] = to_schema[cls], test.labels[i].numpy()
    schema = load_schema(s.schema)
    rows = evaluate_segmentation(preds, labels, schema, radius=s.rdice_radius)
    ev = segmentation_summary(rows, s.rdice_radius)
    ev.pop("per_case", None)
    curve = [{"step": r["step"], "stage": r["stage"], "loss": r["loss"]} for r in read_metrics(out)]
    val = [{"step": r["step"], "val_dice": r["val_dice"]} for r in summary.pop("validation", [])]
    best = max(val, key=lambda r: r["val_dice"]) if val else None
    return {"arm": arm, "seed": seed, "train": summary, "eval": ev, "curve": curve, "val_curve": val,
            "best_step": best["step"] if best else None}


# ---- orchestration --------------------------------------------------------------------------


def run_reproduce(s: ReproduceSettings, runners: Runners, config: Mapping[str, Any] | None = None) -> dict:
    """Run (or resume) every stage and write the report; returns ``{"stages": {...}, "results": uri}``."""
    from fcas.diffusion.data import load_cases

    torch.set_num_threads(max(1, int(s.threads)))
    storage.makedirs(s.work)
    log_event(s.work, {"stage": "run", "event": "start", "seconds": 0.0, "at": time.time()})
    stages: dict[str, dict] = {}
    lib_out = storage.join(s.work, "library")

    def data() -> dict:
        if s.library:
            return {"library": s.library, "library_summary": {"given": s.library},
                    "train_source": s.train_source, "test_source": s.test_source}
        summary = runners.prepare(source=f"phantom:{s.library_n}", out=lib_out, shape=s.shape, spacing=s.spacing,
                                  splits=(("template", 0.25), ("reference", 0.75)), seed=0)
        return {"library": storage.join(lib_out, "cases.parquet"), "library_summary": summary,
                "train_source": s.train_source, "test_source": s.test_source}

    keys = {stage: stage_key(s, stage) for stage in STAGE_DEPENDENCIES}
    stages["data"] = run_stage(s.work, "data", data, keys["data"], clean=lib_out)
    cache: dict[str, Any] = {}
    todo = ("table1", "synthesis", "seg")
    if s.stop_after in todo[:-1] or s.stop_after == "data":
        todo = todo[:todo.index(s.stop_after) + 1] if s.stop_after != "data" else ()

    def cases(which: str):
        if which not in cache:
            src = {"train": s.train_source, "test": s.test_source, "seg_test": s.seg_test_source,
                   "floor": s.floor_source}[which]
            cache[which] = load_cases(src, s.shape, s.spacing)
        return cache[which]

    for seed in s.seeds if "table1" in todo else ():
        stages[f"table1_seed{seed}"] = run_stage(s.work, f"table1_seed{seed}",
                                              lambda seed=seed: table1_seed(s, seed, cases("test"), cases("floor")), keys["table1"])
    if "table1" in todo:
        from fcas.evaluation.template_oracles import template_information

        test_seeds = range(s.real_offset + s.n_train, s.real_offset + s.n_train + s.n_test)
        mean_seeds = range(s.real_offset + 9000, s.real_offset + 9000 + s.oracle_mean_n)
        stages["table1_oracles"] = run_stage(s.work, "table1_oracles", lambda: template_information(
            test_seeds, s.shape, s.spacing, mean_seeds, s.site_size), keys["table1"])
    syn_out = storage.join(s.work, "synthesis")
    if "synthesis" in todo:
        stages["synthesis"] = run_stage(s.work, "synthesis", lambda: runners.synthesize(
            n=s.syn_n, out=syn_out, checkpoint=s.checkpoint, templates=stages["data"]["result"]["library"],
            run_seed=s.syn_seed, steps=s.syn_steps, ssv_every=s.ssv_every, shape=s.shape, spacing=s.spacing,
            sampler_actors=s.sampler_actors, ssv_mode=s.ssv_mode, ssv_start=s.ssv_start,
            sampler_threads=max(1, s.threads // max(1, s.sampler_actors))), keys["synthesis"], clean=syn_out)

    def train_set():
        if "ft" not in cache:
            from fcas.cal.data import load_finetune_set

            cache["ft"] = load_finetune_set(s.train_source, s.shape, s.spacing, None, s.schema)
        return cache["ft"]

    for seed in s.seeds if "seg" in todo else ():
        for arm in ARMS:
            name = f"seg_{arm}_seed{seed}"
            stages[name] = run_stage(s.work, name, lambda arm=arm, seed=seed: train_and_evaluate_seg(
                s, arm, seed, syn_out, train_set(), cases("seg_test")), keys["seg"], clean=storage.join(s.work, "seg", arm, f"seed{seed}"))
    from fcas.reproduction.report import render_results

    uri = render_results(s, stages, config or {})
    log_event(s.work, {"stage": "run", "event": "end", "seconds": 0.0, "at": time.time()})
    return {"stages": {k: v["seconds"] for k, v in stages.items()}, "results": uri}
