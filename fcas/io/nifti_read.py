"""Reading NIfTI volumes, header checks first: the read side of :mod:`fcas.io.nifti` (re-exported there).

:func:`read_header` parses and checks the header alone (streaming only the first gzip block), so a
corrupt file or a huge declared grid is refused before voxel data are fetched; :func:`read_nifti`
reads the whole file with the same checks. Every refusal is a :class:`NiftiError` naming the file.
Also holds the ISA-L handle :data:`igzip` (None without python-isal) that reading and writing share.
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

NIFTI1_SIZE = 348   # bytes of a NIfTI-1 header
_NIFTI2_SIZE = 540
_GZIP_MAGIC = b"\x1f\x8b"

try:  # ISA-L's gzip: several times faster than zlib at the same format
    from isal import igzip
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover - isal is a dependency; kept optional for minimal installs
    igzip, _IsalError = None, zlib.error


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


def _parse_header(buf: bytes, uri):
    """nibabel header object (Nifti1Header or Nifti2Header) from the first bytes of a file."""
    if len(buf) == 0:
        raise _err(uri, "empty file (0 bytes), not a NIfTI")
    if len(buf) < NIFTI1_SIZE:
        raise _err(uri, f"not a NIfTI file: only {len(buf)} bytes, a header needs {NIFTI1_SIZE}")
    size_le, size_be = struct.unpack("<i", buf[:4])[0], struct.unpack(">i", buf[:4])[0]
    if NIFTI1_SIZE in (size_le, size_be):
        magic = buf[344:348]
        if magic == b"ni1\x00":
            raise _err(uri, "header of a .hdr/.img pair; only single-file NIfTI (n+1) is supported")
        if magic != b"n+1\x00":
            raise _err(uri, f"not a NIfTI-1 file: magic {magic!r}, expected b'n+1\\x00'")
        klass = nib.Nifti1Header
        block = buf[:NIFTI1_SIZE]
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
        return igzip.decompress(data) if igzip is not None else gzip.decompress(data)
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
