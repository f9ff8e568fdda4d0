"""prepare's label recipe and input formats, on real files written with nibabel and SimpleITK (not fcas.io).

The FCaS recipe for ImageCAS: its coronary label + TotalSegmentator's heartchambers_highres (a per-structure
folder or one multilabel file) + its total task, merged by the schema's priority into exactly the phantom's
label; a label that cannot be mapped (a whole-heart binary mask, foreign ids, a file off the image's grid)
is refused with a reason naming the file. NRRD, MetaImage and DICOM-series copies prepare like their NIfTI.
"""
import contextlib
import locale
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from fcas.config_files import CONFIG_DIR
from fcas.io import manifest, volumes
from fcas.labels import default_schema
from fcas.phantom import make_case
from fcas.prepare import CaseRejected, PrepareSettings, prepare_pair, validate_case, validate_pair
from fcas.presets import load_preset

sitk = pytest.importorskip("SimpleITK")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = default_schema()
TINY = load_preset("tiny")
RECIPE = dict(OmegaConf.load(CONFIG_DIR / "prepare.yaml").label_mapping)   # the shipped per-source mappings
ID = SCHEMA.classes
# TotalSegmentator v2 heartchambers_highres: (file name, multilabel id) of each of our chamber classes
CHAMBERS = {"lv_myocardium": ("heart_myocardium", 1), "left_atrium": ("heart_atrium_left", 2),
            "left_ventricle": ("heart_ventricle_left", 3), "right_atrium": ("heart_atrium_right", 4),
            "right_ventricle": ("heart_ventricle_right", 5), "ascending_aorta": ("aorta", 6),
            "pulmonary_artery": ("pulmonary_artery", 7)}
# TotalSegmentator v2 total: two of its structures (name, id) for each of our surroundings
TOTAL = {"lung": (("lung_upper_lobe_left", 10), ("lung_lower_lobe_right", 14)),
         "bone": (("rib_left_1", 92), ("vertebrae_T5", 39)),
         "soft_tissue": (("superior_vena_cava", 62), ("liver", 5))}


def _save(path: Path, array, affine, dtype=np.uint8) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _case(seed: int = 2):
    return make_case(seed, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))   # all 11 classes present


def _chambers(label: np.ndarray) -> dict[str, np.ndarray]:
    """TotalSegmentator-like structure masks; its myocardium also covers the coronaries (priority must undo it)."""
    masks = {name: label == ID[ours] for ours, (name, _) in CHAMBERS.items()}
    masks["heart_myocardium"] |= label == ID["coronary_arteries"]
    return masks


def _total(label: np.ndarray) -> dict[str, np.ndarray]:
    """TotalSegmentator-like total masks: its whole heart (soft tissue) under the cardiac classes, each
    surrounding class split over two structures, plus an empty file as TotalSegmentator writes them."""
    odd = (np.indices(label.shape)[0] % 2).astype(bool)
    masks = {"heart": np.isin(label, SCHEMA.cardiac_ids), "spleen": np.zeros(label.shape, bool)}
    for ours, ((a, _), (b, _)) in TOTAL.items():
        masks[a], masks[b] = (label == ID[ours]) & odd, (label == ID[ours]) & ~odd
    return masks


def write_recipe_case(root: Path, key: str, case, chambers: str = "folder", surroundings: str | None = "folder"):
    """One ImageCAS case in the recipe's layout; returns (image, {source: file or folder})."""
    ts_ids = {name: i for name, i in CHAMBERS.values()} | {"heart": 51, "spleen": 1}
    ts_ids |= {name: i for pair in TOTAL.values() for name, i in pair}
    image = _save(root / f"{key}.img.nii.gz", case.image, case.affine, np.int16)
    labels = {"coronary": _save(root / f"{key}.label.nii.gz", case.label == ID["coronary_arteries"], case.affine)}
    for source, task, masks, form in (("chambers", "heartchambers_highres", _chambers(case.label), chambers),
                                      ("surroundings", "total", _total(case.label), surroundings)):
        if form == "folder":
            for name, mask in masks.items():
                _save(root / task / key / f"{name}.nii.gz", mask, case.affine)
            labels[source] = str(root / task / key)
        elif form == "file":   # --ml: one multilabel map (the structures are disjoint but for the coronaries)
            ml = np.zeros(case.label.shape, np.uint8)
            for name, mask in masks.items():
                ml[mask] = ts_ids[name]
            labels[source] = _save(root / task / f"{key}.nii.gz", ml, case.affine)
    return image, labels


def _settings(label_mapping=RECIPE):
    return PrepareSettings(shape=TINY.shape, spacing=TINY.spacing, label_mapping=label_mapping)


@pytest.mark.parametrize("chambers, surroundings", [("folder", None), ("file", None), ("folder", "file"),
                                                    ("file", "folder")])
