"""The report of the reproduction: ``docs/results.md`` (tables as mean ± sd over seeds, the mechanical verdicts,
limits, configuration, stage timings) and its PNG plots, from the stages' cached results."""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, replace
from typing import Any, Mapping

import numpy as np
import torch

from fcas.evaluation.report import json_safe
from fcas.io import storage
from fcas.reproduction.settings import ARMS, ReproduceSettings
from fcas.reproduction.stages import mean_sd

__all__ = ["render_results", "verdict", "plus_minus"]


def plus_minus(m: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def verdict(better: float, worse: float, sd_b: float, sd_w: float, higher_is_better: bool = True,
            n_seeds: int = 2) -> str:
    """The mechanical reading of one direction: reproduced only when the difference of the means exceeds the
    larger seed sd; with one seed there is no spread, so only the sign is reported."""
    d = (better - worse) if higher_is_better else (worse - better)
    if not (math.isfinite(d) and math.isfinite(sd_b) and math.isfinite(sd_w)):
        return "not measurable"
    if n_seeds < 2:
        return (f"{'the same' if d > 0 else 'the opposite'} sign on one seed ({d:+.3f}); no verdict without a "
                "spread over seeds")
    spread = max(sd_b, sd_w)
    if d > spread:
        return "reproduced (difference larger than the seed spread)"
    if d > 0:
        return "same direction, within the seed spread (not conclusive)"
    if -d > spread:
        return "NOT reproduced (the opposite, beyond the seed spread)"
    return "not reproduced (opposite sign, within the seed spread)"


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _seg_stats(stages: Mapping[str, dict], arm: str, seeds, coronary: str) -> dict:
    evs = [stages[f"seg_{arm}_seed{k}"]["result"]["eval"] for k in seeds]
    pc = lambda e, n, key: (e["per_class"].get(n) or {}).get(key)  # noqa: E731
    names = list(evs[0]["per_class"])
    subs = [n for n in names if n != coronary]
    out = {"mean_dice": mean_sd([e["mean_dice"] for e in evs]), "mean_rdice": mean_sd([e["mean_rdice"] for e in evs]),
           "sub_dice": mean_sd([float(np.nanmean([_num(pc(e, n, "dice_mean")) for n in subs])) for e in evs]),
           "cor_dice": mean_sd([pc(e, coronary, "dice_mean") for e in evs]),
           "cor_rdice": mean_sd([pc(e, coronary, "rdice_mean") for e in evs]),
           "per_class": {n: (mean_sd([pc(e, n, "dice_mean") for e in evs]), mean_sd([pc(e, n, "rdice_mean") for e in evs]))
                         for n in names}}
    return out


def _png(fig) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_table1(t1: dict) -> bytes:
    from matplotlib.figure import Figure

    panels = [("ssim", "SSIM (higher better)"), ("rmse", "RMSE (lower better)"),
              ("fid", "FID, VAE-encoder features (lower better)")]
    if "fid_patches" in t1["template"]:
        panels.append(("fid_patches", "sub-volume FID (lower better)"))
    fig = Figure(figsize=(3.4 * len(panels), 3.2), dpi=100, layout="tight")
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for x, m in enumerate(("template", "mask_only")):
            vals = np.asarray([np.nan if v is None else v for v in t1[m][key]], dtype=float)
            ax.bar(x, np.nanmean(vals), yerr=np.nanstd(vals, ddof=1) if len(vals) > 1 else 0, capsize=4,
                   color=("tab:blue", "tab:orange")[x])
            ax.plot([x] * len(vals), vals, "k.", ms=4)
        ax.set_xticks([0, 1], ["template-guided", "mask-only"])
        ax.set_title(label, fontsize=9)
    return _png(fig)


def _plot_seg(s: ReproduceSettings, seg: dict, stages: Mapping[str, dict]) -> dict[str, bytes]:
    from matplotlib.figure import Figure

    names = list(seg["real_only"]["per_class"])
    fig = Figure(figsize=(11, 3.6), dpi=100, layout="tight")
    ax = fig.add_subplot(1, 1, 1)
    w = 0.27
    for j, arm in enumerate(ARMS):
        m = [seg[arm]["per_class"][n][0][0] for n in names]
        sd = [seg[arm]["per_class"][n][0][1] for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * w, m, w, yerr=sd, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("Dice (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    plots = {"dice_per_class.png": _png(fig)}
    fig = Figure(figsize=(10, 3.2), dpi=100, layout="tight")
    for j, arm in enumerate(ARMS):
        ax = fig.add_subplot(1, 3, j + 1)
        for seed in s.seeds:
            c = stages[f"seg_{arm}_seed{seed}"]["result"]["curve"]
            ax.plot([r["step"] for r in c], [r["loss"] for r in c], lw=0.8, label=f"seed {seed}")
        if arm != "real_only":
            ax.axvline(s.pretrain_steps + 0.5, color="k", lw=0.6, ls="--")
        ax.set_title(f"{arm} (loss per step)", fontsize=9)
        if s.val_every:
            ax2 = ax.twinx()
            for seed in s.seeds:
                v = stages[f"seg_{arm}_seed{seed}"]["result"].get("val_curve") or []
                ax2.plot([r["step"] for r in v], [r["val_dice"] for r in v], "o-", ms=2, lw=1.2)
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("validation mean Dice (dots)", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    plots["learning_curves.png"] = _png(fig)
    return plots


def _table1_md(s: ReproduceSettings, stages: Mapping[str, dict], rel: str) -> tuple[list[str], dict, list[str]]:
    L = ["## Table 1 direction: template-guided vs mask-only TCDM (held-out pairs)", ""]
    if not all(f"table1_seed{k}" in stages for k in s.seeds):
        return L + ["Not run in this invocation (`stop_after`); no figures.", ""], {}, []
    t1r = [stages[f"table1_seed{k}"]["result"] for k in s.seeds]
    t1 = {m: {k: [r[m][f"{k}_mean" if k != "fid" else "fid"] for r in t1r] for k in ("ssim", "rmse", "fid")}
          for m in ("template", "mask_only")}
    patches = all(r[m].get("fid_patches") is not None for r in t1r for m in ("template", "mask_only"))
    if patches:
        for m in t1:
            t1[m]["fid_patches"] = [r[m]["fid_patches"] for r in t1r]
    floor = mean_sd([r["fid_floor"] for r in t1r])
    sps = mean_sd([r[m]["seconds_per_sample"] for r in t1r for m in ("template", "mask_only")])
    pairing = (f"(A, B): B the next phantom of A's site (sites of {s.site_size} consecutive seeds sharing HU table and "
               "surroundings, as scans of one hospital do; `fcas.phantom.sites`)" if s.site_size else
               f"(A, B) = (i, i+1 mod {s.n_test})")
    L += [f"{s.pairs} held-out pairs {pairing} of the test phantoms ({s.test_source}), direction "
          f"B@A, DDIM {s.table1_steps} steps ({sps[0]:.1f} s per sample here); the seed changes the initial noise, both "
          "models get the same noise. SSIM and RMSE on the [0, 1] scale (HU/2000) against the true I_A \"under the same "
          "mask\" as the paper computes them: over the cardiac voxels of M_A (the SSIM window still sees their "
          "neighbourhood); the whole-volume figures are in the second table (A's surroundings, which neither model "
          "is given, dominate them). FID between the sampled set and the true I_A set on features of the project's own VAE encoder "
          f"(no external weights): {t1r[0]['features']}. FID on {s.pairs} volumes is a small-sample figure; the "
          f"real-vs-real floor (the same targets against {s.pairs} other real phantoms) is {plus_minus(*floor[:2], 2)}. "
          + (f"Sub-volume FID: the same features pooled over each of the 4x4x4 sub-volumes of every volume "
             f"({s.pairs * 64} rows per set, more than the features; `fcas.metrics.fid`), which a set of {s.pairs} "
             "volumes can estimate; its real-vs-real floor is "
             f"{plus_minus(*mean_sd([r['fid_patches_floor'] for r in t1r])[:2], 2)}. " if patches else "")
          + f"Checkpoints: `{s.checkpoint}` and `{s.mask_only_checkpoint}` (trained with the same budget). "
          "LPIPS is not reported (no backbone weights on this machine).", "",
          "| model | SSIM ↑ | RMSE ↓ | FID ↓ |" + (" sub-volume FID ↓ |" if patches else ""),
          "|---|---|---|---|" + ("---|" if patches else "")]
    for m, label in (("template", "template-guided (FCaS)"), ("mask_only", "mask-only (ablation)")):
        L.append(f"| {label} | {plus_minus(*mean_sd(t1[m]['ssim'])[:2])} | {plus_minus(*mean_sd(t1[m]['rmse'])[:2])} | "
                 f"{plus_minus(*mean_sd(t1[m]['fid'])[:2], 2)} |"
                 + (f" {plus_minus(*mean_sd(t1[m]['fid_patches'])[:2], 2)} |" if patches else ""))
    recon = [r.get("vae_reconstruction") for r in t1r]
    if all(recon):
        vs, vr = mean_sd([r["ssim_mean"] for r in recon]), mean_sd([r["rmse_mean"] for r in recon])
        ts = mean_sd(t1["template"]["ssim"])
        L.append(f"| VAE reconstruction of I_A (the ceiling) | {plus_minus(*vs[:2])} | {plus_minus(*vr[:2])} | – |"
                 + (" – |" if patches else ""))
        L += ["", f"Gap of the template-guided samples to the VAE's own reconstruction: SSIM {vs[0] - ts[0]:+.3f} "
              "(reconstruction minus sample)."]
    if all("ssim_mean_whole" in r["template"] for r in t1r):
        L += ["", "Over the whole volume:", "", "| model | SSIM ↑ | RMSE ↓ |", "|---|---|---|"]
        for m, label in (("template", "template-guided (FCaS)"), ("mask_only", "mask-only (ablation)")):
            L.append(f"| {label} | {plus_minus(*mean_sd([r[m]['ssim_mean_whole'] for r in t1r])[:2])} | "
                     f"{plus_minus(*mean_sd([r[m]['rmse_mean_whole'] for r in t1r])[:2])} |")
        if all(r and "ssim_mean_whole" in r for r in recon):
            L.append(f"| VAE reconstruction of I_A | {plus_minus(*mean_sd([r['ssim_mean_whole'] for r in recon])[:2])} | "
                     f"{plus_minus(*mean_sd([r['rmse_mean_whole'] for r in recon])[:2])} |")
    if all("ssim_zeroed_mean" in r["template"] for r in t1r) and all(r and r.get("ssim_zeroed_mean") for r in recon):
        zs = {m: mean_sd([r[m]["ssim_zeroed_mean"] for r in t1r]) for m in ("template", "mask_only")}
        zv = mean_sd([r["ssim_zeroed_mean"] for r in recon])
        L += ["", "The other reading of \"under the same mask\": both images set to 0 outside M_A, then SSIM over M_A's "
              "voxels, so A's surroundings enter neither image (the shared zero border also lifts every figure):", "",
              "| model | SSIM ↑ |", "|---|---|",
              f"| template-guided (FCaS) | {plus_minus(*zs['template'][:2])} |",
              f"| mask-only (ablation) | {plus_minus(*zs['mask_only'][:2])} |",
              f"| VAE reconstruction of I_A (the ceiling) | {plus_minus(*zv[:2])} |", "",
              f"Gap of the template-guided samples to the VAE's own reconstruction in this reading: SSIM "
              f"{zv[0] - zs['template'][0]:+.3f}."]
    if "table1_oracles" in stages:
        L += [""] + _oracles_md(stages["table1_oracles"]["result"], s)
    L += ["", "Per seed (template / mask-only): " + "; ".join(
        f"seed {r['seed']}: SSIM {r['template']['ssim_mean']:.3f} / {r['mask_only']['ssim_mean']:.3f}, "
        f"RMSE {r['template']['rmse_mean']:.3f} / {r['mask_only']['rmse_mean']:.3f}" for r in t1r) + ".",
          "", f"![Table 1]({rel}/table1.png)", ""]
    tm = {k: mean_sd(t1["template"][k]) for k in t1["template"]}
    mm = {k: mean_sd(t1["mask_only"][k]) for k in t1["mask_only"]}
    V = [f"- Table 1, SSIM template > mask-only: {verdict(tm['ssim'][0], mm['ssim'][0], tm['ssim'][1], mm['ssim'][1], n_seeds=len(s.seeds))}.",
         f"- Table 1, RMSE template < mask-only: {verdict(tm['rmse'][0], mm['rmse'][0], tm['rmse'][1], mm['rmse'][1], False, n_seeds=len(s.seeds))}.",
         f"- Table 1, FID template < mask-only: {verdict(tm['fid'][0], mm['fid'][0], tm['fid'][1], mm['fid'][1], False, n_seeds=len(s.seeds))}."]
    if patches:
        V.append(f"- Table 1, sub-volume FID template < mask-only: {verdict(tm['fid_patches'][0], mm['fid_patches'][0], tm['fid_patches'][1], mm['fid_patches'][1], False, n_seeds=len(s.seeds))}.")
    return L, {"table1.png": _plot_table1(t1)}, V


def _region_ceiling(t: Mapping[str, str]) -> str:
    """The under-the-mask score of an exact heart in unknown surroundings (oracles of later runs only)."""
    if "A_heart_in_mean_region" not in t:
        return ""
    return (f" Under the mask, even I_A's exact heart (its own noise included) scores {t['A_heart_in_mean_region']} "
            f"when the population mean stands outside it ({t['A_heart_in_B_region']} with I_B's surroundings): the "
            "SSIM window of a voxel near the heart's border sees A's surroundings, which M_A does not describe, so the "
            "VAE's reconstruction of I_A, which is given them, is a ceiling that a sample, not told them, cannot be "
            "expected to reach in this reading.")


def _oracles_md(o: Mapping[str, Any], s: ReproduceSettings) -> list[str]:
    """What a template can tell about I_A on these phantoms, without any model (template_oracles)."""
    t = {k: plus_minus(v["mean"], v["sd"]) for k, v in o["table"].items()}
    return ["**What the template can carry here** (model-free oracles on the same "
            f"{o['pairs']} test pairs, `fcas/evaluation/template_oracles.py`, `benchmarks/template_information.py`): "
            f"I_A re-rendered with B's HU table scores SSIM {t['own_hu_of_B']} against I_A under the mask (its own "
            f"noise-free image {t['noise_free']}, noise-free with B's table {t['noise_free_hu_B']}), so B's intensities "
            f"can move the masked SSIM by at most {o['hu_table_effect']:.3f}; over the whole volume, I_A's heart pasted "
            f"into I_B scores {t['A_heart_in_B']} and into the mean of {s.oracle_mean_n} other phantoms "
            f"{t['A_heart_in_mean']} (I_B alone {t['B_image']}): copying the template's surroundings is "
            f"{'worse' if o['surroundings_copy_minus_mean'] < 0 else 'better'} than the population mean a mask-only "
            "model can learn." + _region_ceiling(t) + " " + _sites_md(s), ""]


def _sites_md(s: ReproduceSettings) -> str:
    if s.site_size:
        return (f"The test phantoms come in sites of {s.site_size} (`fcas.phantom.sites`): A and B share their site's HU "
                "table, noise, kernel and chest (body outline, spine, ribs, diaphragm) up to 30 % of the population's "
                "spread, as scans of one hospital share scanner, protocol and patient position, while each keeps its "
                "own heart. That shared context is what the template can carry and M_A cannot; it shows over the whole "
                "volume more than under the mask, where the heart's own border dominates the SSIM window.")
    return ("Phantom cases are drawn independently here, so the template carries almost nothing about I_A that M_A "
            "does not: the direction of Table 1 cannot show on them, whatever the models (set `site_size` to draw "
            "the pairs from sites).")


def _seg_md(s: ReproduceSettings, stages: Mapping[str, dict], rel: str, coronary: str) -> tuple[list[str], dict, list[str]]:
    h3 = ["## Table 3 direction: real only vs synthetic pretraining + fine-tuning", ""]
    h4 = ["## Table 4 direction: plain loss vs CAL pretraining (equal budget)", ""]
    done = tuple(k for k in s.seeds if all(f"seg_{a}_seed{k}" in stages for a in ARMS))
    if "synthesis" not in stages or not done:
        na = ["Not run in this invocation (`stop_after`, or still running); no figures.", ""]
        return h3 + na + h4 + na, {}, []
    partial = []
    if len(done) < len(s.seeds):   # a report written while the run goes on: the seeds whose every arm finished
        partial = [f"> **Partial**: seed(s) {list(done)} of {list(s.seeds)} have finished every arm; Tables 3 and 4 "
                   "show those only (rerun `make reproduce`: it resumes the rest).", ""]
        s = replace(s, seeds=done)
    seg = {arm: _seg_stats(stages, arm, s.seeds, coronary) for arm in ARMS}
    syn = stages["synthesis"]["result"]
    n_syn = syn.get("n_written")
    aug = ("MONAI augmentation (affine, intensity, noise; no flips: a mirrored heart swaps left and right classes)"
           if s.augment.get("enabled", True) else "no augmentation")
    L = h3 + partial + [
        f"Segmentation net: MONAI DynUNet {dict(s.segnet) or '(default)'}, batch {s.batch_size}"
        f"{f' of random {s.crop} crops (inference: sliding window of that size)' if s.crop else ''}, {aug}, AdamW. "
        + (_stopping_md(s, stages) if s.val_every else
           f"**Real only**: the {s.n_train} real (phantom) cases, {s.pretrain_steps + s.finetune_steps} steps from scratch "
           f"at lr {s.lr} (as many gradient steps as the pretrained arms). **Real + Syn**: pretrained {s.pretrain_steps} "
           f"steps on the {n_syn} synthetic samples with the CAL loss (Eq. 9), then fine-tuned {s.finetune_steps} steps on "
           f"the same {s.n_train} cases at lr {s.finetune_lr}. ")
        + f"Test: {s.n_test} held-out phantoms ({s.seg_test_source}). " + _domain_md(s)
        + f"Substructures = the 7 non-coronary cardiac classes; RDice radius {s.rdice_radius} voxels.", "",
        "| training | Dice substructures ↑ | Dice coronary ↑ | mean Dice (8 classes) ↑ | mean RDice ↑ | RDice coronary ↑ |",
        "|---|---|---|---|---|---|"]
    for arm, label in (("real_only", f"Real {s.n_train}"), ("cal", f"Real {s.n_train} + Syn {n_syn} (CAL)")):
        g = seg[arm]
        L.append(f"| {label} | {plus_minus(*g['sub_dice'][:2])} | {plus_minus(*g['cor_dice'][:2])} | {plus_minus(*g['mean_dice'][:2])} | "
                 f"{plus_minus(*g['mean_rdice'][:2])} | {plus_minus(*g['cor_rdice'][:2])} |")
    L += ["", "Per class (Dice / RDice, mean ± sd over seeds):", "",
          "| class | " + " | ".join(f"{a} Dice | {a} RDice" for a in ARMS) + " |", "|---" * (1 + 2 * len(ARMS)) + "|"]
    for n in seg["real_only"]["per_class"]:
        L.append(f"| {n} | " + " | ".join(f"{plus_minus(*seg[a]['per_class'][n][0][:2])} | {plus_minus(*seg[a]['per_class'][n][1][:2])}"
                                          for a in ARMS) + " |")
    L += ["", f"![Dice per class]({rel}/dice_per_class.png)", "", f"![Learning curves]({rel}/learning_curves.png)", ""]
    L += h4 + [
        f"Both pretrained {s.pretrain_steps} steps on the same synthetic run with the same seed, batches and "
        f"augmentation, then fine-tuned identically ({s.finetune_steps} steps); only the pretraining loss differs "
        "(CM-weighted cross-entropy + soft Dice vs unweighted).", "",
        "| pretraining loss | mean Dice ↑ | Dice coronary ↑ | mean RDice ↑ | RDice coronary ↑ |", "|---|---|---|---|---|"]
    for arm, label in (("plain", "plain (Eq. 8)"), ("cal", "CAL (Eq. 9)")):
        g = seg[arm]
        L.append(f"| {label} | {plus_minus(*g['mean_dice'][:2])} | {plus_minus(*g['cor_dice'][:2])} | {plus_minus(*g['mean_rdice'][:2])} | "
                 f"{plus_minus(*g['cor_rdice'][:2])} |")
    L.append("")
    c, r, p = seg["cal"], seg["real_only"], seg["plain"]
    V = [f"- Table 3, coronary Dice real+syn > real only: {verdict(c['cor_dice'][0], r['cor_dice'][0], c['cor_dice'][1], r['cor_dice'][1], n_seeds=len(s.seeds))}.",
         f"- Table 3, substructure Dice real+syn > real only: {verdict(c['sub_dice'][0], r['sub_dice'][0], c['sub_dice'][1], r['sub_dice'][1], n_seeds=len(s.seeds))}.",
         f"- Table 4, mean Dice CAL > plain: {verdict(c['mean_dice'][0], p['mean_dice'][0], c['mean_dice'][1], p['mean_dice'][1], n_seeds=len(s.seeds))}.",
         f"- Table 4, coronary Dice CAL > plain: {verdict(c['cor_dice'][0], p['cor_dice'][0], c['cor_dice'][1], p['cor_dice'][1], n_seeds=len(s.seeds))}."]
    return L, _plot_seg(s, seg, stages), V


def _domain_md(s: ReproduceSettings) -> str:
    if s.real_domain == "standard":
        return ""
    return (f"The real train, validation and test cases are `{s.real_domain}` phantoms (`fcas.phantom`: a late, weak "
            "contrast bolus, 2.8x the noise and a softer kernel), another scanner and protocol than the standard "
            "phantoms of the template library the synthetic images follow: as in the paper's Table 2, the synthetic "
            "data come from one data set and the net is fine-tuned and tested on another. ")


def _stopping_md(s: ReproduceSettings, stages: Mapping[str, dict]) -> str:
    """The convergence criterion and where each arm stopped (early stopping on the validation split)."""
    where = []
    for arm in ARMS:
        steps = [stages[f"seg_{arm}_seed{k}"]["result"].get("best_step") for k in s.seeds]
        where.append(f"{arm} {', '.join('–' if v is None else str(v) for v in steps)}")
    return (f"**Convergence criterion**: every arm fine-tunes on the {s.n_train} real (phantom) cases until the mean "
            f"Dice on {s.n_val} validation phantoms ({s.val_source}), checked every {s.val_every} steps, has not "
            f"improved for {s.patience} checks (at most {s.finetune_steps} fine-tuning steps); the checkpoint with the "
            f"best validation Dice is the one tested. **Real only** starts from scratch at lr {s.lr}; **Real + Syn** "
            f"is first pretrained {s.pretrain_steps} steps on the synthetic samples (CAL loss, Eq. 9, or the plain "
            f"loss for Table 4), then fine-tuned at lr {s.finetune_lr}. Best checkpoint step per seed: "
            + "; ".join(where) + ". ")


def _convergence_note(s: ReproduceSettings, stages: Mapping[str, dict]) -> list[str]:
    """A Limits line saying how far from converged the real-only arm still was (from its loss curve)."""
    curves = [stages[f"seg_real_only_seed{k}"]["result"]["curve"] for k in s.seeds
              if f"seg_real_only_seed{k}" in stages]
    if s.val_every:
        return []
    if not curves or min(len(c) for c in curves) < 20:
        return []
    k = max(5, min(len(c) for c in curves) // 10)
    drops = [1.0 - np.mean([r["loss"] for r in c[-k:]]) / np.mean([r["loss"] for r in c[-2 * k:-k]]) for c in curves]
    return [f"- The segmentation arms are short of convergence at this budget: the real-only loss still fell "
            f"{100 * float(np.mean(drops)):.0f} % (mean over seeds) from its second-last {k} steps to its last {k}. "
            "The Table 3 and 4 verdicts are about this budget, not about converged networks."]


def _loadavg() -> tuple[float, ...]:
    import os

    try:
        return os.getloadavg()
    except OSError:
        return (math.nan,) * 3


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def render_results(s: ReproduceSettings, stages: Mapping[str, dict], config: Mapping[str, Any]) -> str:
    """Write ``s.results`` (markdown) and the PNGs under ``s.plots``; returns the results URI.
    Sections whose stages did not run (``stop_after``) say so instead of showing figures."""
    from fcas.labels import load_schema

    coronary = load_schema(s.schema).names.get(8, "coronary arteries")
    rel = s.plots.rstrip("/").rsplit("/", 1)[-1]
    L1, P1, V1 = _table1_md(s, stages, rel)
    L2, P2, V2 = _seg_md(s, stages, rel, coronary)
    storage.makedirs(s.plots)
    for name, data in {**P1, **P2}.items():
        storage.atomic_write_bytes(storage.join(s.plots, name), data)
    smoke = s.scale != "full"
    L: list[str] = ["# Miniature reproduction on phantoms (`make reproduce`)", ""]
    if smoke:
        L += [f"> **SMOKE SCALE** (`scale={s.scale}`): a few steps and samples to check that every stage runs. "
              "These numbers are NOT the reproduction; run `make reproduce` (scale=full) for that.", ""]
    if s.stop_after:
        L += [f"> **Partial run** (`stop_after={s.stop_after}`): only the stages up to {s.stop_after} ran.", ""]
    L += [f"Generated by `jobs/reproduce.py scale={s.scale}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
          f"({platform.machine()}, torch {torch.__version__}, {s.threads} threads). Preset `{s.preset}` "
          f"({'x'.join(map(str, s.shape))} @ {s.spacing[0]} mm); seeds {list(s.seeds)}; every figure is mean ± sd "
          f"(sample sd, ddof=1) over the seeds. Phantoms stand in for CT: the claims tested are the *directions* of the "
          "paper's tables, not their values.", ""]
    L += L1 + L2
    L += ["## Reading", "",
          "Verdicts are mechanical: a direction counts as reproduced only when the difference of the means exceeds "
          "the larger seed sd.", "", *(V1 + V2 or ["- nothing to read: no table ran."]), ""]
    if smoke:
        L += ["At smoke scale the nets train for a handful of steps: the verdicts above say nothing about the paper.", ""]
    L += ["## Limits of this miniature", "",
          "- Phantoms, not CT: appearance is simple, so absolute SSIM / Dice mean little; only directions are compared.",
          "- One synthesis run is shared by every seed; the seeds vary the Table 1 noise and the segmentation "
          "training (initialisation, batches, augmentation), not the synthetic set.",
          "- The template library is phantoms the demo TCDM was trained on (the paper draws templates from its own "
          "data set); the real train/test phantoms use seeds the TCDM never saw.",
          "- FID uses the project's own VAE encoder on a few volumes (the real-vs-real floor is given beside it); "
          "LPIPS is not computed (no backbone weights).",
          ("- Every arm trains to the early-stopping criterion above; the maximum step count caps it."
           if s.val_every else
           "- Real-only training gets as many gradient steps as pretraining + fine-tuning, not a convergence criterion."),
          *_convergence_note(s, stages), ""]
    syn = stages.get("synthesis", {}).get("result", {})
    L += ["## Configuration", "",
          f"- Synthesis: {syn.get('n_written', 'not run')} samples (`{s.checkpoint}`, DDIM {s.syn_steps} steps, SSV "
          f"{s.ssv_mode} mode every {s.ssv_every} steps from step {int(s.ssv_start * s.syn_steps)}, run seed {s.syn_seed}, template library phantom:{s.library_n} = the "
          "demo TCDM's own training phantoms 0..N-1, split 25 % template / 75 % reference); one run shared by every seed.",
          f"- Real (phantom) data: segmentation train {s.train_source}, test {s.seg_test_source}"
          f"{f', validation {s.val_source}' if s.val_source else ''}; Table 1 pairs {s.test_source} (phantom seeds the "
          "TCDM never saw).",
          "", "```", *(f"{k}: {json.dumps(json_safe(v))}" for k, v in (config or asdict(s)).items()), "```", "",
          "## Stage timings", "",
          "Wall seconds of each stage when it ran (a cached stage keeps the figure of the run that made it). "
          "Load average of the machine when this report was written (1/5/15 min): "
          + " / ".join(f"{v:.1f}" for v in _loadavg()) + " on " + str(_cpus()) + " CPUs.", "",
          "| stage | seconds |", "|---|---|"]
    for name, rec in stages.items():
        L.append(f"| {name} | {rec['seconds']:.1f} |")
    L.append(f"| **total** (cached stages at the cost of the run that made them) | "
             f"{sum(r['seconds'] for r in stages.values()):.1f} |")
    if "/" in s.results:
        storage.makedirs(s.results.rsplit("/", 1)[0])
    storage.atomic_write_bytes(s.results, ("\n".join(L) + "\n").encode())
    return s.results
