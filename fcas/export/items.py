"""What an nnU-Net export holds (:mod:`fcas.export.nnunet`): its settings, the dataset folder's name and
labels, the case names, and the list of items to export (synthesis samples and prepared cases) with the group
each belongs to for the folds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from fcas.io import manifest, storage
from fcas.labels import LabelSchema
from fcas.settings import build

__all__ = ["ExportSettings", "ExportItem", "settings_from_dict", "dataset_folder_name", "dataset_labels", "case_name",
           "list_items", "FILE_ENDING", "CHANNEL", "EXISTING_MODES", "GROUP_BY", "SUBFOLDERS", "OWN_FILES"]

FILE_ENDING = ".nii.gz"
CHANNEL = "0000"
EXISTING_MODES = ("error", "overwrite", "resume")
GROUP_BY = ("template", "template_reference")
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
OWN_FILES = ("dataset.json", "splits_final.json", "rejects.json", "fcas_export.json")
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class ExportSettings:
    """What to export and where.

    Attributes:
        out: the ``nnUNet_raw`` folder (any fsspec URI); the dataset folder is created inside.
        dataset_id: 1..999, written as three digits (custom datasets: pick an unused id, >= 500
            keeps clear of nnU-Net's published ones).
        name: dataset name, ``[A-Za-z0-9][A-Za-z0-9_-]*``.
        run: a synthesis run folder (``<run>/manifest/*.parquet``) or None.
        cases: prepared cases (``cases.parquet`` or the folder holding it) or None.
        train_splits: prepared splits exported to imagesTr; None = every split not in ``test_splits``.
        test_splits: prepared splits exported to imagesTs (not part of numTraining or the folds).
        labels_ts: also write the test cases' labels to ``labelsTs``.
        schema: label schema name or path (``configs/labels``).
        cardiac_only: keep the eight cardiac classes, all other ids -> background.
        folds: number of cross-validation folds in ``splits_final.json``.
        seed: seed of the fold assignment.
        reader_writer: ``overwrite_image_reader_writer`` of dataset.json (e.g. ``NibabelIOWithReorient``),
            None to let nnU-Net choose.
        preprocessed: an ``nnUNet_preprocessed`` folder to receive a copy of ``splits_final.json``.
        existing: what to do when the dataset folder already holds an export: ``error``,
            ``overwrite`` (remove this exporter's files and folders first) or ``resume`` (keep the
            pairs already written, refuse files no longer part of the export).
        group_by: ``template`` (a sample's fold group is its template) or ``template_reference``
            (template and reference ids linked into one group).
        workers: threads copying cases.
        syn_prefix / real_prefix: case name prefixes.
    """

    out: str
    dataset_id: int = 501
    name: str = "FCaS"
    run: str | None = None
    cases: str | None = None
    train_splits: tuple[str, ...] | None = None
    test_splits: tuple[str, ...] = ("test",)
    labels_ts: bool = True
    schema: str = "cardiac"
    cardiac_only: bool = True
    folds: int = 5
    seed: int = 12345
    reader_writer: str | None = None
    preprocessed: str | None = None
    existing: str = "error"
    group_by: str = "template"
    workers: int = 4
    syn_prefix: str = "syn"
    real_prefix: str = "real"

    def __post_init__(self) -> None:
        if not 1 <= int(self.dataset_id) <= 999:
            raise ValueError(f"dataset_id must be in 1..999 (three digits), got {self.dataset_id}")
        if not _DATASET_NAME.match(str(self.name)):
            raise ValueError(f"dataset name must match [A-Za-z0-9][A-Za-z0-9_-]*, got {self.name!r}")
        if self.run is None and self.cases is None:
            raise ValueError("nothing to export: give a synthesis run, prepared cases, or both")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.existing not in EXISTING_MODES:
            raise ValueError(f"existing must be one of {EXISTING_MODES}, got {self.existing!r}")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {self.group_by!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        for p in (self.syn_prefix, self.real_prefix):
            if not p or _BAD_NAME_CHARS.search(p):
                raise ValueError(f"case name prefixes must be non-empty [A-Za-z0-9_-], got {p!r}")
        if self.syn_prefix == self.real_prefix:
            raise ValueError(f"syn_prefix and real_prefix must differ, both are {self.syn_prefix!r}")
        if self.train_splits is not None and set(self.train_splits) & set(self.test_splits):
            raise ValueError(f"splits {sorted(set(self.train_splits) & set(self.test_splits))} are in "
                             f"both train_splits and test_splits")

    @classmethod
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: ``test_splits: null`` is none, and an empty, ``"null"`` or
        ``"None"`` folder is no folder."""
        if "test_splits" in d and d["test_splits"] is None:
            d["test_splits"] = ()
        for k in ("run", "cases", "reader_writer", "preprocessed"):
            if d.get(k) in ("", "null", "None"):
                d[k] = None
        return d

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


def settings_from_dict(d: Mapping[str, Any]) -> ExportSettings:
    """:class:`ExportSettings` from a plain mapping (a resolved Hydra config); unknown keys are refused,
    ``hydra`` ignored."""
    return build(ExportSettings, d, ignore=("hydra",))


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset%03d_<name>``, the folder nnU-Net v2 finds by id."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_labels(schema: LabelSchema, cardiac_only: bool) -> dict[str, int]:
    """``labels`` of dataset.json: class name -> id, background 0, ids consecutive.

    Raises:
        ValueError: when the kept ids are not 0..K (nnU-Net requires consecutive ids).
    """
    if cardiac_only:
        labels = {"background": 0, **{n: schema.id(n) for n in schema.cardiac}}
    else:
        labels = dict(schema.classes)
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    ids = list(labels.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"nnU-Net needs consecutive label ids 0..K; schema {schema.name!r} "
                         f"(cardiac_only={cardiac_only}) gives {ids}")
    return labels


def case_name(prefix: str, key: str) -> str:
    """``<prefix>_<key>`` with every run of characters outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    clean = _BAD_NAME_CHARS.sub("_", str(key)).strip("_-")
    if not clean:
        raise ValueError(f"cannot derive a case name from {key!r}")
    return f"{prefix}_{clean}"


@dataclass(frozen=True)
class ExportItem:
    """One case to export: its name, source files, fold group and subset (``Tr`` or ``Ts``)."""

    case: str
    kind: str            # "syn" | "real"
    image_uri: str
    label_uri: str
    group: str
    subset: str = "Tr"
    split: str | None = None
    reference: str | None = None   # a sample's reference_id (its label map's origin)


def _cases_table_uri(cases: str) -> str:
    if cases.endswith(".parquet") or not storage.isdir(cases):
        return cases
    return storage.join(cases, "cases.parquet")


def list_items(settings: ExportSettings) -> list[ExportItem]:
    """Every case the export will try, sorted by name.

    Raises:
        ValueError: an empty run manifest / cases table, or two sources giving the same case name.
    """
    items: list[ExportItem] = []
    if settings.run is not None:
        from fcas.synthesis.outputs import read_run_manifest, sample_name

        table = read_run_manifest(settings.run)
        if table.num_rows == 0:
            raise ValueError(f"synthesis run {settings.run}: no manifest rows under {settings.run}/manifest")
        for r in table.select(["sample_id", "template_id", "reference_id", "image_uri", "label_uri"]).to_pylist():
            items.append(ExportItem(case=case_name(settings.syn_prefix, sample_name(r["sample_id"])), kind="syn",
                                    image_uri=r["image_uri"], label_uri=r["label_uri"], group=str(r["template_id"]),
                                    reference=str(r["reference_id"])))
    if settings.cases is not None:
        uri = _cases_table_uri(settings.cases)
        table = manifest.read_cases(uri)   # files resolved against the manifest's folder
        if table.num_rows == 0:
            raise ValueError(f"prepared cases {uri}: no rows")
        for r in table.select(["case_id", "image_uri", "label_uri", "split"]).to_pylist():
            split = r["split"]
            if split in settings.test_splits:
                subset = "Ts"
            elif settings.train_splits is None or split in settings.train_splits:
                subset = "Tr"
            else:
                continue
            items.append(ExportItem(case=case_name(settings.real_prefix, r["case_id"]), kind="real",
                                    image_uri=r["image_uri"], label_uri=r["label_uri"], group=str(r["case_id"]),
                                    subset=subset, split=split))
    seen: dict[str, ExportItem] = {}
    for it in items:
        if it.case in seen:
            raise ValueError(f"case name {it.case!r} given twice: {seen[it.case].image_uri} and {it.image_uri}")
        seen[it.case] = it
    items = sorted(items, key=lambda it: it.case)
    if settings.group_by == "template_reference":
        items = _link_references(items)
    return items


def _link_references(items: list[ExportItem]) -> list[ExportItem]:
    """Items with ``group`` replaced by the connected component of template and reference ids."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for it in items:
        find(it.group)
        if it.reference is not None:
            a, b = find(it.group), find(it.reference)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [replace(it, group=find(it.group)) for it in items]
