"""Evaluation reports: segmentation (Dice / RDice) and synthesis image quality (SSIM / RMSE / FID /
confidence vs error). Ray-free; the Hydra entry point is ``jobs/evaluate.py``.

Each mode writes, under ``out`` (any fsspec URI, every file atomically):

* ``metrics.json`` -- every figure of the report (NaN written as ``null``);
* ``report.md`` -- markdown tables and the plots below, with the feature network of the FID named;
* PNG plots -- ``dice_per_class.png`` (segmentation), ``cm_vs_error.png`` (synthesis),
  ``learning_curve.png`` when a training metrics file is given (``learning_curve``).

Segmentation (:func:`evaluate_segmentation`, :func:`run_segmentation`): predictions (arrays or
label NIfTI URIs) against ground truth by case id. Ground truth is a prepared ``cases.parquet``
(``label_uri`` per ``case_id``, optionally filtered by ``splits``) or a folder of label NIfTIs
(case id = file name without ``.nii[.gz]`` and without ``label_suffix``). Predictions come from a
folder (``pred``; file ``pred_pattern.format(case_id=...)``) or from a predictor callable
``predictor(image_hu (X, Y, Z)) -> labels (X, Y, Z)`` run on the cases' images. A ``checkpoint``
is turned into a predictor by ``fcas.cal.load_predictor(checkpoint)`` once that module provides it.
Per class: Dice and RDice (:mod:`fcas.metrics.segmentation`; a class absent from both maps is NaN
and skipped). Per-class figures are means over the cases where they are defined; ``mean_dice`` is
the mean of the per-class means.

Synthesis (:func:`evaluate_synthesis`): every sample of a synthesis run (its manifest) against its
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

Hand-written module (report plumbing, file matching, streamed statistics); the metrics are in
:mod:`fcas.metrics`, plots use matplotlib's ``Figure`` (Agg canvas, no pyplot state).
"""
from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fcas.io import manifest, nifti, storage
from fcas.labels import LabelSchema, load_schema
from fcas.metrics.fid import VAEEncoderFeatures, fid, lpips, make_lpips
from fcas.metrics.image import rmse, ssim
from fcas.metrics.segmentation import dice_per_class, mean_score, rdice_per_class

log = logging.getLogger(__name__)

__all__ = [
    "EvaluateSettings", "settings_from_dict", "run_evaluation",
    "evaluate_segmentation", "segmentation_summary", "match_predictions", "run_segmentation",
    "evaluate_synthesis", "read_learning_curve", "write_report",
]

MODES = ("segmentation", "synthesis")
NIFTI_EXT = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class EvaluateSettings:
    mode: str = "segmentation"
    out: str = "outputs/evaluate"
    schema: str = "cardiac"
    learning_curve: str | None = None      # step,loss file (JSON lines / CSV / JSON / history.pt)
    # segmentation
    data: str | None = None                # cases.parquet (or its folder) or a folder of label NIfTIs
    pred: str | None = None                # folder of predicted label NIfTIs
    checkpoint: str | None = None          # seg net (needs fcas.cal.load_predictor)
    splits: tuple[str, ...] | None = None  # cases.parquet splits to evaluate (None: all rows)
    pred_pattern: str = "{case_id}.nii.gz"
    label_suffix: str = "_label"
    classes: str = "cardiac"               # cardiac | all
    rdice_radius: int = 3
    # synthesis
    run: str | None = None
    templates: str | None = None           # default <run>/templates/cases.parquet
    target: str = "template"               # template | reference
    mask: str = "label"                    # label | all
    ssim_win: int = 7
    fid_features: str = "checkpoints/demo"
    fid_layers: tuple[int, ...] | None = None
    fid_resize: tuple[int, int, int] | None = None
    fid_real: tuple[str, ...] | None = None   # library splits forming the real set (None: every case)
    lpips_weights: str | None = None
    cm_region: str = "all"                 # all | mask
    cm_bins: int = 10
    scatter_points: int = 20000
    max_samples: int | None = None
    seed: int = 0
    device: str = "cpu"                    # cpu | cuda | auto: where SSIM and the FID encoder run

    def __post_init__(self) -> None:
        checks = {"mode": (self.mode, MODES), "classes": (self.classes, ("cardiac", "all")),
                  "target": (self.target, ("template", "reference")), "mask": (self.mask, ("label", "all")),
                  "cm_region": (self.cm_region, ("all", "mask"))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if self.rdice_radius < 0:
            raise ValueError(f"rdice_radius must be >= 0 voxels, got {self.rdice_radius}")
        if self.cm_bins < 1:
            raise ValueError(f"cm_bins must be >= 1, got {self.cm_bins}")


def settings_from_dict(d: Mapping[str, Any]) -> EvaluateSettings:
    """Plain dict (a resolved Hydra config) -> settings; unknown keys are refused, ``hydra`` ignored."""
    names = {f.name for f in fields(EvaluateSettings)}
    d = {k: v for k, v in d.items() if k != "hydra"}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown evaluate settings {unknown}; known: {sorted(names)}")
    tuples = ("splits", "fid_layers", "fid_resize", "fid_real")
    d = {k: (tuple(v) if k in tuples and v is not None and not isinstance(v, str) else v) for k, v in d.items()}
    for k in ("splits", "fid_real"):
        if isinstance(d.get(k), str):
            d[k] = (d[k],)
    return EvaluateSettings(**d)


# ---- small helpers --------------------------------------------------------------------------
def _clean(x):
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std()), int(v.size)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(w: float = 6.5, h: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="tight")


