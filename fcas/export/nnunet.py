"""Export a synthesis run and/or prepared cases as an nnU-Net v2 raw dataset.

Layout written under ``out`` (the ``nnUNet_raw`` folder; any fsspec URI)::

    Dataset501_FCaS/
      dataset.json                  channel_names {"0": "CT"}, labels (name -> id, background 0),
                                    numTraining, file_ending ".nii.gz" (+ overwrite_image_reader_writer)
      imagesTr/{case}_0000.nii.gz   CT, int16 HU
      labelsTr/{case}.nii.gz        class ids, uint8, same shape and affine as the image
      imagesTs/{case}_0000.nii.gz   prepared cases of the test splits (only when there are any)
      labelsTs/{case}.nii.gz        their labels (``labels_ts``; nnU-Net ignores this folder)
      splits_final.json             [{"train": [...], "val": [...]}, ...] one dict per fold
      rejects.json                  [{"case", "source", "reason"}]: inputs that could not be exported
      fcas_export.json              settings and one row per exported case (sources, group, subset)

Format (nnU-Net v2 ``documentation/dataset_format.md``): the dataset folder is ``Dataset`` + a
three-digit id + ``_`` + a free name; one input channel, suffix ``_0000``; the label ids must be
consecutive from 0 (background). ``labels`` come from the project's label schema: either the
eight cardiac classes (``cardiac_only``: every other id becomes background, ids 0..8) or every
class of the schema (ids 0..11 for ``cardiac``).

Case names use ``[A-Za-z0-9_-]`` only: ``syn_s00000012`` for sample 12 of a synthesis run,
``real_<case_id>`` for a prepared case (other characters become ``_``).

Folds (:mod:`fcas.export.folds`): nnU-Net draws its own 5-fold split of the case names unless
``nnUNet_preprocessed/DatasetXXX_Name/splits_final.json`` exists; that split would put samples
synthesized from one template into both a training and a validation fold. The split written here
keeps every group in one validation fold: a synthesis sample's group is its ``template_id``, a
prepared case's group is its ``case_id``, so a template case exported together with the samples
drawn from it lands in their fold too. A synthetic label map is the reference case's mask deformed
by MGM, so with ``group_by=template_reference`` a sample also joins its ``reference_id``'s group
(connected components over template and reference ids): use it when reference cases are exported
beside the samples; it leaves fewer, larger groups (often fewer than the folds). Copy ``splits_final.json`` there before the first training
(or set ``preprocessed`` to write it there as well). Groups are shuffled by ``seed``, then dealt
largest first to the fold with the fewest cases (greedy balancing, as scikit-learn's
``GroupKFold``, which the project does not depend on; hand-written here).

Robustness: an input that cannot be read or does not make a valid pair (corrupt or missing file,
shape / affine mismatch, non-integer or unknown label ids, non-finite HU) becomes one line in
``rejects.json`` naming the file, and the export goes on; when no training case is left the export
fails (``ValueError``, exit 2 from the job) instead of writing ``numTraining: 0``. A run's sample URIs
are resolved against ``run`` (:func:`fcas.synthesis.outputs.read_run_manifest`), so a copied run
exports. Write errors (the output store) are raised. Files are written atomically by
:func:`fcas.io.nifti.write_nifti`, so ``existing=resume`` may keep every pair whose two files exist.

Ray-free: cases are copied by a thread pool (reads, gzip and object-store I/O release the GIL).
The Hydra entry point is ``jobs/export_nnunet.py``.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

from fcas.export.folds import group_kfold_splits
from fcas.export.items import (CHANNEL, FILE_ENDING, OWN_FILES, SUBFOLDERS, ExportItem, ExportSettings, case_name,
                               dataset_folder_name, dataset_labels, list_items, settings_from_dict)
from fcas.io import nifti, storage
from fcas.labels import LabelSchema, load_schema

log = logging.getLogger(__name__)

__all__ = [
    "ExportSettings",
    "ExportItem",
    "settings_from_dict",
    "dataset_folder_name",
    "dataset_labels",
    "case_name",
    "list_items",
    "group_kfold_splits",
    "export_nnunet",
]

AFFINE_ATOL = 1e-4   # mm: image and label affines agreeing within this share one grid


# ---- one case ----------------------------------------------------------------------------------
class _Rejected(Exception):
    """An input that cannot be exported; the message is one line naming the file."""


def _one_line(uri: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if uri in text else f"{uri}: {text}"


def _read(uri: str) -> nifti.Volume:
    try:
        return nifti.read_nifti(uri)
    except (ValueError, OSError, EOFError) as exc:      # NiftiError is a ValueError; missing -> OSError
        raise _Rejected(_one_line(uri, exc)) from exc


def _checked_pair(item: ExportItem, schema: LabelSchema, cardiac_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (I, J, K) HU, label (I, J, K) uint8 mapped, affine (4, 4)) or :class:`_Rejected`."""
    img, lab = _read(item.image_uri), _read(item.label_uri)
    if img.array.ndim != 3:
        raise _Rejected(f"{item.image_uri}: expected a 3D (I, J, K) image, got shape {img.array.shape}")
    if lab.array.shape != img.array.shape:
        raise _Rejected(f"{item.label_uri}: label shape {lab.array.shape} differs from image shape "
                        f"{img.array.shape} ({item.image_uri})")
    if not np.allclose(lab.affine, img.affine, rtol=0.0, atol=AFFINE_ATOL):
        raise _Rejected(f"{item.label_uri}: label affine {np.round(lab.affine, 4).tolist()} differs from "
                        f"the image affine {np.round(img.affine, 4).tolist()} ({item.image_uri})")
    image = img.array
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise _Rejected(f"{item.image_uri}: {int(np.count_nonzero(~np.isfinite(image)))} non-finite voxels")
    label = lab.array
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.rint(label)):
            raise _Rejected(f"{item.label_uri}: label map holds non-integer values")
        label = np.rint(label).astype(np.int64)
    bad = schema.unknown_ids(label)
    if bad:
        raise _Rejected(f"{item.label_uri}: label ids {bad[:10]} are not in schema {schema.name!r}")
    label = label.astype(np.uint8)
    if cardiac_only:
        label = schema.cardiac_only(label)
    return image, label, img.affine


