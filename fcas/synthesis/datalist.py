"""A synthesis run as a MONAI datalist and a MONAI ``Dataset``: load a run in three lines.

    from fcas.synthesis.datalist import run_dataset
    ds = run_dataset("outputs/run1")                  # or "s3://lab/fcas/syn-001"
    item = ds[0]   # {"image", "label", "confidence"}: (1, I, J, K) MetaTensors, plus "id"

* :func:`run_datalist` -> ``{"training": [{"image", "label", "confidence", "id"}, ...]}``, one entry
  per manifest row (sorted by sample id) with absolute URIs resolved against the run root it is
  given, so a copied run lists its new place.
* :func:`write_datalist` writes ``<out>/datalist.json`` with paths relative to the run (the Medical
  Segmentation Decathlon convention): the file stays valid when the run is copied, and
  ``monai.data.load_decathlon_datalist("<out>/datalist.json")`` resolves it against its folder.
  Command line: ``python -m fcas.synthesis.datalist RUN``.
* :func:`run_dataset`: ``monai.data.Dataset`` over :func:`run_datalist` with ``LoadImaged`` on the
  three volumes; object-store runs (``s3://``) are read through fsspec (:class:`FsspecNibabelReader`).

Thin glue over the run's manifest and MONAI's own Dataset / LoadImaged / NibabelReader.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Sequence

import nibabel as nib
from monai.data import Dataset, NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import Compose, LoadImaged
from monai.utils import ensure_tuple

from fcas.io import storage
from fcas.synthesis.outputs import DATALIST_FILE, read_run_manifest, sample_name

__all__ = ["KEYS", "DATALIST_FILE", "run_datalist", "write_datalist", "FsspecNibabelReader", "run_dataset", "main"]

KEYS = {"image": "image_uri", "label": "label_uri", "confidence": "confidence_uri"}   # datalist key -> column


def run_datalist(out: str | os.PathLike, relative: bool = False) -> dict[str, Any]:
    """``{"training": [{"image", "label", "confidence", "id"}], "numTraining"}`` of the run at ``out``.

    ``id`` is the sample's file stem (``s00000012``). ``relative``: paths as the manifest stores them
    (relative to ``out``; older runs' absolute URIs stay absolute) instead of resolved absolute URIs.

    Raises:
        ValueError: the run has no manifest rows.
    """
    out = os.fspath(out)
    table = read_run_manifest(out, resolve=not relative)
    if table.num_rows == 0:
        raise ValueError(f"synthesis run {out}: no manifest rows under {storage.join(out, 'manifest')}")
    rows = sorted(table.select(["sample_id", *KEYS.values()]).to_pylist(), key=lambda r: r["sample_id"])
    training = [{**{k: r[col] for k, col in KEYS.items()}, "id": sample_name(r["sample_id"])} for r in rows]
    return {"training": training, "numTraining": len(training)}


def write_datalist(out: str | os.PathLike) -> tuple[str, int]:
    """Write ``<out>/datalist.json`` (paths relative to ``out``, atomically); returns its URI and the sample count."""
    out = os.fspath(out)
    uri = storage.join(out, DATALIST_FILE)
    doc = {"name": "FCaS synthesis run", "tensorImageSize": "3D", **run_datalist(out, relative=True)}
    storage.atomic_write_bytes(uri, (json.dumps(doc, indent=1) + "\n").encode())
    return uri, doc["numTraining"]


class FsspecNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` for any fsspec URI (``s3://`` included): the file's bytes come through
    :mod:`fcas.io.storage` (endpoint and credentials from the environment), then nibabel parses them."""

    def read(self, data, **kwargs):
        names = ensure_tuple(data)
        self.filenames = names
        images = []
        for name in names:
            raw = storage.read_bytes(name)
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            images.append(correct_nifti_header_if_necessary(nib.Nifti1Image.from_bytes(raw)))
        return images if len(images) > 1 else images[0]


def run_dataset(out: str | os.PathLike, transforms: Callable | Sequence[Callable] | None = None,
                keys: Sequence[str] = tuple(KEYS)) -> Dataset:
    """``monai.data.Dataset`` of the run at ``out``: ``LoadImaged(keys)`` (channel first), then ``transforms``.

    Items: ``image`` (HU), ``label`` (class ids), ``confidence`` ([0, 1]) as float32 ``(1, I, J, K)``
    MetaTensors (affine in their meta), and ``id``. Runs on a plain local path use MONAI's ``NibabelReader``,
    URIs (``s3://``, ``file://``) :class:`FsspecNibabelReader`.
    """
    out = os.fspath(out)
    reader = NibabelReader() if "://" not in out else FsspecNibabelReader()
    load = LoadImaged(keys=list(keys), reader=reader, ensure_channel_first=True, expanduser=False)
    extra = [] if transforms is None else list(transforms) if isinstance(transforms, Sequence) else [transforms]
    return Dataset(data=run_datalist(out)["training"], transform=Compose([load, *extra]))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fcas.synthesis.datalist RUN``: write ``RUN/datalist.json``; a user mistake is one line, exit 2."""
    import argparse

    from fcas.cli import user_errors

    parser = argparse.ArgumentParser(prog="python -m fcas.synthesis.datalist", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="synthesis run folder (local path or s3://...)")
    args = parser.parse_args(argv)

    @user_errors("datalist")
    def write() -> None:
        uri, n = write_datalist(args.run)
        print(f"datalist: {n} samples -> {uri}")

    write()


if __name__ == "__main__":
    main()