def _load_labels(x, what: str) -> np.ndarray:
    if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
        return nifti.read_nifti(str(x)).array
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---- learning curves ------------------------------------------------------------------------
def read_learning_curve(uri: str) -> dict[str, np.ndarray]:
    """Training metrics ``{"step": (N,), <metric>: (N,), ...}`` from JSON lines, CSV (header row),
    JSON (a list of rows or a dict of lists) or a checkpoint's ``history.pt``. Needs a ``step`` column
    (else the row index is used) and at least one other numeric column."""
    raw = storage.read_bytes(uri)
    if uri.endswith(".pt"):
        hist = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        cols = {k: np.asarray(torch.as_tensor(v), dtype=np.float64) for k, v in hist.items()}
    else:
        text = raw.decode()
        rows: list[dict] = []
        stripped = text.strip()
        if uri.endswith(".csv") or (stripped and stripped[0] not in "[{"):
            lines = [ln for ln in stripped.splitlines() if ln.strip()]
            header = [h.strip() for h in lines[0].split(",")] if lines else []
            rows = [dict(zip(header, (c.strip() for c in ln.split(",")))) for ln in lines[1:]]
        else:
            try:
                obj = json.loads(stripped)
                rows = obj if isinstance(obj, list) else [dict(zip(obj, t)) for t in zip(*obj.values())]
            except json.JSONDecodeError:
                rows = [json.loads(ln) for ln in stripped.splitlines() if ln.strip()]
        cols = {}
        for key in dict.fromkeys(k for r in rows for k in r):
            vals = []
            for r in rows:
                try:
                    vals.append(float(r.get(key)))
                except (TypeError, ValueError):
                    vals.append(math.nan)
            arr = np.asarray(vals, dtype=np.float64)
            if np.isfinite(arr).any():
                cols[key] = arr
    if not cols:
        raise ValueError(f"{uri}: no numeric columns in the learning-curve file")
    n = max(len(v) for v in cols.values())
    cols.setdefault("step", np.arange(n, dtype=np.float64))
    if len(cols) < 2:
        raise ValueError(f"{uri}: a learning curve needs a metric column beside 'step', got {list(cols)}")
    return cols


