"""Synthesis evaluation (:func:`evaluate_synthesis`): every sample of a synthesis run (its manifest) against its
target image -- the template image ``I_B`` (``target=template``, default) or the reference case's
image ``I_A`` (``target=reference``: the true target when MGM left the reference mask unchanged,
as in held-out pair evaluation) -- looked up by case id in the run's template library
(``<run>/templates/cases.parquet`` or ``templates``). SSIM and RMSE in unit intensity scale
(:func:`fcas.diffusion.conditioning.hu_to_unit`) over the sample's label voxels (``mask=label``)
or the whole volume (``mask=all``). FID between the synthesized set and the real set (the library
cases of ``fid_real`` splits), on the project's VAE encoder features; when the library has cases
in two splits, the FID between them is reported beside it as the real-vs-real floor at that set
size. Confidence vs error: per voxel ``|synth - target|`` (unit scale) against the SSV confidence,
over ``cm_region`` (``all`` or ``mask``): Pearson correlation over every voxel (streamed sums),
Spearman on a deterministic subsample, and the mean error per confidence bin. A negative
correlation means low confidence sits where the errors are.

What the figures mean: a synthesized sample has no ground-truth image -- its mask is a reference
mask deformed by MGM, its context comes from the template. Against the template (default) SSIM /
RMSE measure how closely the sample follows the template's appearance under the sample's own
anatomy (and the error map holds the anatomy differences); against the reference they measure
fidelity only when MGM left the reference mask unchanged (held-out pair evaluation, the paper's Table 1).

Hand-written glue (target lookup, streamed statistics); the metrics are :mod:`fcas.metrics`.
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch

from fcas.evaluation.report import EvaluateSettings, new_figure, format_number, markdown_table, figure_png, mean_sd, write_report
from fcas.io import manifest, nifti, storage
from fcas.metrics.fid import VAEEncoderFeatures, fid, lpips, make_lpips
from fcas.metrics.image import rmse, ssim

__all__ = ["evaluate_synthesis", "evaluate_pairs"]


class _Streamed:
    """Pearson correlation and per-bin error sums of (confidence, error) pairs, streamed over samples."""

    def __init__(self, bins: int) -> None:
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        self.n = np.zeros(bins, np.int64)
        self.s1 = np.zeros(bins)
        self.s2 = np.zeros(bins)
        self.sums = np.zeros(6)   # n, sx, sy, sxx, syy, sxy

    def add(self, conf: np.ndarray, err: np.ndarray) -> None:
        x, y = conf.astype(np.float64), err.astype(np.float64)
        b = np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, len(self.n) - 1)
        self.n += np.bincount(b, minlength=len(self.n))
        self.s1 += np.bincount(b, y, minlength=len(self.n))
        self.s2 += np.bincount(b, y * y, minlength=len(self.n))
        self.sums += [x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]

    def merge(self, other: "_Streamed") -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        self.sums += other.sums

    def pearson(self) -> float:
        n, sx, sy, sxx, syy, sxy = self.sums
        vx, vy = n * sxx - sx * sx, n * syy - sy * sy
        return float((n * sxy - sx * sy) / math.sqrt(vx * vy)) if n > 1 and vx > 0 and vy > 0 else math.nan

    def bins(self) -> list[dict]:
        out = []
        for i, n in enumerate(self.n):
            mean = self.s1[i] / n if n else math.nan
            sd = math.sqrt(max(self.s2[i] / n - mean * mean, 0.0)) if n else math.nan
            out.append({"lo": round(float(self.edges[i]), 6), "hi": round(float(self.edges[i + 1]), 6), "n_voxels": int(n),
                        "mean_abs_error": mean, "sd_abs_error": sd})
        return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


def _plot_cm(points: tuple[np.ndarray, np.ndarray], binned: list[dict], pearson: float) -> bytes:
    fig = new_figure(10, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.scatter(points[0], points[1], s=2, alpha=0.15, lw=0)
    ax1.set_xlabel("SSV confidence")
    ax1.set_ylabel("|synth - target| (unit scale)")
    ax1.set_title(f"voxels (subsample {points[0].size}); Pearson {format_number(pearson, 3)}")
    ok = [b for b in binned if b["n_voxels"]]
    mid = [(b["lo"] + b["hi"]) / 2 for b in ok]
    ax2.errorbar(mid, [b["mean_abs_error"] for b in ok], yerr=[b["sd_abs_error"] for b in ok], marker="o", capsize=3)
    for m, b in zip(mid, ok):
        ax2.annotate(f"{b['n_voxels']}", (m, b["mean_abs_error"]), fontsize=6, xytext=(2, 4), textcoords="offset points")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("confidence bin")
    ax2.set_ylabel("mean |error| ± sd")
    ax2.set_title("error per confidence bin (voxel counts)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return figure_png(fig)


def _unit(hu: np.ndarray) -> np.ndarray:
    from fcas.diffusion.conditioning import hu_to_unit

    return hu_to_unit(hu).numpy()


class _Context:
    """What every sample's evaluation shares: settings, library, target cache, networks."""

    def __init__(self, s: EvaluateSettings, library: dict, lib_uri: str, features: VAEEncoderFeatures,
                 lp_net, device: str, points_per_sample: int) -> None:
        self.s, self.library, self.lib_uri, self.features = s, library, lib_uri, features
        self.lp_net, self.device, self.k = lp_net, device, points_per_sample
        self.key = "template_id" if s.target == "template" else "reference_id"
        self.target_image = lru_cache(maxsize=4)(self._read_target)

    def _read_target(self, case_id: str) -> np.ndarray:
        return _unit(nifti.read_nifti(self.library[case_id]["image_uri"]).array)