def test_recipe_merges_imagecas_and_totalsegmentator_into_the_exact_label(tmp_path, chambers, surroundings):
    case = _case()
    image_uri, labels = write_recipe_case(tmp_path, "1", case, chambers, surroundings)
    image, label, affine = validate_case(image_uri, labels, SCHEMA, _settings())
    expected = case.label if surroundings else SCHEMA.cardiac_only(case.label)
    np.testing.assert_array_equal(label, expected)      # voxel for voxel, coronaries over the myocardium
    assert set(np.unique(label).tolist()) == set(np.unique(expected).tolist()) and label.dtype == np.uint8
    np.testing.assert_array_equal(image, case.image.astype(np.float32))
    np.testing.assert_allclose(affine, case.affine, atol=1e-6)


def _binary_heart(root, case, labels):
    labels["chambers"] = _save(root / "heartchambers_highres" / "1.nii.gz", np.isin(case.label, SCHEMA.cardiac_ids),
                               case.affine)
    return labels["chambers"], "a binary mask"


def _heart_folder(root, case, labels):
    bad = _save(root / "whole" / "1" / "heart.nii.gz", np.isin(case.label, SCHEMA.cardiac_ids), case.affine)
    labels["chambers"] = str(root / "whole" / "1")
    return bad, "'heart' is not a structure of mapping 'totalsegmentator_heartchambers'"


def _foreign_ids(root, case, labels):
    ml = nib.load(labels["chambers"]).get_fdata().astype(np.uint8)
    ml[case.label == ID["lung"]] = 9
    labels["chambers"] = _save(root / "heartchambers_highres" / "1.nii.gz", ml, case.affine)
    return labels["chambers"], "label ids [9] are not in mapping 'totalsegmentator_heartchambers'"


def _not_binary(root, case, labels):
    bad = Path(labels["surroundings"]) / "liver.nii.gz"
    _save(bad, (case.label == ID["soft_tissue"]) * 2, case.affine)
    return str(bad), "not a binary mask"


def _off_grid(root, case, labels):
    shifted = case.affine.copy()
    shifted[:3, 3] += 2.0
    labels["coronary"] = _save(root / "1.label.nii.gz", case.label == ID["coronary_arteries"], shifted)
    return labels["coronary"], "affine differs from the image's"


def _other_shape(root, case, labels):
    bad = Path(labels["surroundings"]) / "spleen.nii.gz"
    _save(bad, np.zeros((32, 32, 30)), case.affine)
    return str(bad), "does not match image shape"


def _coronary_folder(root, case, labels):
    labels["coronary"] = labels["surroundings"]
    return labels["surroundings"], "mapping 'imagecas' names no structures"


def _unsupported(root, case, labels):
    bad = root / "1.label.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    labels["coronary"] = str(bad)
    return str(bad), "unsupported format"


@pytest.mark.parametrize("spoil", [_binary_heart, _heart_folder, _foreign_ids, _not_binary, _off_grid, _other_shape,
                                   _coronary_folder, _unsupported], ids=lambda f: f.__name__.strip("_"))
def test_unmappable_or_off_grid_label_is_refused_naming_the_file(tmp_path, spoil):
    case = _case()
    image_uri, labels = write_recipe_case(tmp_path, "1", case, chambers="file", surroundings="folder")
    bad, fragment = spoil(tmp_path, case, labels)
    with pytest.raises(CaseRejected) as exc:
        validate_case(image_uri, labels, SCHEMA, _settings())
    reason = str(exc.value)
    assert fragment in reason and bad in reason and "\n" not in reason, reason


# ---- formats ----------------------------------------------------------------------------------------------------
def _oblique(flip: bool) -> np.ndarray:
    """A rotated, anisotropic RAS affine; ``flip`` mirrors the first axis (det < 0, which a DICOM series cannot
    store: its slice axis is always the normal of the slice plane)."""
    a, b = np.deg2rad(20), np.deg2rad(-10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-2.5 if flip else 2.5, 2.75, 3.5])
    aff[:3, 3] = [10.5, -20.25, 30.0]
    return aff


