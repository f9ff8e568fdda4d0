"""Evaluation settings, markdown tables, plots, learning curves and report writing.

Hand-written plumbing; plots use matplotlib's ``Figure`` with the Agg canvas (no pyplot state, no
backend switch), files are written atomically through :mod:`fcas.io.storage`.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fcas.bundled import resolve
from fcas.io import nifti, storage
from fcas.settings import build

__all__ = ["EvaluateSettings", "settings_from_dict", "read_learning_curve", "write_report"]

MODES = ("segmentation", "synthesis")


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
    workers: int = 1                       # threads evaluating samples

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
    return build(EvaluateSettings, d, what="evaluate settings", ignore=("hydra",))


# ---- small helpers --------------------------------------------------------------------------
def json_safe(x):
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def format_number(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample sd with ddof=1 -- 0 for one value --, count) of the finite values; (nan, nan, 0) for none.
    Every "±" of the project's reports (evaluate and the reproduction) is this sd."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def new_figure(w: float = 6.5, h: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="tight")


def load_labels(x, what: str) -> np.ndarray:
    if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
        return nifti.read_nifti(str(x)).array
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---- learning curves ------------------------------------------------------------------------
def read_learning_curve(uri: str) -> dict[str, np.ndarray]:
    """Training metrics ``{"step": (N,), <metric>: (N,), ...}`` from JSON lines, CSV (header row),
    JSON (a list of rows or a dict of lists) or a checkpoint's ``history.pt``. Needs a ``step`` column
    (else the row index is used) and at least one other numeric column."""
    raw = storage.read_bytes(resolve(uri))   # e.g. checkpoints/demo/history.pt from any directory
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
    fig = new_figure()
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
    return figure_png(fig)



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
    clean = json_safe(summary)
    storage.atomic_write_bytes(storage.join(s.out, "metrics.json"), json.dumps(clean, indent=2).encode())
    storage.atomic_write_bytes(storage.join(s.out, "report.md"), ("\n".join(md) + "\n").encode())
    return clean