def _evaluate_sample(row: Mapping, ctx: _Context) -> dict:
    """One sample: ``{"record", "features" (F,), "streamed", "points"}`` or ``{"reject"}``."""
    s = ctx.s
    sid, tid = int(row["sample_id"]), row[ctx.key]
    try:
        if tid not in ctx.library:
            raise ValueError(f"{s.target} case {tid!r} is not in the library {ctx.lib_uri}")
        img = _unit(nifti.read_nifti(row["image_uri"]).array)
        tgt = ctx.target_image(tid)
        if img.shape != tgt.shape:
            raise ValueError(f"sample shape {img.shape} != {s.target} shape {tgt.shape}")
        lab = nifti.read_nifti(row["label_uri"]).array
        conf = np.asarray(nifti.read_nifti(row["confidence_uri"]).array, dtype=np.float32)
        if conf.shape != img.shape or lab.shape != img.shape:
            raise ValueError(f"label {lab.shape} / confidence {conf.shape} do not match the image {img.shape}")
    except (ValueError, OSError) as exc:   # NiftiError is a ValueError; a missing file an OSError
        return {"reject": {"sample_id": sid, "reason": str(exc)}}
    mask = lab > 0 if s.mask == "label" else None
    rec = {"sample_id": sid, "template_id": row["template_id"], "reference_id": row["reference_id"],
           "target_id": tid, "ssim": ssim(img, tgt, mask, win_size=s.ssim_win, device=ctx.device),
           "rmse": rmse(img, tgt, mask), "mask_voxels": int(mask.sum()) if mask is not None else int(img.size)}
    if ctx.lp_net is not None:
        rec["lpips"] = lpips(ctx.lp_net, img, tgt)
    region = (lab > 0) if s.cm_region == "mask" else np.ones(img.shape, bool)
    c, e = conf[region], np.abs(img - tgt)[region]
    streamed = _Streamed(s.cm_bins)
    streamed.add(c, e)
    pick = np.random.default_rng([s.seed, sid]).choice(c.size, size=min(ctx.k, c.size), replace=False)
    return {"record": rec, "features": ctx.features(torch.from_numpy(img)[None, None])[0],
            "streamed": streamed, "points": (c[pick], e[pick])}


