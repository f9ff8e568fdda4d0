"""Builds a directory of image/label NIfTI pairs: good phantom cases plus one of each bad kind.

Written with nibabel directly (not through fcas.io) so the corpus does not share code with what
it tests. ``BAD_KINDS`` maps each bad case key to a word its reject reason must contain.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from fcas.phantom import make_case

# case key -> a fragment the one-line reject reason must contain
BAD_KINDS = {
    "truncated": "truncated",
    "zerobyte": "empty",
    "notnifti": "not a nifti",
    "flat2d": "not a 3d",
    "vol4d": "not a 3d",
    "shapemismatch": "shape",
    "affinemismatch": "affine",
    "nanimage": "non-finite",
    "floatlabel": "float",
    "unknownids": "not in schema",
    "noheart": "no heart",
    "nothu": "hu range",
    "huge": "over the limit",
}


def _save(arr, affine, path: Path, dtype) -> None:
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _good(seed: int, shape=(40, 44, 36), spacing=(3.0, 2.5, 3.5)):
    case = make_case(seed, shape=shape, spacing=spacing)
    return case.image, case.label, case.affine


def write_corpus(root: Path, n_good: int = 3, shape=(40, 44, 36), spacing=(3.0, 2.5, 3.5)) -> dict[str, str]:
    """Write the corpus under ``root``; returns {case key: 'good' | bad kind}.

    ``shape`` / ``spacing``: the source grid of every case (scripts/make_bad_corpus.py writes a
    coarser one for the committed copy in tests/data/bad_inputs/).
    """
    root.mkdir(parents=True, exist_ok=True)
    kinds = {}

    def pair(key, image, label, affine, idtype=np.int16, ldtype=np.uint8, laffine=None):
        _save(image, affine, root / f"{key}_image.nii.gz", idtype)
        _save(label, affine if laffine is None else laffine, root / f"{key}_label.nii.gz", ldtype)

    for i in range(n_good):
        image, label, affine = _good(100 + i, shape, spacing)
        if i == 1:  # LPS-like orientation: flip the first two axes; prepare must reorient to RAS
            image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [(image.shape[0] - 1), (image.shape[1] - 1)]
            affine = affine @ flip
        pair(f"good{i}", image, label, affine)
        kinds[f"good{i}"] = "good"

    image, label, affine = _good(7, shape, spacing)
    # unreadable: a gzip stream cut in half; zero bytes; a text file with a .nii.gz name
    pair("truncated", image, label, affine)
    data = (root / "truncated_image.nii.gz").read_bytes()
    (root / "truncated_image.nii.gz").write_bytes(data[: len(data) // 2])
    pair("zerobyte", image, label, affine)
    (root / "zerobyte_image.nii.gz").write_bytes(b"")
    pair("notnifti", image, label, affine)
    (root / "notnifti_image.nii.gz").write_bytes(gzip.compress(b"this is a csv,not,an,image\n" * 40))
    mid = image.shape[2] // 2
    pair("flat2d", image[:, :, mid], label[:, :, mid], affine)
    pair("vol4d", np.stack([image, image], -1), np.stack([label, label], -1), affine)
    pair("shapemismatch", image, label[:, :, :-2], affine)
    shifted = affine.copy()
    shifted[:3, 3] += 10.0
    pair("affinemismatch", image, label, affine, laffine=shifted)
    nan = image.astype(np.float32)
    nan[5, 5, 5] = np.nan
    pair("nanimage", nan, label, affine, idtype=np.float32)
    pair("floatlabel", image, label.astype(np.float32), affine, ldtype=np.float32)
    unknown = label.copy()
    unknown[0, 0, 0] = 42
    pair("unknownids", image, unknown, affine)
    noheart = np.where(np.isin(label, list(range(1, 9))), 11, label)
    pair("noheart", image, noheart, affine)
    pair("nothu", (image.astype(np.float32) + 1024) / 4096.0, label, affine, idtype=np.float32)
    # a header declaring a 10^12-voxel grid in front of a few bytes of data
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((10000, 10000, 10000))
    hdr.set_sform(affine, code=1)
    (root / "huge_image.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64))
    _save(label, affine, root / "huge_label.nii.gz", np.uint8)
    # an image without a label: a listing-stage reject
    _save(image, affine, root / "orphan_image.nii.gz", np.int16)
    kinds.update({k: k for k in BAD_KINDS})
    kinds["orphan"] = "orphan"
    return kinds
