"""NIfTI volumes on any fsspec URI: read, read the header only, write atomically.

* :func:`read_nifti` -> :class:`Volume` (voxel array in NIfTI (i, j, k) order + 4x4 RAS+ affine).
* :func:`read_header` -> :class:`NiftiHeader` (shape, dtype, affine, zooms) without reading voxel
  data: for ``.nii.gz`` only the first compressed block is streamed through ``gzip``, so a header
  declaring a 10^12-voxel grid is refused before anything is allocated.
* :func:`write_nifti` stores one of three kinds: ``"image"`` (CT in HU, int16: rounded and
  clipped to the int16 range), ``"label"`` (uint8; values outside 0..255 are refused) and
  ``"float"`` (float32, e.g. confidence maps). The image is serialized in memory with nibabel
  (``to_bytes``) and written with :func:`fcas.io.storage.atomic_write_bytes`.

Compression (``.nii.gz``): ``codec="auto"`` uses ISA-L's ``igzip`` (python-isal, level
:data:`ISAL_LEVEL`) when it is installed and zlib level 1 otherwise. Both write standard gzip
members (RFC 1952): any gzip reader (nibabel, SimpleITK, ``gunzip``) decompresses either to the
same bytes; ``benchmarks/writer.py`` measures time and size of the two side by side.

Geometry: qform and sform are both set from the affine with code 1 (scanner-anatomical) and
``xyzt_units`` = mm. NIfTI-1 stores the affine (``srow_*``) and zooms (``pixdim``) as float32, so
a written affine is read back exactly as ``affine.astype(float32).astype(float64)``: bit-exact for
float32-representable values (0.5, 0.75, 2.5, ...), within ~6e-8 relative otherwise. Image and
label written with the same affine therefore always share one grid.

Corrupt input raises :class:`NiftiError` (a ``ValueError``) whose one-line message names the file:
empty file, truncated or corrupt gzip, not a NIfTI header, truncated voxel data.

Reading (:func:`read_nifti`, :func:`read_header`, the header checks) is :mod:`fcas.io.nifti_read`,
re-exported here; this module writes.

The format work is nibabel's; the glue (gzip streaming, checks, kinds) is hand-written here.
"""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np

from fcas.io import storage
from fcas.io.nifti_read import NIFTI1_SIZE, NiftiError, NiftiHeader, Volume, read_header, read_nifti
from fcas.io.nifti_read import igzip as _igzip

__all__ = [
    "NiftiError",
    "Volume",
    "NiftiHeader",
    "KINDS",
    "read_nifti",
    "read_header",
    "write_nifti",
    "gzip_bytes",
    "CODECS",
]

KINDS = ("image", "label", "float", "fraction")
FRACTION_LEVELS = 255   # "fraction" volumes (confidence maps): uint8 steps of 1/255, scl_slope = 1/255
_INT16 = np.iinfo(np.int16)
CODECS = ("auto", "zlib", "isal")
ISAL_LEVEL = 2   # igzip levels 0-3; at 512x512x256 level 2 costs the CPU of level 1 for 3 % fewer bytes (benchmarks/writer.py)


def gzip_bytes(payload: bytes, codec: str = "auto", level: int | None = None) -> bytes:
    """One gzip member of ``payload`` (mtime 0: the same bytes give the same file).

    ``codec``: 'isal' (ISA-L igzip, levels 0-3, default :data:`ISAL_LEVEL`), 'zlib' (levels 1-9,
    default 1) or 'auto' (isal when installed, else zlib).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown gzip codec {codec!r}; use one of {CODECS}")
    if codec == "auto":
        codec = "isal" if _igzip is not None else "zlib"
    if codec == "isal":
        if _igzip is None:
            raise ValueError("codec 'isal' needs the python-isal package (pip install isal)")
        return _igzip.compress(payload, compresslevel=ISAL_LEVEL if level is None else level, mtime=0)
    return gzip.compress(payload, compresslevel=1 if level is None else level, mtime=0)


def _check_affine(affine) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {aff.shape}")
    if not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be finite, got {aff.tolist()}")
    if not np.allclose(aff[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine last row must be [0, 0, 0, 1], got {aff[3].tolist()}")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine is singular: {aff[:3, :3].tolist()}")
    return aff


_VOX_OFFSET = NIFTI1_SIZE + 4   # header + extension flag: where a single-file NIfTI-1's voxels start
_CHUNK = 1 << 18   # elements per cache-sized chunk of the per-voxel conversions


def _fraction_steps(a: np.ndarray, clip: bool = False, uri="") -> np.ndarray:
    """``rint(a * 255)`` as uint8, exactly as in float64, at float32 cost and in cache-sized chunks:
    float32 rounds the same except within float32 error of a half step; those few voxels are
    redone in float64. Values outside [0, 1] are clipped (``clip``) or refused (``ValueError``)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(flat.size, np.uint8)
    for s in range(0, flat.size, _CHUNK):
        x = flat[s:s + _CHUNK].astype(np.float32)
        if clip:
            np.clip(x, 0.0, 1.0, out=x)
        elif x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{os.fspath(uri)}: fraction values must lie in [0, 1], got range "
                             f"[{flat.min()}, {flat.max()}]")
        p = x * np.float32(FRACTION_LEVELS)
        o = np.rint(p).astype(np.uint8)
        near = np.abs(p - np.floor(p) - np.float32(0.5)) < np.float32(1e-3)
        if near.any():
            o[near] = np.rint(np.clip(flat[s:s + _CHUNK][near].astype(np.float64), 0, 1) * FRACTION_LEVELS)
        out[s:s + _CHUNK] = o
    return out.reshape(np.shape(a))