def _plot_learning_curve(curve: Mapping[str, np.ndarray]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    step = curve["step"]
    positive = True
    for k, v in curve.items():
        if k == "step" or len(v) != len(step):
            continue
        ok = np.isfinite(v)
        st, y = step[ok], v[ok]
        w = max(1, len(y) // 25)
        line = ax.plot(st, y, lw=0.8, alpha=0.3 if w > 1 else 1.0, label=k if w == 1 else None)[0]
        if w > 1:
            ax.plot(st[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=line.get_color(), lw=1.6,
                    label=f"{k} (moving avg {w})")
        positive &= bool((v[ok] > 0).all())
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


# ---- segmentation ---------------------------------------------------------------------------
def _class_ids(schema: LabelSchema, classes: str) -> tuple[int, ...]:
    return schema.cardiac_ids if classes == "cardiac" else schema.foreground_ids


def evaluate_segmentation(preds: Mapping[str, Any], labels: Mapping[str, Any], schema: LabelSchema,
                          class_ids: Sequence[int] | None = None, radius: int = 3) -> list[dict]:
    """Per-case per-class Dice and RDice.

    Args:
        preds: ``{case_id: labels (X, Y, Z) array | label NIfTI URI}``.
        labels: ``{case_id: ground truth}``, same keys (a key missing from ``preds`` is an error).
        schema: names the classes; ``class_ids`` default to its eight cardiac classes.
        radius: RDice dilation radius in voxels.

    Returns:
        one row per case and class: ``{"case_id", "class_id", "class_name", "dice", "rdice"}``.
    """
    class_ids = tuple(schema.cardiac_ids if class_ids is None else class_ids)
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise ValueError(f"no prediction for cases {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    names = schema.names
    rows = []
    for case_id in sorted(labels):
        q = _load_labels(labels[case_id], "label")
        p = _load_labels(preds[case_id], "prediction")
        if p.shape != q.shape:
            raise ValueError(f"case {case_id!r}: prediction shape {p.shape} != label shape {q.shape}")
        d = dice_per_class(p, q, class_ids)
        r = rdice_per_class(p, q, class_ids, radius=radius)
        rows += [{"case_id": case_id, "class_id": c, "class_name": names.get(c, str(c)), "dice": d[c], "rdice": r[c]}
                 for c in class_ids]
    return rows


def segmentation_summary(rows: Sequence[Mapping], radius: int) -> dict:
    """Per-class mean / sd over cases (NaN skipped), per-case means and the overall means."""
    per_class, per_case = {}, {}
    for row in rows:
        per_class.setdefault(row["class_name"], []).append(row)
        per_case.setdefault(row["case_id"], []).append(row)
    classes = {}
    for name, rs in per_class.items():
        dm, ds, n = _stats([r["dice"] for r in rs])
        rm, rsd, _ = _stats([r["rdice"] for r in rs])
        classes[name] = {"class_id": rs[0]["class_id"], "dice_mean": dm, "dice_sd": ds,
                         "rdice_mean": rm, "rdice_sd": rsd, "n_cases": n}
    cases = [{"case_id": cid, "mean_dice": mean_score([r["dice"] for r in rs]),
              "mean_rdice": mean_score([r["rdice"] for r in rs]),
              "dice": {r["class_name"]: r["dice"] for r in rs}, "rdice": {r["class_name"]: r["rdice"] for r in rs}}
             for cid, rs in sorted(per_case.items())]
    return {
        "mode": "segmentation",
        "n_cases": len(cases),
        "rdice_radius_voxels": radius,
        "mean_dice": mean_score([c["dice_mean"] for c in classes.values()]),
        "mean_rdice": mean_score([c["rdice_mean"] for c in classes.values()]),
        "per_class": classes,
        "per_case": cases,
        "empty_rule": "a class absent from both prediction and ground truth is NaN (skipped in means); "
                      "absent from the ground truth but predicted: Dice 0, RDice NaN (no dilated ground truth)",
    }


def _plot_dice(summary: Mapping) -> bytes:
    names = list(summary["per_class"])
    c = summary["per_class"]
    x = np.arange(len(names))
    fig = _figure(max(6.5, 0.7 * len(names) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for off, key, label in ((-0.2, "dice", "Dice"), (0.2, "rdice", f"RDice (r={summary['rdice_radius_voxels']})")):
        m = np.array([c[n][f"{key}_mean"] for n in names], dtype=float)
        s = np.array([c[n][f"{key}_sd"] for n in names], dtype=float)
        ax.bar(x + off, np.nan_to_num(m), 0.4, yerr=np.nan_to_num(s), capsize=2, label=label)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over cases (± sd)")
    ax.set_title(f"per-class Dice, {summary['n_cases']} cases")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _case_id_of(uri: str, suffix: str) -> str:
    stem = NIFTI_EXT.sub("", uri.rstrip("/").rsplit("/", 1)[-1])
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def _ground_truth(s: EvaluateSettings) -> tuple[dict[str, str], dict[str, str]]:
    """``({case_id: label_uri}, {case_id: image_uri})`` from a cases.parquet or a folder of label NIfTIs."""
    if s.data is None:
        raise ValueError("segmentation evaluation needs data=<cases.parquet or folder of label NIfTIs>")
    uri = str(s.data)
    if not uri.endswith(".parquet") and storage.exists(storage.join(uri, "cases.parquet")):
        uri = storage.join(uri, "cases.parquet")
    if uri.endswith(".parquet"):
        rows = manifest.read_table(uri).to_pylist()
        if s.splits is not None:
            rows = [r for r in rows if r.get("split") in s.splits]
        if not rows:
            raise ValueError(f"{uri}: no cases{'' if s.splits is None else f' in splits {list(s.splits)}'}")
        return {r["case_id"]: r["label_uri"] for r in rows}, {r["case_id"]: r.get("image_uri") for r in rows}
    files = sorted(storage.glob(storage.join(uri, "*.nii.gz")) + storage.glob(storage.join(uri, "*.nii")))
    if not files:
        raise ValueError(f"{uri}: neither a cases.parquet nor a folder with label NIfTIs")
    return {_case_id_of(f, s.label_suffix): f for f in files}, {}


def match_predictions(case_ids: Sequence[str], pred: str, pattern: str = "{case_id}.nii.gz") -> tuple[dict[str, str], list[str]]:
    """``({case_id: pred_uri}, missing case ids)`` for the prediction files present under ``pred``."""
    if not storage.exists(pred):
        raise ValueError(f"prediction folder {pred!r} does not exist")
    present_names = {p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(pred)}
    found, missing = {}, []
    for cid in case_ids:
        name = pattern.format(case_id=cid)
        if name in present_names:
            found[cid] = storage.join(pred, name)
        else:
            missing.append(cid)
    return found, missing


def _checkpoint_predictor(checkpoint: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        from fcas.cal import load_predictor  # provided by the CAL segmentation module
    except ImportError:
        raise ValueError(
            f"checkpoint={checkpoint!r}: evaluating a segmentation checkpoint needs "
            "fcas.cal.load_predictor(checkpoint) -> predictor(image_hu (X, Y, Z)) -> labels (X, Y, Z), which "
            "is not available; pass pred=<folder of predicted label NIfTIs> instead") from None
    return load_predictor(checkpoint)


def run_segmentation(s: EvaluateSettings, predictor: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Segmentation mode of ``jobs/evaluate.py``: returns the metrics dict it wrote to ``metrics.json``."""
    t0 = time.time()
    schema = load_schema(s.schema)
    labels, images = _ground_truth(s)
    missing: list[str] = []
    if s.pred is not None:
        preds, missing = match_predictions(sorted(labels), s.pred, s.pred_pattern)
        if not preds:
            raise ValueError(f"no prediction in {s.pred!r} matches a case (pattern {s.pred_pattern!r}); "
                             f"cases: {sorted(labels)[:5]} ...")
    else:
        if predictor is None:
            if s.checkpoint is None:
                raise ValueError("segmentation evaluation needs pred=<folder> or checkpoint=<seg net>")
            predictor = _checkpoint_predictor(s.checkpoint)
        if not all(images.get(c) for c in labels):
            raise ValueError("running a predictor needs images: give data=<cases.parquet> with image_uri")
        preds = {}
        for cid in sorted(labels):
            vol = nifti.read_nifti(images[cid])
            pred = np.asarray(predictor(vol.array)).astype(np.uint8)
            uri = storage.join(s.out, "predictions", f"{cid}.nii.gz")
            nifti.write_nifti(uri, pred, vol.affine, kind="label")
            preds[cid] = uri
    rows = evaluate_segmentation(preds, {c: labels[c] for c in preds}, schema, _class_ids(schema, s.classes),
                                 s.rdice_radius)
    summary = segmentation_summary(rows, s.rdice_radius)
    summary.update({"data": s.data, "pred": s.pred, "checkpoint": s.checkpoint, "classes": s.classes,
                    "missing_predictions": missing, "seconds": round(time.time() - t0, 2)})
    plots = {"dice_per_class.png": _plot_dice(summary)}
    return write_report(s, summary, plots, _segmentation_md(summary))


def _segmentation_md(m: Mapping) -> list[str]:
    head = ["class", "id", "Dice mean", "Dice sd", f"RDice mean (r={m['rdice_radius_voxels']})", "RDice sd", "cases"]
    rows = [[n, c["class_id"], c["dice_mean"], c["dice_sd"], c["rdice_mean"], c["rdice_sd"], c["n_cases"]]
            for n, c in m["per_class"].items()]
    rows.append(["**mean over classes**", "", m["mean_dice"], "", m["mean_rdice"], "", m["n_cases"]])
    case_rows = [[c["case_id"], c["mean_dice"], c["mean_rdice"]] for c in m["per_case"]]
    out = ["# Segmentation evaluation", "",
           f"Ground truth `{m['data']}`; predictions `{m['pred'] or m['checkpoint']}`; {m['n_cases']} cases; "
           f"classes: {m['classes']}.", "",
           "Dice (seed Eq. 14) per class: MONAI `compute_dice`. RDice (Eq. 15): the prediction restricted to the "
           f"ground truth dilated by a ball of {m['rdice_radius_voxels']} voxels. {m['empty_rule'].capitalize()}.", "",
           _md_table(head, rows), "", "![per-class Dice](dice_per_class.png)", "", "## Per case", "",
           _md_table(["case", "mean Dice", "mean RDice"], case_rows)]
    if m.get("missing_predictions"):
        out += ["", f"Cases without a prediction (skipped): {', '.join(m['missing_predictions'])}"]
    return out


# ---- synthesis ------------------------------------------------------------------------------
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
    fig = _figure(10, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.scatter(points[0], points[1], s=2, alpha=0.15, lw=0)
    ax1.set_xlabel("SSV confidence")
    ax1.set_ylabel("|synth - target| (unit scale)")
    ax1.set_title(f"voxels (subsample {points[0].size}); Pearson {_fmt(pearson, 3)}")
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
    return _png(fig)


def _unit(hu: np.ndarray) -> np.ndarray:
    from fcas.diffusion.conditioning import hu_to_unit

    return hu_to_unit(hu).numpy()


def evaluate_synthesis(s: EvaluateSettings, features: VAEEncoderFeatures | None = None) -> dict:
    """Synthesis mode of ``jobs/evaluate.py``: SSIM / RMSE per sample, FID, confidence vs error; writes the report.

    ``features``: the FID feature network (default :meth:`VAEEncoderFeatures.from_checkpoint` of
    ``s.fid_features``).
    """
    from fcas.synthesis.outputs import read_run_manifest

    t0 = time.time()
    if s.run is None:
        raise ValueError("synthesis evaluation needs run=<synthesis run folder>")
    table = read_run_manifest(s.run)
    if table.num_rows == 0:
        raise ValueError(f"{s.run}: the synthesis run has no manifest rows")
    samples = sorted(table.to_pylist(), key=lambda r: r["sample_id"])[: s.max_samples]
    lib_uri = s.templates or storage.join(s.run, "templates", "cases.parquet")
    if not lib_uri.endswith(".parquet"):
        lib_uri = storage.join(lib_uri, "cases.parquet")
    if not storage.exists(lib_uri):
        raise ValueError(f"template library {lib_uri!r} does not exist; pass templates=<cases.parquet>")
    library = {r["case_id"]: r for r in manifest.read_table(lib_uri).to_pylist()}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    features = features or VAEEncoderFeatures.from_checkpoint(s.fid_features, s.fid_layers, s.fid_resize, device)
    lp_net = make_lpips(s.lpips_weights)

    @lru_cache(maxsize=4)
    def target_image(case_id: str) -> np.ndarray:
        return _unit(nifti.read_nifti(library[case_id]["image_uri"]).array)

    key = "template_id" if s.target == "template" else "reference_id"
    streamed = _Streamed(s.cm_bins)
    per_sample, rejects, synth_feats, pts = [], [], [], ([], [])
    k = max(1, s.scatter_points // max(len(samples), 1))
    for row in sorted(samples, key=lambda r: (r[key], r["sample_id"])):
        sid, tid = int(row["sample_id"]), row[key]
        try:
            if tid not in library:
                raise ValueError(f"{s.target} case {tid!r} is not in the library {lib_uri}")
            img = _unit(nifti.read_nifti(row["image_uri"]).array)
            tgt = target_image(tid)
            if img.shape != tgt.shape:
                raise ValueError(f"sample shape {img.shape} != {s.target} shape {tgt.shape}")
            lab = nifti.read_nifti(row["label_uri"]).array
            conf = np.asarray(nifti.read_nifti(row["confidence_uri"]).array, dtype=np.float32)
        except (ValueError, OSError) as exc:   # NiftiError is a ValueError
            rejects.append({"sample_id": sid, "reason": str(exc)})
            continue
        mask = lab > 0 if s.mask == "label" else None
        rec = {"sample_id": sid, "template_id": row["template_id"], "reference_id": row["reference_id"],
               "target_id": tid, "ssim": ssim(img, tgt, mask, win_size=s.ssim_win, device=device), "rmse": rmse(img, tgt, mask),
               "mask_voxels": int(mask.sum()) if mask is not None else int(img.size)}
        if lp_net is not None:
            rec["lpips"] = lpips(lp_net, img, tgt)
        per_sample.append(rec)
        synth_feats.append(features(torch.from_numpy(img)[None, None])[0])
        region = (lab > 0) if s.cm_region == "mask" else np.ones(img.shape, bool)
        c, e = conf[region], np.abs(img - tgt)[region]
        streamed.add(c, e)
        pick = np.random.default_rng([s.seed, sid]).choice(c.size, size=min(k, c.size), replace=False)
        pts[0].append(c[pick])
        pts[1].append(e[pick])
    if not per_sample:
        raise ValueError(f"{s.run}: no sample could be evaluated; first reasons: {rejects[:3]}")
    per_sample.sort(key=lambda r: r["sample_id"])

    real_ids = sorted(c for c, r in library.items() if s.fid_real is None or r.get("split") in s.fid_real)
    real_feats = {c: features(torch.from_numpy(_unit(nifti.read_nifti(library[c]["image_uri"]).array))[None, None])[0]
                  for c in real_ids}
    fid_block: dict[str, Any] = {"features": features.description, "n_synth": len(synth_feats),
                                 "n_real": len(real_feats), "real_splits": list(s.fid_real) if s.fid_real else "all"}
    if len(synth_feats) >= 2 and len(real_feats) >= 2:
        fid_block["value"] = fid(torch.stack(synth_feats), torch.stack(list(real_feats.values())))
    else:
        fid_block["value"] = None
        fid_block["note"] = "FID needs at least 2 volumes per set"
    splits = sorted({library[c].get("split") for c in real_ids})
    if len(splits) >= 2:
        a = [real_feats[c] for c in real_ids if library[c].get("split") == splits[0]]
        b = [real_feats[c] for c in real_ids if library[c].get("split") != splits[0]]
        if len(a) >= 2 and len(b) >= 2:
            fid_block["real_vs_real"] = {"value": fid(torch.stack(a), torch.stack(b)),
                                         "sets": f"{splits[0]} ({len(a)}) vs the other splits ({len(b)})"}
    cx, ce = np.concatenate(pts[0]), np.concatenate(pts[1])
    ssim_m, ssim_sd, _ = _stats([r["ssim"] for r in per_sample])
    rmse_m, rmse_sd, _ = _stats([r["rmse"] for r in per_sample])
    summary = {
        "mode": "synthesis", "run": s.run, "templates": lib_uri, "target": s.target, "mask": s.mask,
        "n_samples": len(per_sample), "ssim_win": s.ssim_win,
        "ssim_mean": ssim_m, "ssim_sd": ssim_sd, "rmse_mean": rmse_m, "rmse_sd": rmse_sd,
        "rmse_unit": "unit intensity scale [0, 1] (x 2000 = HU)",
        "fid": fid_block,
        "lpips": ({"mean": _stats([r["lpips"] for r in per_sample])[0], "weights": s.lpips_weights}
                  if lp_net is not None else "not computed: no LPIPS backbone weights configured (lpips_weights)"),
        "confidence_vs_error": {"region": s.cm_region, "n_voxels": int(streamed.sums[0]),
                                "pearson": streamed.pearson(), "spearman_subsample": _spearman(cx, ce),
                                "subsample_voxels": int(cx.size), "bins": streamed.bins()},
        "per_sample": per_sample, "rejects": rejects, "seconds": round(time.time() - t0, 2),
    }
    plots = {"cm_vs_error.png": _plot_cm((cx, ce), summary["confidence_vs_error"]["bins"],
                                         summary["confidence_vs_error"]["pearson"])}
    return write_report(s, summary, plots, _synthesis_md(summary))


def _synthesis_md(m: Mapping) -> list[str]:
    f, cm = m["fid"], m["confidence_vs_error"]
    mask = "the sample's label voxels (label > 0)" if m["mask"] == "label" else "the whole volume"
    head = [["samples", "SSIM", "RMSE", "FID", "LPIPS"],
            [[m["n_samples"], f"{_fmt(m['ssim_mean'])} ± {_fmt(m['ssim_sd'])}",
              f"{_fmt(m['rmse_mean'])} ± {_fmt(m['rmse_sd'])}", f["value"],
              _fmt(m["lpips"]["mean"]) if isinstance(m["lpips"], dict) else "not computed"]]]
    out = ["# Synthesis image quality", "",
           f"Run `{m['run']}`, {m['n_samples']} samples against their **{m['target']}** image "
           f"(library `{m['templates']}`). SSIM (MONAI, Gaussian window {m['ssim_win']}) and RMSE in unit "
           f"intensity scale (HU clipped to [-1000, 1000] -> [0, 1]) over {mask}.", "",
           _md_table(*head), "",
           f"**FID feature network:** {f['features']}. Synthesized set {f['n_synth']} volumes vs real set "
           f"{f['n_real']} library cases (splits: {f['real_splits']}). These FIDs are not comparable with the "
           "paper's (other features, tiny sets).", ""]
    if "real_vs_real" in f:
        out += [f"Real-vs-real FID at these set sizes ({f['real_vs_real']['sets']}): "
                f"{_fmt(f['real_vs_real']['value'])} (the floor the synthesized set is measured against).", ""]
    if not isinstance(m["lpips"], dict):
        out += [f"LPIPS: {m['lpips']}.", ""]
    out += ["## Confidence vs error", "",
            f"Per voxel |synth - {m['target']}| against the SSV confidence over {cm['region']} voxels "
            f"({cm['n_voxels']}): Pearson {_fmt(cm['pearson'])} (all voxels), Spearman {_fmt(cm['spearman_subsample'])} "
            f"(subsample of {cm['subsample_voxels']}). Negative = low confidence where the errors are.", "",
            _md_table(["confidence", "voxels", "mean abs error", "sd"],
                      [[f"[{b['lo']:.2f}, {b['hi']:.2f})", b["n_voxels"], b["mean_abs_error"], b["sd_abs_error"]]
                       for b in cm["bins"]]), "", "![confidence vs error](cm_vs_error.png)", "", "## Per sample", "",
            _md_table(["sample", "template", "reference", "SSIM", "RMSE", "mask voxels"],
                      [[r["sample_id"], r["template_id"], r["reference_id"], r["ssim"], r["rmse"], r["mask_voxels"]]
                       for r in m["per_sample"]])]
    if m["rejects"]:
        out += ["", "Samples not evaluated:", ""] + [f"- {r['sample_id']}: {r['reason']}" for r in m["rejects"]]
    return out


# ---- report ---------------------------------------------------------------------------------
def write_report(s: EvaluateSettings, summary: dict, plots: Mapping[str, bytes], md: list[str]) -> dict:
    """Write PNGs, ``report.md`` and ``metrics.json`` under ``s.out`` (each atomically); returns the summary."""
    storage.makedirs(s.out)
    plots = dict(plots)
    if s.learning_curve:
        curve = read_learning_curve(s.learning_curve)
        plots["learning_curve.png"] = _plot_learning_curve(curve)
        summary["learning_curve"] = {"source": s.learning_curve, "points": int(len(curve["step"])),
                                     **{f"last_{k}": float(v[np.isfinite(v)][-1]) for k, v in curve.items()
                                        if k != "step" and np.isfinite(v).any()}}
        md = md + ["", "## Learning curve", "", f"From `{s.learning_curve}`.", "", "![learning curve](learning_curve.png)"]
    for name, data in plots.items():
        storage.atomic_write_bytes(storage.join(s.out, name), data)
    summary["plots"] = sorted(plots)
    summary["settings"] = asdict(s)
    clean = _clean(summary)
    storage.atomic_write_bytes(storage.join(s.out, "metrics.json"), json.dumps(clean, indent=2).encode())
    storage.atomic_write_bytes(storage.join(s.out, "report.md"), ("\n".join(md) + "\n").encode())
    return clean


def run_evaluation(s: EvaluateSettings, predictor: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Run the configured mode; returns what ``metrics.json`` holds."""
    if s.mode == "segmentation":
        return run_segmentation(s, predictor)
    return evaluate_synthesis(s)
