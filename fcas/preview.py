"""Tri-planar PNG previews of a CT volume with its label overlay (phantoms, synthesis samples).

:func:`triplanar_png` renders axial, coronal and sagittal slices through the centre of mass of the
cardiac labels, window W 800 / L 200, with a semi-transparent colour per class id (fixed table) and a
legend. Arrays are reoriented to RAS with nibabel from their affine, then shown in radiological
convention: axial with anterior up and the patient's right on the left, coronal and sagittal with
superior up (sagittal: anterior on the left); pixels keep the physical aspect ratio.
:func:`grid_png` stacks a few cases, one row each. Both return the PNG bytes and, given a path,
write it atomically (temporary file, then ``os.replace``). :func:`sample_png` is the preview of a
synthesized sample: the image alone, the image with its label overlay and the confidence map
(rows), so that a reader sees what the image itself shows.

Hand-written on matplotlib (Agg); MONAI's ``matshow3d`` draws montages without label overlays.
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from fcas.io.storage import atomic_write_bytes  # noqa: E402
from fcas.labels import LabelSchema, default_schema  # noqa: E402

__all__ = ["CLASS_COLOURS", "triplanar_png", "grid_png", "sample_png", "orient_ras"]

# class id -> RGB (0..1), alpha; fixed so that every preview of the project reads the same
CLASS_COLOURS: dict[int, tuple[tuple[float, float, float], float]] = {
    1: ((0.90, 0.20, 0.20), 0.45),   # left ventricle
    2: ((0.20, 0.45, 0.95), 0.45),   # right ventricle
    3: ((1.00, 0.60, 0.10), 0.45),   # left atrium
    4: ((0.15, 0.80, 0.90), 0.45),   # right atrium
    5: ((0.95, 0.90, 0.15), 0.45),   # LV myocardium
    6: ((0.90, 0.20, 0.85), 0.50),   # ascending aorta
    7: ((0.55, 0.35, 0.95), 0.50),   # pulmonary artery
    8: ((0.10, 1.00, 0.30), 0.85),   # coronary arteries
    9: ((0.55, 0.75, 0.95), 0.15),   # lung
    10: ((1.00, 1.00, 0.85), 0.25),  # bone
    11: ((0.75, 0.45, 0.30), 0.15),  # soft tissue
}
_FALLBACK = ((0.6, 0.6, 0.6), 0.3)


def orient_ras(affine: np.ndarray, *arrays: np.ndarray):
    """Reorient ``arrays`` (X, Y, Z) to the closest RAS axis order; returns (arrays..., spacing (3,))."""
    affine = np.asarray(affine, float)
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    out = [np.asarray(nib.orientations.apply_orientation(np.asarray(a), ornt)) for a in arrays]
    return (*out, spacing)


def _rgb(img: np.ndarray, lab: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    w, level = window
    gray = np.clip((img.astype(np.float32) - (level - w / 2)) / w, 0, 1)
    rgb = np.repeat(gray[..., None], 3, -1)
    for cid in np.unique(lab):
        if cid == 0:
            continue
        colour, alpha = CLASS_COLOURS.get(int(cid), _FALLBACK)
        m = lab == cid
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return rgb


def _views(image: np.ndarray, label: np.ndarray, affine, schema: LabelSchema, centre_label: np.ndarray | None = None):
    """Three (rgb, aspect, name, corner letters) panels through the cardiac centre of mass
    (of ``centre_label`` when given, so that other volumes can be cut through the same voxel)."""
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"image and label must be 3D arrays of one shape, got {image.shape} and {label.shape}")
    aff = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    img, lab, sp = orient_ras(aff, image, label)
    if centre_label is not None:
        lab_c = orient_ras(aff, centre_label)[0]
    else:
        lab_c = lab
    card = np.isin(lab_c, schema.cardiac_ids)
    if card.any():
        c = np.rint(np.argwhere(card).mean(0)).astype(int)
    else:
        c = np.asarray(lab.shape) // 2
    i, j, k = c
    # slices .T[::-1, ::-1]: rows descend the second axis (top = A or S), columns put R (or A) left
    return [
        (img[:, :, k].T[::-1, ::-1], lab[:, :, k].T[::-1, ::-1], sp[1] / sp[0], f"axial k={k}", ("R", "L", "A", "P")),
        (img[:, j, :].T[::-1, ::-1], lab[:, j, :].T[::-1, ::-1], sp[2] / sp[0], f"coronal j={j}", ("R", "L", "S", "I")),
        (img[i, :, :].T[::-1, ::-1], lab[i, :, :].T[::-1, ::-1], sp[2] / sp[1], f"sagittal i={i}", ("A", "P", "S", "I")),
    ]


def _draw_row(axes, image, label, affine, schema, window, title=None, centre_label=None, cmap=None):
    """One row of three views; with ``cmap`` the image is drawn as a scalar map in ``window`` (min, max)
    without an overlay (the confidence map)."""
    views = _views(image, label, affine, schema, centre_label)
    for ax, (im, lb, aspect, name, (left, right, top, bottom)) in zip(axes, views):
        if cmap is None:
            ax.imshow(_rgb(im, lb, window), aspect=aspect, interpolation="nearest")
        else:
            ax.imshow(im, aspect=aspect, interpolation="nearest", cmap=cmap, vmin=window[0], vmax=window[1])
        ax.set_title(name if title is None else f"{title} | {name}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        kw = dict(color="w", fontsize=7, transform=ax.transAxes)
        ax.text(0.01, 0.5, left, va="center", ha="left", **kw)
        ax.text(0.99, 0.5, right, va="center", ha="right", **kw)
        ax.text(0.5, 0.99, top, va="top", ha="center", **kw)
        ax.text(0.5, 0.01, bottom, va="bottom", ha="center", **kw)


def _legend(fig, schema: LabelSchema, present: Iterable[int]):
    present = set(int(v) for v in present)
    handles = [Patch(color=CLASS_COLOURS.get(cid, _FALLBACK)[0], label=name)
               for cid, name in sorted(schema.names.items()) if cid != 0 and cid in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False,
                   labelcolor="w")


def _finish(fig, path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="black")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def triplanar_png(image_hu: np.ndarray, label: np.ndarray, path_or_None=None, title: str | None = None, *,
                  affine: np.ndarray | None = None, schema: LabelSchema | None = None,
                  window: tuple[float, float] = (800.0, 200.0), dpi: int = 100) -> bytes:
    """PNG of axial / coronal / sagittal slices with the label overlay.

    image_hu: (X, Y, Z) HU; label: (X, Y, Z) class ids; affine: (4, 4) voxel -> RAS mm (default identity,
    i.e. the arrays are already RAS-ordered with isotropic voxels). window: (width, level) HU.
    Returns the PNG bytes; writes them atomically to ``path_or_None`` when given.
    """
    schema = schema or default_schema()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.6), dpi=dpi, facecolor="black")
    _draw_row(axes, np.asarray(image_hu), np.asarray(label), affine, schema, window)
    if title:
        fig.suptitle(title, color="w", fontsize=9)
    for ax in axes:
        ax.title.set_color("w")
    _legend(fig, schema, np.unique(label))
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.12, wspace=0.03)
    return _finish(fig, path_or_None)


def sample_png(image_hu: np.ndarray, label: np.ndarray, confidence: np.ndarray | None = None, path_or_None=None,
               title: str | None = None, *, affine: np.ndarray | None = None, schema: LabelSchema | None = None,
               window: tuple[float, float] = (800.0, 200.0), dpi: int = 100) -> bytes:
    """Preview of one synthesized sample: rows image alone | image + label overlay | confidence map.

    All rows cut the volume through the same voxel (the label's cardiac centre of mass). The
    confidence row (``confidence`` in [0, 1], ``None`` leaves it out) is drawn in a perceptual colour
    map (dark = low confidence). Returns the PNG bytes; writes them atomically when a path is given.
    """
    schema = schema or default_schema()
    image, label = np.asarray(image_hu), np.asarray(label)
    rows = [("image", image, np.zeros_like(label), window, None), ("label overlay", image, label, window, None)]
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float32)
        if conf.shape != image.shape:
            raise ValueError(f"confidence map shape {conf.shape} differs from the image's {image.shape}")
        rows.append(("confidence", conf, np.zeros_like(label), (0.0, 1.0), "magma"))
    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3.0 * n + 0.5), dpi=dpi, facecolor="black", squeeze=False)
    for r, (name, vol, lab, win, cmap) in enumerate(rows):
        _draw_row(axes[r], vol, lab, affine, schema, win, name, centre_label=label, cmap=cmap)
        for ax in axes[r]:
            ax.title.set_color("w")
    if title:
        fig.suptitle(title, color="w", fontsize=9)
    _legend(fig, schema, np.unique(label))
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.7 / (3.0 * n + 0.5), bottom=0.45 / (3.0 * n + 0.5),
                        wspace=0.03, hspace=0.12)
    return _finish(fig, path_or_None)


def grid_png(cases: Sequence, path=None, titles: Sequence[str] | None = None, *, schema: LabelSchema | None = None,
             window: tuple[float, float] = (800.0, 200.0), dpi: int = 100) -> bytes:
    """One tri-planar row per case. ``cases``: objects with ``image``, ``label``, ``affine`` (e.g.
    :class:`fcas.phantom.PhantomCase`) or ``(image, label, affine)`` tuples. Returns PNG bytes."""
    if not cases:
        raise ValueError("grid_png needs at least one case")
    schema = schema or default_schema()
    n = len(cases)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3.0 * n + 0.4), dpi=dpi, facecolor="black", squeeze=False)
    present = set()
    for r, case in enumerate(cases):
        image, label, affine = (case.image, case.label, case.affine) if hasattr(case, "image") else case
        t = titles[r] if titles else (f"seed {case.seed}" if hasattr(case, "seed") else None)
        _draw_row(axes[r], np.asarray(image), np.asarray(label), affine, schema, window, t)
        present |= set(np.unique(label).tolist())
        for ax in axes[r]:
            ax.title.set_color("w")
    _legend(fig, schema, present)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.4 / (3.0 * n + 0.4) + 0.03, wspace=0.03, hspace=0.12)
    return _finish(fig, path)
