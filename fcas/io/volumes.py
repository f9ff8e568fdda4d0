"""Read the volume formats prepare accepts into one convention: NIfTI, NRRD, MetaImage, DICOM series.

NIfTI (``.nii``, ``.nii.gz``) goes through :mod:`fcas.io.nifti` (nibabel). NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) and a DICOM series (a folder of slices) go through SimpleITK, whose
geometry is LPS with the array in (k, j, i) order; here it becomes nibabel's, so every format gives
the same :class:`~fcas.io.nifti.Volume` (array in (i, j, k) order, RAS+ affine)::

    affine[:3, :3] = diag(-1, -1, 1) @ direction @ diag(spacing)    affine[:3, 3] = diag(-1, -1, 1) @ origin
    array = GetArrayFromImage(image).transpose(2, 1, 0)

ITK reads local files only: a remote single file or DICOM folder is copied to a temporary folder
first. The detached-header forms (``.nhdr``, ``.mhd``) are read from local paths only, as their data
file may lie anywhere. Errors are :class:`VolumeError` (a ``ValueError``) with a one-line message
naming the file.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from dataclasses import dataclass

import numpy as np

from fcas.io import nifti, storage

__all__ = ["VolumeError", "VolumeInfo", "EXTENSIONS", "volume_kind", "structure_name", "read_info", "read_volume"]

EXTENSIONS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "itk", ".nhdr": "itk", ".mha": "itk", ".mhd": "itk"}
_DETACHED = (".nhdr", ".mhd")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


class VolumeError(ValueError):
    """A file or folder that cannot be read as a volume; the message names it."""


@dataclass(frozen=True)
class VolumeInfo:
    """Shape (I, J, K[, C]) from the header; ``affine`` (4, 4) RAS+, or None where only the voxels give it (DICOM)."""

    shape: tuple[int, ...]
    affine: np.ndarray | None


def _ext(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((e for e in EXTENSIONS if name.endswith(e)), "")


def volume_kind(uri: str) -> str:
    """``'nifti'``, ``'itk'`` or ``'dicom'`` (a folder); :class:`VolumeError` for anything else."""
    kind = EXTENSIONS.get(_ext(uri))
    if kind:
        return kind
    if storage.isdir(uri):
        return "dicom"
    if not storage.exists(uri):
        raise FileNotFoundError(f"no such file: {uri}")
    raise VolumeError(f"{uri}: unsupported format; expected {', '.join(EXTENSIONS)} or a DICOM series folder")


def structure_name(uri: str) -> str | None:
    """``heart_myocardium`` for ``.../heart_myocardium.nii.gz``; None for a name without a volume extension."""
    name, ext = uri.rstrip("/").rsplit("/", 1)[-1], _ext(uri)
    return name[: len(name) - len(ext)] if ext else None


def _sitk():
    try:
        import SimpleITK
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        raise VolumeError("reading NRRD, MetaImage or DICOM needs SimpleITK (pip install SimpleITK)") from None
    return SimpleITK


def _one_line(uri: str, err: Exception) -> VolumeError:
    text = " ".join(str(err).split())
    return VolumeError(f"{uri}: cannot read: {text[:300]}")


@contextlib.contextmanager
def _local(uri: str, kind: str):
    """A local path for ``uri``: itself, or a temporary copy of a remote file / DICOM folder."""
    if storage.is_local(uri):
        yield storage.get_fs(uri)[1]
        return
    if _ext(uri) in _DETACHED:
        raise VolumeError(f"{uri}: detached-header {_ext(uri)} files are read from local paths only; "
                          "store them as .nrrd / .mha")
    with tempfile.TemporaryDirectory(prefix="fcas-volume-") as tmp:
        if kind == "dicom":
            for child in storage.listdir(uri):
                if not storage.isdir(child):
                    with open(os.path.join(tmp, posixpath.basename(child.rstrip("/"))), "wb") as fh:
                        fh.write(storage.read_bytes(child))
            yield tmp
        else:
            path = os.path.join(tmp, "volume" + _ext(uri))
            with open(path, "wb") as fh:
                fh.write(storage.read_bytes(uri))
            yield path


def _series_files(sitk, folder: str, uri: str) -> list[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        raise VolumeError(f"{uri}: a folder without a DICOM series (expected one series of slices)")
    if len(ids) > 1:
        raise VolumeError(f"{uri}: {len(ids)} DICOM series in one folder; give one series per folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0]))


def _itk_affine(spacing, origin, direction) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = _LPS_RAS @ np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    aff[:3, 3] = _LPS_RAS @ np.asarray(origin, dtype=np.float64)
    return aff


def read_info(uri: str) -> VolumeInfo:
    """Shape (and affine) from the header, without reading voxel data (DICOM: the first slice and the slice count)."""
    uri = os.fspath(uri)
    kind = volume_kind(uri)
    if kind == "nifti":
        hdr = nifti.read_header(uri)
        return VolumeInfo(tuple(int(s) for s in hdr.shape), hdr.affine)
    sitk = _sitk()
    with _local(uri, kind) as path:
        try:
            reader = sitk.ImageFileReader()
            files = _series_files(sitk, path, uri) if kind == "dicom" else [path]
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise _one_line(uri, err) from None
        size = tuple(int(s) for s in reader.GetSize())
        comps = int(reader.GetNumberOfComponents())
        if kind == "dicom":
            return VolumeInfo(size[:2] + (len(files),) + ((comps,) if comps > 1 else ()), None)
        shape = size + ((comps,) if comps > 1 else ())
        affine = _itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()) if len(size) == 3 else None
        return VolumeInfo(shape, affine)


def read_volume(uri: str) -> nifti.Volume:
    """The voxels (stored dtype, (i, j, k) order) and RAS+ affine of a NIfTI, NRRD, MetaImage file or DICOM folder."""
    uri = os.fspath(uri)
    kind = volume_kind(uri)
    if kind == "nifti":
        return nifti.read_nifti(uri)
    sitk = _sitk()
    with _local(uri, kind) as path:
        try:
            if kind == "dicom":
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(_series_files(sitk, path, uri))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(path)
        except RuntimeError as err:
            raise _one_line(uri, err) from None
    if image.GetDimension() != 3:
        raise VolumeError(f"{uri}: not a 3D volume ({image.GetDimension()}D)")
    array = sitk.GetArrayFromImage(image)   # (k, j, i[, c]), a copy
    array = array.transpose((2, 1, 0) + tuple(range(3, array.ndim)))
    return nifti.Volume(array, _itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection()))