def _export_one(item: ExportItem, root: str, schema: LabelSchema, settings: ExportSettings) -> dict:
    t0 = time.perf_counter()
    try:
        image, label, affine = _checked_pair(item, schema, settings.cardiac_only)
    except _Rejected as exc:
        return {"case": item.case, "ok": False, "reason": str(exc), "source": item.image_uri}
    img_uri, lab_uri = _target_uris(root, item, settings.labels_ts)
    nifti.write_nifti(img_uri, image, affine, kind="image")
    if lab_uri is not None:
        nifti.write_nifti(lab_uri, label, affine, kind="label")
    present = np.unique(label).astype(int).tolist()
    return {"case": item.case, "ok": True, "labels_present": present, "seconds": time.perf_counter() - t0}


def _target_uris(root: str, item: ExportItem, labels_ts: bool) -> tuple[str, str | None]:
    img = storage.join(root, f"images{item.subset}", f"{item.case}_{CHANNEL}{FILE_ENDING}")
    if item.subset == "Ts" and not labels_ts:
        return img, None
    return img, storage.join(root, f"labels{item.subset}", f"{item.case}{FILE_ENDING}")


# ---- the dataset -------------------------------------------------------------------------------
def _write_json(uri: str, obj: Any) -> None:
    storage.atomic_write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode())


def _names_in(folder: str) -> set[str]:
    if not storage.exists(folder):
        return set()
    return {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(folder)}


def _prepare_folder(root: str, items: list[ExportItem], settings: ExportSettings) -> set[str]:
    """Apply ``settings.existing`` to the dataset folder; returns the cases already complete (resume)."""
    present = {sub: _names_in(storage.join(root, sub)) for sub in SUBFOLDERS}
    own = [f for f in OWN_FILES if storage.exists(storage.join(root, f))]
    if not own and not any(present.values()):
        return set()
    if settings.existing == "error":
        raise ValueError(f"{root} already holds an export ({', '.join(own + [s for s in SUBFOLDERS if present[s]])}); "
                         f"set existing=overwrite or existing=resume")
    if settings.existing == "overwrite":
        for sub in SUBFOLDERS:
            if storage.exists(storage.join(root, sub)):
                storage.remove(storage.join(root, sub), recursive=True)
        for f in own:
            storage.remove(storage.join(root, f), missing_ok=True)
        return set()
    # resume: same label settings, and no file that this export would not write
    prev_uri = storage.join(root, "fcas_export.json")
    if storage.exists(prev_uri):
        prev = json.loads(storage.read_bytes(prev_uri)).get("settings", {})
        for k in ("schema", "cardiac_only"):
            if k in prev and prev[k] != getattr(settings, k):
                raise ValueError(f"{root}: cannot resume, it was exported with {k}={prev[k]!r}, now "
                                 f"{getattr(settings, k)!r}; set existing=overwrite")
    expected: dict[str, set[str]] = {sub: set() for sub in SUBFOLDERS}
    for it in items:
        img, lab = _target_uris(root, it, settings.labels_ts)
        expected[f"images{it.subset}"].add(img.rsplit("/", 1)[-1])
        if lab is not None:
            expected[f"labels{it.subset}"].add(lab.rsplit("/", 1)[-1])
    stray = sorted(f"{sub}/{n}" for sub in SUBFOLDERS for n in present[sub] - expected[sub] if not n.startswith("."))
    if stray:
        raise ValueError(f"{root}: cannot resume, {len(stray)} files are not part of this export "
                         f"(e.g. {stray[:3]}); set existing=overwrite")
    done = set()
    for it in items:
        img, lab = _target_uris(root, it, settings.labels_ts)
        if img.rsplit("/", 1)[-1] in present[f"images{it.subset}"] and (
                lab is None or lab.rsplit("/", 1)[-1] in present[f"labels{it.subset}"]):
            done.add(it.case)
    return done


