"""Segmentation evaluation (:func:`evaluate_segmentation`, :func:`run_segmentation`): predictions (arrays or
label NIfTI URIs) against ground truth by case id. Ground truth is a prepared ``cases.parquet``
(``label_uri`` per ``case_id``, optionally filtered by ``splits``) or a folder of label NIfTIs
(case id = file name without ``.nii[.gz]`` and without ``label_suffix``). Predictions come from a
folder (``pred``; file ``pred_pattern.format(case_id=...)``) or from a predictor callable
``predictor(image_hu (X, Y, Z)) -> labels (X, Y, Z)`` run on the cases' images. A ``checkpoint``
is turned into a predictor by ``fcas.cal.load_predictor(checkpoint)`` once that module provides it.
Per class: Dice and RDice (:mod:`fcas.metrics.segmentation`; a class absent from both maps is NaN
and skipped). Per-class figures are means over the cases where they are defined; ``mean_dice`` is
the mean of the per-class means.

Hand-written glue (file matching, per-class tables); Dice and RDice are :mod:`fcas.metrics.segmentation`.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fcas.evaluation.report import (EvaluateSettings, new_figure, load_labels, markdown_table, figure_png, mean_sd,
                                    write_report)
from fcas.io import manifest, nifti, storage
from fcas.labels import LabelSchema, load_schema
from fcas.metrics.segmentation import dice_per_class, mean_score, rdice_per_class

__all__ = ["evaluate_segmentation", "segmentation_summary", "match_predictions", "run_segmentation"]

NIFTI_EXT = re.compile(r"\.nii(\.gz)?$")

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
        q = load_labels(labels[case_id], "label")
        p = load_labels(preds[case_id], "prediction")
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
        dm, ds, n = mean_sd([r["dice"] for r in rs])
        rm, rsd, _ = mean_sd([r["rdice"] for r in rs])
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
    fig = new_figure(max(6.5, 0.7 * len(names) + 2), 3.8)
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
    return figure_png(fig)


def _case_id_of(uri: str, suffix: str) -> str:
    stem = NIFTI_EXT.sub("", uri.rstrip("/").rsplit("/", 1)[-1])
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def _ground_truth(s: EvaluateSettings) -> tuple[dict[str, str], dict[str, str]]:
    """``({case_id: label_uri}, {case_id: image_uri})`` from a cases.parquet or a folder of label NIfTIs."""
    if s.data is None:
        raise ValueError("segmentation evaluation needs data=<cases.parquet or folder of label NIfTIs>")
    uri = str(s.data)
    uri = manifest.cases_uri(uri)
    if uri.endswith(".parquet"):
        rows = manifest.read_cases(uri, schema=None).to_pylist()   # files resolved against its folder
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
           "Dice (the paper's Eq. 14) per class: MONAI `compute_dice`. RDice (Eq. 15): the prediction restricted to the "
           f"ground truth dilated by a ball of {m['rdice_radius_voxels']} voxels. {m['empty_rule'].capitalize()}.", "",
           markdown_table(head, rows), "", "![per-class Dice](dice_per_class.png)", "", "## Per case", "",
           markdown_table(["case", "mean Dice", "mean RDice"], case_rows)]
    if m.get("missing_predictions"):
        out += ["", f"Cases without a prediction (skipped): {', '.join(m['missing_predictions'])}"]
    return out