@contextlib.contextmanager
def _kept_locale():
    """GDCM's writer leaves the process in the C locale (ASCII file reads for every later test): undo it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@_kept_locale()
def _dicom_series(src: str, folder: Path) -> None:
    """A DICOM series of ``src`` (any file SimpleITK reads), one slice per file, geometry in the standard tags."""
    img = sitk.ReadImage(src)
    folder.mkdir(parents=True)
    d = img.GetDirection()
    uid = f"1.2.826.0.1.3680043.2.1125.{len(folder.name)}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": "CT", "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0020|0013": str(k + 1),
                "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0018|0050": f"{img.GetSpacing()[2]:.10g}"}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(s)


def _copy(src: str, dst: Path, fmt: str) -> str:
    if fmt == "dicom":
        _dicom_series(src, dst)
    else:
        sitk.WriteImage(sitk.ReadImage(src), str(dst))
    return str(dst)


@pytest.mark.parametrize("fmt, flip", [("nrrd", False), ("nrrd", True), ("nhdr", False), ("mha", True),
                                       ("mhd", False), ("dicom", False)])
def test_nrrd_metaimage_and_dicom_read_and_prepare_like_their_nifti(tmp_path, fmt, flip):
    case, affine = _case(), _oblique(flip)
    nii = {"image": _save(tmp_path / "ct.nii.gz", case.image, affine, np.int16),
           "label": _save(tmp_path / "seg.nii.gz", case.label, affine)}
    copy = {k: _copy(v, tmp_path / (f"{k}_dicom" if fmt == "dicom" else f"{k}.{fmt}"), fmt) for k, v in nii.items()}
    atol = 1e-4 if fmt == "dicom" else 1e-5    # DICOM stores positions as decimal strings
    for kind in ("image", "label"):
        ref, vol = nib.load(nii[kind]), volumes.read_volume(copy[kind])
        np.testing.assert_array_equal(vol.array, np.asanyarray(ref.dataobj))
        assert vol.array.dtype == ref.get_data_dtype()
        np.testing.assert_allclose(vol.affine, ref.affine, atol=atol)
        info = volumes.read_info(copy[kind])
        assert info.shape == ref.shape and (info.affine is None or np.allclose(info.affine, ref.affine, atol=atol))
    settings = _settings(label_mapping=None)
    ours, theirs = validate_pair(copy["image"], copy["label"], SCHEMA, settings), \
        validate_pair(nii["image"], nii["label"], SCHEMA, settings)
    for a, b in zip(ours[:2], theirs[:2]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours[2], theirs[2], atol=atol)
    ours, theirs = prepare_pair("c", copy["image"], copy["label"], SCHEMA, settings), \
        prepare_pair("c", nii["image"], nii["label"], SCHEMA, settings)
    np.testing.assert_array_equal(ours.label, theirs.label)
    np.testing.assert_allclose(ours.image, theirs.image, atol=0.05)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=atol)


# ---- the job ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_prepares_the_recipe_layout_as_documented(ray_local, tmp_path):
    """The docs/data.md command on an ImageCAS + TotalSegmentator folder: case 1 written with the label its
    legacy single-file twin gets, case 2 (a whole heart for the chambers) and case 3 (no total) refused."""
    import ray

    src, out = tmp_path / "imagecas", tmp_path / "cases"
    case, whole = _case(), _case(3)
    write_recipe_case(src, "1", case)
    _, labels = write_recipe_case(src, "2", whole)
    for f in Path(labels["chambers"]).iterdir():
        f.unlink()
    _save(Path(labels["chambers"]) / "heart.nii.gz", np.isin(whole.label, SCHEMA.cardiac_ids), whole.affine)
    write_recipe_case(src, "3", _case(4), surroundings=None)
    proc = subprocess.run(
        [sys.executable, "jobs/prepare.py", f"source=dir:{src}", f"out={out}", "preset=tiny", "images=*.img.nii.gz",
         "labels.label=null", "labels.coronary=*.label.nii.gz", "labels.chambers=heartchambers_highres/*",
         "labels.surroundings=total/*", "preview=0", f"ray.address={ray.get_runtime_context().gcs_address}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepare: 1 cases written, 2 rejected" in proc.stdout
    row, = manifest.read_cases(str(out / "cases.parquet")).to_pylist()
    twin = prepare_pair("1", str(src / "1.img.nii.gz"), _save(tmp_path / "ours.nii.gz", case.label, case.affine),
                        SCHEMA, _settings(label_mapping=None))
    np.testing.assert_array_equal(np.asanyarray(nib.load(row["label_uri"]).dataobj), twin.label)
    assert all(dict(row["class_voxels"])[name] > 0 for name in SCHEMA.cardiac)
    reasons = sorted(r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist())
    assert "heart.nii.gz: 'heart' is not a structure" in reasons[0]
    assert "3.img.nii.gz: no surroundings label file matching 'total/*'" in reasons[1]


@pytest.mark.s3
def test_nrrd_and_dicom_on_s3_read_like_their_local_copy(tmp_path, s3_uri):
    """ITK reads local files only: a remote file or DICOM folder is fetched to a temporary folder first."""
    from fcas.io import storage

    case = _case()
    nii = _save(tmp_path / "ct.nii.gz", case.image, _oblique(False), np.int16)
    local = {name: _copy(nii, tmp_path / name, fmt) for name, fmt in (("ct.nrrd", "nrrd"), ("ct_dicom", "dicom"))}
    for f in [tmp_path / "ct.nrrd", *sorted((tmp_path / "ct_dicom").iterdir())]:
        storage.atomic_write_bytes(storage.join(s3_uri, f.relative_to(tmp_path).as_posix()), f.read_bytes())
    for name, path in local.items():
        ours, ref = volumes.read_volume(storage.join(s3_uri, name)), volumes.read_volume(path)
        np.testing.assert_array_equal(ours.array, ref.array)
        np.testing.assert_array_equal(ours.affine, ref.affine)
        assert volumes.read_info(storage.join(s3_uri, name)).shape == ref.array.shape
    with pytest.raises(volumes.VolumeError, match="local paths only"):
        volumes.read_volume(storage.join(s3_uri, "ct.nhdr"))