def export_nnunet(settings: ExportSettings) -> dict:
    """Write the nnU-Net v2 raw dataset described by ``settings``; returns a summary dict.

    Summary keys: ``dataset`` (folder URI), ``numTraining``, ``numTest``, ``rejected``,
    ``skipped`` (pairs kept by ``existing=resume``), ``folds``, ``seconds``, ``cases_per_s``.

    Raises:
        ValueError: bad settings, nothing to export, an existing export (``existing=error``),
            fewer groups than folds among the training cases, or every training case rejected
            (``rejects.json`` is written, ``dataset.json`` is not; the job exits 2 with one line).
    """
    t0 = time.time()
    schema = load_schema(settings.schema)
    labels = dataset_labels(schema, settings.cardiac_only)
    root = storage.join(settings.out, settings.folder_name)
    items = list_items(settings)
    tr = [it for it in items if it.subset == "Tr"]
    if not tr:
        raise ValueError(f"no training cases to export (run={settings.run}, cases={settings.cases}, "
                         f"train_splits={settings.train_splits}, test_splits={settings.test_splits})")
    n_groups = len({it.group for it in tr})
    if n_groups < settings.folds:
        raise ValueError(f"{n_groups} groups (templates / cases) among {len(tr)} training cases cannot fill "
                         f"{settings.folds} validation folds; export more, or set folds <= {n_groups}")
    done = _prepare_folder(root, items, settings)
    for sub in ("imagesTr", "labelsTr"):
        storage.makedirs(storage.join(root, sub))
    _write_json(storage.join(root, "fcas_export.json"), {"settings": asdict(settings), "complete": False})

    todo = [it for it in items if it.case not in done]
    log.info("export %s: %d cases (%d kept from an earlier run), %d workers", root, len(items), len(done), settings.workers)
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        for k, res in enumerate(pool.map(lambda it: _export_one(it, root, schema, settings), todo), 1):
            results.append(res)
            if not res["ok"]:
                log.warning("reject %s: %s", res["case"], res["reason"])
            if k % 200 == 0:
                log.info("export: %d / %d cases", k, len(todo))
    by_case = {r["case"]: r for r in results}
    rejects = [{"case": r["case"], "source": r["source"], "reason": r["reason"]} for r in results if not r["ok"]]
    kept = [it for it in items if it.case in done or by_case[it.case]["ok"]]
    kept_tr = [it for it in kept if it.subset == "Tr"]
    kept_ts = [it for it in kept if it.subset == "Ts"]
    if not kept_tr:   # an nnU-Net dataset without training cases is of no use: fail, don't write dataset.json
        _write_json(storage.join(root, "rejects.json"), rejects)
        names = {it.case for it in tr}
        first = next(r["reason"] for r in rejects if r["case"] in names)
        raise ValueError(f"no training case could be exported: all {len(tr)} were rejected (first: {first}); "
                         f"see {storage.join(root, 'rejects.json')}")

    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": len(kept_tr),
        "file_ending": FILE_ENDING,
        "name": settings.name,
        "description": "FCaS export: " + " + ".join(
            f"{what} {uri}" for what, uri in (("synthesis run", settings.run), ("prepared cases", settings.cases)) if uri),
    }
    if settings.reader_writer:
        dataset["overwrite_image_reader_writer"] = settings.reader_writer
    _write_json(storage.join(root, "dataset.json"), dataset)
    _write_json(storage.join(root, "rejects.json"), rejects)

    splits = None
    if len({it.group for it in kept_tr}) >= settings.folds:
        splits = group_kfold_splits([it.case for it in kept_tr], [it.group for it in kept_tr],
                                    settings.folds, settings.seed)
        _write_json(storage.join(root, "splits_final.json"), splits)
        if settings.preprocessed:
            _write_json(storage.join(settings.preprocessed, settings.folder_name, "splits_final.json"), splits)
    else:
        log.warning("export: too few groups left after rejects for %d folds; no splits_final.json", settings.folds)

    rows = [{**asdict(it), "labels_present": by_case.get(it.case, {}).get("labels_present")} for it in kept]
    _write_json(storage.join(root, "fcas_export.json"),
                {"settings": asdict(settings), "complete": True, "cases": rows})
    seconds = time.time() - t0
    return {
        "dataset": root,
        "numTraining": len(kept_tr),
        "numTest": len(kept_ts),
        "rejected": len(rejects),
        "skipped": len(done),
        "folds": len(splits) if splits else 0,
        "seconds": round(seconds, 2),
        "cases_per_s": round(len(todo) / seconds, 2) if seconds > 0 else None,
    }