def _fortran_bytes_into(buf: memoryview, a: np.ndarray) -> None:
    """Write ``a``'s bytes (any memory layout) in Fortran (NIfTI) order into ``buf``: a blocked transpose
    for 3D arrays (3x faster than ``tobytes(order="F")``, which walks a C-ordered source with a stride
    of a whole plane)."""
    if a.ndim != 3 or a.flags.f_contiguous:
        buf[:] = a.tobytes(order="F")
        return
    i, j, k = a.shape
    out = np.frombuffer(buf, dtype=a.dtype).reshape(k, j, i)
    bk = max(1, 128 // a.dtype.itemsize)
    for k0 in range(0, k, bk):
        for j0 in range(0, j, 4):
            out[k0:k0 + bk, j0:j0 + 4, :] = a[:, j0:j0 + 4, k0:k0 + bk].transpose(2, 1, 0)


def _to_kind(array: np.ndarray, kind: str, uri, clip: bool = False) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{os.fspath(uri)}: array dtype {a.dtype} is not numeric")
    if kind == "float":
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating) and a.size and not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ValueError(f"{os.fspath(uri)}: {bad} non-finite values in a {kind!r} array")
    if kind == "fraction":
        return _fraction_steps(a, clip, uri)
    if kind == "image":
        if a.dtype == np.int16:
            return a
        if np.issubdtype(a.dtype, np.floating):
            a = np.rint(a)
        return np.clip(a, _INT16.min, _INT16.max).astype(np.int16)
    # label
    if a.size:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{os.fspath(uri)}: label values must lie in 0..255, got range [{lo}, {hi}]"
            )
        if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.rint(a)):
            raise ValueError(f"{os.fspath(uri)}: label array holds non-integer values")
    return a.astype(np.uint8, copy=False)


def nifti_image(data: np.ndarray, affine: np.ndarray, kind: str) -> nib.Nifti1Image:
    """The NIfTI-1 image :func:`write_nifti` stores for ``data`` (already of ``kind``'s dtype): qform and
    sform from ``affine`` (code 1), mm units, the label intent, the fraction kind's ``scl_slope``."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if kind == "label":
        img.header.set_intent("label")
    if kind == "fraction":
        img.header.set_slope_inter(1.0 / FRACTION_LEVELS, 0.0)
    return img


def _nifti_bytes(img, data: np.ndarray) -> bytes:
    """Single-file NIfTI-1 bytes of ``img`` (whose array is ``data``): what ``img.to_bytes()`` gives."""
    hdr = img.header.copy()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr["vox_offset"] = _VOX_OFFSET
    if not np.isfinite(hdr["scl_slope"]):   # nibabel's writer stores "no scaling" as slope 1, intercept 0
        hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    head = hdr.binaryblock + b"\x00" * 4   # the empty extension flag
    buf = bytearray(_VOX_OFFSET + data.nbytes)
    buf[:len(head)] = head
    _fortran_bytes_into(memoryview(buf)[_VOX_OFFSET:], data)
    return bytes(buf)


def write_nifti(
    uri: str | os.PathLike,
    array,
    affine,
    kind: str = "image",
    compresslevel: int | None = None,
    codec: str = "auto",
    clip: bool = False,
) -> None:
    """Write ``array`` with ``affine`` as a single-file NIfTI-1, atomically.

    Args:
        uri: destination ending in ``.nii`` or ``.nii.gz`` (gzip); local, ``file://`` or ``s3://``.
        array: ``(I, J, K)`` or ``(I, J, K, C)`` array (numpy or anything ``np.asarray`` takes).
        affine: ``(4, 4)`` voxel-to-world matrix (RAS+, mm).
        kind: ``"image"`` -> int16 HU (float input rounded, all input clipped to the int16
            range; NaN refused); ``"label"`` -> uint8 (values outside 0..255 or non-integer
            refused); ``"float"`` -> float32; ``"fraction"`` -> values in [0, 1] stored as uint8
            in steps of 1/255 with ``scl_slope`` = 1/255 (read back as float32, error <= 1/510).
        compresslevel: gzip level for ``.nii.gz`` (None: the codec's fast default, see :func:`gzip_bytes`).
        codec: 'auto' | 'isal' | 'zlib' (:func:`gzip_bytes`).
        clip: ``"fraction"`` only: clip values to [0, 1] instead of refusing them.

    The bytes are those nibabel's ``to_bytes`` writes (header from nibabel, voxels in Fortran
    order), built without its per-array copies: the header, then a blocked transpose straight
    into one buffer.

    Raises:
        ValueError: bad suffix, kind, shape, affine or values; nothing is written then.
    """
    name = os.fspath(uri)
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        compress = True
    elif lower.endswith(".nii"):
        compress = False
    else:
        raise ValueError(f"{name}: NIfTI file names must end in .nii or .nii.gz")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if codec not in CODECS:
        raise ValueError(f"unknown gzip codec {codec!r}; use one of {CODECS}")
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"{name}: expected a 3D (I, J, K) or 4D (I, J, K, C) array, "
                         f"got shape {arr.shape}")
    aff = _check_affine(affine)
    data = _to_kind(arr, kind, uri, clip)

    img = nifti_image(data, aff, kind)
    payload = _nifti_bytes(img, data)
    if compress:
        payload = gzip_bytes(payload, codec, compresslevel)
    storage.atomic_write_bytes(uri, payload)