def _library(s: EvaluateSettings) -> tuple[str, dict]:
    lib_uri = s.templates or storage.join(s.run, "templates", "cases.parquet")
    if not lib_uri.endswith(".parquet"):
        lib_uri = storage.join(lib_uri, "cases.parquet")
    if not storage.exists(lib_uri):
        raise ValueError(f"template library {lib_uri!r} does not exist; pass templates=<cases.parquet>")
    return lib_uri, {r["case_id"]: r for r in manifest.read_cases(lib_uri, schema=None).to_pylist()}


def _fid_block(s: EvaluateSettings, library: dict, features: VAEEncoderFeatures, synth_feats: list, pool) -> dict:
    real_ids = sorted(c for c, r in library.items() if s.fid_real is None or r.get("split") in s.fid_real)

    def encode(case_id: str) -> torch.Tensor:
        return features(torch.from_numpy(_unit(nifti.read_nifti(library[case_id]["image_uri"]).array))[None, None])[0]

    real_feats = dict(zip(real_ids, pool.map(encode, real_ids)))
    block: dict[str, Any] = {"features": features.description, "n_synth": len(synth_feats),
                             "n_real": len(real_feats), "real_splits": list(s.fid_real) if s.fid_real else "all"}
    if len(synth_feats) >= 2 and len(real_feats) >= 2:
        block["value"] = fid(torch.stack(synth_feats), torch.stack(list(real_feats.values())))
    else:
        block["value"] = None
        block["note"] = "FID needs at least 2 volumes per set"
    splits = sorted({str(library[c].get("split")) for c in real_ids})
    if len(splits) >= 2:
        a = [real_feats[c] for c in real_ids if str(library[c].get("split")) == splits[0]]
        b = [real_feats[c] for c in real_ids if str(library[c].get("split")) != splits[0]]
        if len(a) >= 2 and len(b) >= 2:
            block["real_vs_real"] = {"value": fid(torch.stack(a), torch.stack(b)),
                                     "sets": f"{splits[0]} ({len(a)}) vs the other splits ({len(b)})"}
    return block


