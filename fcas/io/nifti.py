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

The format work is nibabel's; the glue (gzip streaming, checks, kinds) is hand-written here.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from fcas.io import storage

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
_NIFTI1_SIZE = 348
_NIFTI2_SIZE = 540
_GZIP_MAGIC = b"\x1f\x8b"
_INT16 = np.iinfo(np.int16)
CODECS = ("auto", "zlib", "isal")
ISAL_LEVEL = 2   # igzip levels 0-3; at 512x512x256 level 2 costs the CPU of level 1 for 3 % fewer bytes (benchmarks/writer.py)

try:  # ISA-L's gzip: several times faster than zlib at the same format
    from isal import igzip as _igzip
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover - isal is a dependency; kept optional for minimal installs
    _igzip, _IsalError = None, zlib.error


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


class NiftiError(ValueError):
    """A file that cannot be read as a single-file NIfTI; the message names the file."""


@dataclass
class Volume:
    """A voxel grid with its geometry.

    Attributes:
        array: ``(I, J, K)`` (or ``(I, J, K, C)``) array in NIfTI axis order, dtype as stored
            (int16 HU for images, uint8 for labels, float32 for float maps).
        affine: ``(4, 4)`` float64 voxel-to-world (RAS+, mm) matrix.
    """

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must have shape (4, 4), got {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the column norms of ``affine[:3, :3]``."""
        return tuple(float(v) for v in nib.affines.voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class NiftiHeader:
    """Geometry and storage type of a NIfTI file, read without its voxel data.

    Attributes:
        shape: data shape (I, J, K[, ...]).
        dtype: stored voxel dtype (native byte order).
        affine: ``(4, 4)`` float64 best affine (sform if its code is set, else qform).
        zooms: ``pixdim`` of the spatial (and further) axes, as stored.
        version: 1 or 2 (NIfTI-1 / NIfTI-2).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    zooms: tuple[float, ...]
    version: int = 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k from the affine (column norms)."""
        return tuple(float(v) for v in nib.affines.voxel_sizes(self.affine))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=object)) if self.shape else 0

    @property
    def nbytes(self) -> int:
        return self.n_voxels * np.dtype(self.dtype).itemsize


def _err(uri, problem: str) -> NiftiError:
    return NiftiError(f"{os.fspath(uri)}: {' '.join(str(problem).split())}")


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


def _parse_header(buf: bytes, uri):
    """nibabel header object (Nifti1Header or Nifti2Header) from the first bytes of a file."""
    if len(buf) == 0:
        raise _err(uri, "empty file (0 bytes), not a NIfTI")
    if len(buf) < _NIFTI1_SIZE:
        raise _err(uri, f"not a NIfTI file: only {len(buf)} bytes, a header needs {_NIFTI1_SIZE}")
    size_le, size_be = struct.unpack("<i", buf[:4])[0], struct.unpack(">i", buf[:4])[0]
    if _NIFTI1_SIZE in (size_le, size_be):
        magic = buf[344:348]
        if magic == b"ni1\x00":
            raise _err(uri, "header of a .hdr/.img pair; only single-file NIfTI (n+1) is supported")
        if magic != b"n+1\x00":
            raise _err(uri, f"not a NIfTI-1 file: magic {magic!r}, expected b'n+1\\x00'")
        klass = nib.Nifti1Header
        block = buf[:_NIFTI1_SIZE]
    elif _NIFTI2_SIZE in (size_le, size_be):
        if len(buf) < _NIFTI2_SIZE:
            raise _err(uri, f"truncated NIfTI-2 header: {len(buf)} of {_NIFTI2_SIZE} bytes")
        if buf[4:8] != b"n+2\x00":
            raise _err(uri, f"not a NIfTI-2 file: magic {buf[4:8]!r}, expected b'n+2\\x00'")
        klass = nib.Nifti2Header
        block = buf[:_NIFTI2_SIZE]
    else:
        raise _err(uri, f"not a NIfTI file: sizeof_hdr={size_le} (first bytes {buf[:8]!r})")
    try:
        return klass(binaryblock=block, check=True)
    except (HeaderDataError, ValueError) as exc:
        raise _err(uri, f"invalid NIfTI header: {exc}") from exc


def _header_info(hdr) -> NiftiHeader:
    return NiftiHeader(
        shape=tuple(int(s) for s in hdr.get_data_shape()),
        dtype=np.dtype(hdr.get_data_dtype()).newbyteorder("="),
        affine=np.asarray(hdr.get_best_affine(), dtype=np.float64),
        zooms=tuple(float(z) for z in hdr.get_zooms()),
        version=2 if isinstance(hdr, nib.Nifti2Header) else 1,
    )


def _gunzip(data: bytes, uri) -> bytes:
    try:
        return _igzip.decompress(data) if _igzip is not None else gzip.decompress(data)
    except (EOFError, OSError, zlib.error, _IsalError) as exc:
        raise _err(uri, f"truncated or corrupt gzip stream: {exc}") from exc


def read_header(uri: str | os.PathLike) -> NiftiHeader:
    """Shape, dtype, affine and zooms of a NIfTI file, without reading its voxel data.

    Only the first 540 (decompressed) bytes are read: through a streaming ``gzip`` reader for
    compressed files (detected by content, not by name), with small read blocks on object stores.

    Raises:
        NiftiError: empty, corrupt-gzip or non-NIfTI file (message names the file).
        FileNotFoundError: no file at ``uri``.
    """
    fs, path = storage.get_fs(uri)
    opts = {} if storage.is_local(uri) else {"block_size": 1 << 16, "cache_type": "readahead"}
    try:
        fh = fs.open(path, "rb", **opts)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {os.fspath(uri)}") from exc
    with fh:
        head = fh.read(2)
        fh.seek(0)
        if head == _GZIP_MAGIC:
            try:
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    buf = gz.read(_NIFTI2_SIZE)
            except (EOFError, OSError, zlib.error) as exc:
                raise _err(uri, f"truncated or corrupt gzip stream: {exc}") from exc
        else:
            buf = fh.read(_NIFTI2_SIZE)
    return _header_info(_parse_header(buf, uri))


def read_nifti(uri: str | os.PathLike, max_voxels: int | None = None) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file (local, ``file://`` or ``s3://``) into a :class:`Volume`.

    Args:
        uri: file location; gzip is detected from the content.
        max_voxels: when given, refuse (``ValueError``) a grid with more voxels before reading
            the voxel data. Use :func:`read_header` to check grids without downloading files.

    Returns:
        ``Volume(array (I, J, K[, C]) in stored dtype and native byte order (scaled to float
        when the header sets ``scl_slope``), affine (4, 4) float64)``.

    Raises:
        NiftiError: empty, corrupt/truncated gzip, non-NIfTI, or truncated voxel data.
        ValueError: grid larger than ``max_voxels``.
    """
    if max_voxels is not None:
        info = read_header(uri)
        if info.n_voxels > max_voxels:
            raise ValueError(
                f"{os.fspath(uri)}: grid {info.shape} has {info.n_voxels} voxels, "
                f"more than max_voxels={max_voxels}"
            )
    raw = storage.read_bytes(uri)
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip(raw, uri)
    hdr = _parse_header(raw[:_NIFTI2_SIZE], uri)
    info = _header_info(hdr)
    need = int(hdr.get_data_offset()) + info.nbytes
    if len(raw) < need:
        raise _err(uri, f"truncated voxel data: {len(raw)} bytes, header {info.shape} "
                        f"{info.dtype} needs {need}")
    klass = nib.Nifti2Image if info.version == 2 else nib.Nifti1Image
    try:
        img = klass.from_bytes(raw)
        array = np.asanyarray(img.dataobj)
    except (HeaderDataError, ImageFileError, ValueError, OSError, EOFError) as exc:
        raise _err(uri, f"cannot read NIfTI: {exc}") from exc
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.float64 and np.issubdtype(info.dtype, np.integer):
        array = array.astype(np.float32)   # integers scaled by scl_slope: float32 holds their precision
    return Volume(array=np.asarray(array), affine=np.asarray(img.affine, dtype=np.float64))


_VOX_OFFSET = _NIFTI1_SIZE + 4   # header + extension flag: where a single-file NIfTI-1's voxels start
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