def evaluate_synthesis(s: EvaluateSettings, features: VAEEncoderFeatures | None = None) -> dict:
    """Synthesis mode of ``jobs/evaluate.py``: SSIM / RMSE per sample, FID, confidence vs error; writes the report.

    Samples are evaluated by ``s.workers`` threads (NIfTI reads, gzip and torch release the GIL),
    in the order of their target so a target is read once; only per-sample figures, ``F`` features
    and a few voxels each are kept, so memory does not grow with the volume count.

    ``features``: the FID feature network (default :meth:`VAEEncoderFeatures.from_checkpoint` of
    ``s.fid_features``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from fcas.synthesis.outputs import read_run_manifest

    t0 = time.time()
    if s.run is None:
        raise ValueError("synthesis evaluation needs run=<synthesis run folder>")
    table = read_run_manifest(s.run)
    if table.num_rows == 0:
        raise ValueError(f"{s.run}: the synthesis run has no manifest rows")
    samples = sorted(table.to_pylist(), key=lambda r: r["sample_id"])[: s.max_samples]
    lib_uri, library = _library(s)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    features = features or VAEEncoderFeatures.from_checkpoint(s.fid_features, s.fid_layers, s.fid_resize, device)
    ctx = _Context(s, library, lib_uri, features, make_lpips(s.lpips_weights), device,
                   max(1, s.scatter_points // max(len(samples), 1)))
    streamed = _Streamed(s.cm_bins)
    per_sample, rejects, synth_feats, pts = [], [], [], ([], [])
    with ThreadPoolExecutor(max_workers=max(1, s.workers)) as pool:
        order = sorted(samples, key=lambda r: (str(r[ctx.key]), r["sample_id"]))
        for out in pool.map(lambda r: _evaluate_sample(r, ctx), order):
            if "reject" in out:
                rejects.append(out["reject"])
                continue
            per_sample.append(out["record"])
            synth_feats.append(out["features"])
            streamed.merge(out["streamed"])
            pts[0].append(out["points"][0])
            pts[1].append(out["points"][1])
        if not per_sample:
            raise ValueError(f"{s.run}: no sample could be evaluated; first reasons: {rejects[:3]}")
        fid_block = _fid_block(s, library, features, synth_feats, pool)
    per_sample.sort(key=lambda r: r["sample_id"])
    rejects.sort(key=lambda r: r["sample_id"])
    cx, ce = np.concatenate(pts[0]), np.concatenate(pts[1])
    ssim_m, ssim_sd, _ = mean_sd([r["ssim"] for r in per_sample])
    rmse_m, rmse_sd, _ = mean_sd([r["rmse"] for r in per_sample])
    summary = {
        "mode": "synthesis", "run": s.run, "templates": lib_uri, "target": s.target, "mask": s.mask,
        "n_samples": len(per_sample), "ssim_win": s.ssim_win,
        "ssim_mean": ssim_m, "ssim_sd": ssim_sd, "rmse_mean": rmse_m, "rmse_sd": rmse_sd,
        "rmse_unit": "unit intensity scale [0, 1] (x 2000 = HU)",
        "fid": fid_block,
        "lpips": ({"mean": mean_sd([r["lpips"] for r in per_sample])[0], "weights": s.lpips_weights}
                  if ctx.lp_net is not None else "not computed: no LPIPS backbone weights configured (lpips_weights)"),
        "confidence_vs_error": {"region": s.cm_region, "n_voxels": int(streamed.sums[0]),
                                "pearson": streamed.pearson(), "spearman_subsample": _spearman(cx, ce),
                                "subsample_voxels": int(cx.size), "bins": streamed.bins()},
        "per_sample": per_sample, "rejects": rejects, "seconds": round(time.time() - t0, 2),
    }
    plots = {"cm_vs_error.png": _plot_cm((cx, ce), summary["confidence_vs_error"]["bins"],
                                         summary["confidence_vs_error"]["pearson"])}
    return write_report(s, summary, plots, _synthesis_md(summary))


PATCH_GRID = 4   # sub-volumes per axis of the sub-volume FID


def evaluate_pairs(images, targets, masks=None, features: VAEEncoderFeatures | None = None,
                   win_size: int = 7) -> dict:
    """Image quality of in-memory pairs (e.g. held-out A@B pairs): SSIM / RMSE per pair and FID of the sets.

    Args:
        images: synthesized volumes, each ``(X, Y, Z)`` in [0, 1].
        targets: their targets, same shapes, same order.
        masks: boolean ``(X, Y, Z)`` per pair (SSIM / RMSE over its voxels) or ``None`` (whole volumes).
        features: the FID feature network; ``None`` skips FID.

    Returns:
        ``{"ssim": [..], "rmse": [..], "ssim_mean", "ssim_sd", "rmse_mean", "rmse_sd", "fid", "fid_patches",
        "features"}`` (``fid_patches``: over the 4^3 sub-volumes of every volume, :meth:`VAEEncoderFeatures.patches`).
    """
    images, targets = list(images), list(targets)
    masks = [None] * len(images) if masks is None else list(masks)
    if not images or len(images) != len(targets) or len(masks) != len(images):
        raise ValueError(f"need as many targets and masks as images, got {len(images)} / {len(targets)} / {len(masks)}")
    ss = [ssim(a, b, m, win_size=win_size) for a, b, m in zip(images, targets, masks)]
    rr = [rmse(a, b, m) for a, b, m in zip(images, targets, masks)]
    out = {"ssim": ss, "rmse": rr, "fid": None, "fid_patches": None, "features": None}
    out["ssim_mean"], out["ssim_sd"], _ = mean_sd(ss)
    out["rmse_mean"], out["rmse_sd"], _ = mean_sd(rr)
    if features is not None and len(images) >= 2:
        enc = lambda vols: torch.stack([features(torch.as_tensor(np.asarray(v), dtype=torch.float32)[None, None])[0]  # noqa: E731
                                        for v in vols])
        out["fid"], out["features"] = fid(enc(images), enc(targets)), features.description
        out["fid_patches"] = fid(patch_features(features, images), patch_features(features, targets))
    return out


def patch_features(features: VAEEncoderFeatures, vols, grid: int = PATCH_GRID):
    """The sub-volume feature rows of volumes ``(X, Y, Z)`` in [0, 1], all volumes stacked."""
    return torch.cat([features.patches(torch.as_tensor(np.asarray(v), dtype=torch.float32)[None, None], grid)
                      for v in vols])


def _synthesis_md(m: Mapping) -> list[str]:
    f, cm = m["fid"], m["confidence_vs_error"]
    mask = "the sample's label voxels (label > 0)" if m["mask"] == "label" else "the whole volume"
    head = [["samples", "SSIM", "RMSE", "FID", "LPIPS"],
            [[m["n_samples"], f"{format_number(m['ssim_mean'])} ± {format_number(m['ssim_sd'])}",
              f"{format_number(m['rmse_mean'])} ± {format_number(m['rmse_sd'])}", f["value"],
              format_number(m["lpips"]["mean"]) if isinstance(m["lpips"], dict) else "not computed"]]]
    out = ["# Synthesis image quality", "",
           f"Run `{m['run']}`, {m['n_samples']} samples against their **{m['target']}** image "
           f"(library `{m['templates']}`). SSIM (MONAI, Gaussian window {m['ssim_win']}) and RMSE in unit "
           f"intensity scale (HU clipped to [-1000, 1000] -> [0, 1]) over {mask}.", "",
           ("The template is not a ground truth: the sample's anatomy is a deformed reference mask, so these "
            "figures measure how closely samples follow their template, not fidelity." if m["target"] == "template"
            else "The reference image is the ground truth only where MGM left the reference mask unchanged."), "",
           markdown_table(*head), "",
           f"**FID feature network:** {f['features']}. Synthesized set {f['n_synth']} volumes vs real set "
           f"{f['n_real']} library cases (splits: {f['real_splits']}). These FIDs are not comparable with the "
           "paper's (other features, tiny sets).", ""]
    if "real_vs_real" in f:
        out += [f"Real-vs-real FID at these set sizes ({f['real_vs_real']['sets']}): "
                f"{format_number(f['real_vs_real']['value'])} (the floor the synthesized set is measured against).", ""]
    if not isinstance(m["lpips"], dict):
        out += [f"LPIPS: {m['lpips']}.", ""]
    out += ["## Confidence vs error", "",
            f"Per voxel |synth - {m['target']}| against the SSV confidence over {cm['region']} voxels "
            f"({cm['n_voxels']}): Pearson {format_number(cm['pearson'])} (every voxel of the region), Spearman {format_number(cm['spearman_subsample'])} "
            f"(subsample of {cm['subsample_voxels']}). Negative = low confidence where the errors are.", "",
            markdown_table(["confidence", "voxels", "mean abs error", "sd"],
                      [[f"[{b['lo']:.2f}, {b['hi']:.2f})", b["n_voxels"], b["mean_abs_error"], b["sd_abs_error"]]
                       for b in cm["bins"]]), "", "![confidence vs error](cm_vs_error.png)", "", "## Per sample", "",
            markdown_table(["sample", "template", "reference", "SSIM", "RMSE", "mask voxels"],
                      [[r["sample_id"], r["template_id"], r["reference_id"], r["ssim"], r["rmse"], r["mask_voxels"]]
                       for r in m["per_sample"]])]
    if m["rejects"]:
        out += ["", "Samples not evaluated:", ""] + [f"- {r['sample_id']}: {r['reason']}" for r in m["rejects"]]
    return out


