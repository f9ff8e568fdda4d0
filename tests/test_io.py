"""fcas.io: storage URIs, NIfTI round trips and errors, Parquet manifests (local, file://, s3://)."""
from __future__ import annotations

import gzip
import io
import os
import time
import tracemalloc

import nibabel as nib
import numpy as np
import pyarrow as pa
import pytest

from fcas.io import manifest, nifti, storage
from fcas.io.manifest import CASES_SCHEMA, REJECTS_SCHEMA, read_manifest_dedup, read_table, write_table
from fcas.io.nifti import NiftiError, read_header, read_nifti, write_nifti

S3 = pytest.mark.s3
WHERE = ["local", "file", pytest.param("s3", marks=S3)]


@pytest.fixture
def base(request, tmp_path) -> str:
    """A fresh directory as a plain path, a ``file://`` URI or an ``s3://`` prefix."""
    kind = request.param
    if kind == "local":
        return str(tmp_path)
    if kind == "file":
        return f"file://{tmp_path}"
    return request.getfixturevalue("s3_uri")


def _oblique_affine() -> np.ndarray:
    """Anisotropic (0.7, 0.45, 2.5) mm spacing, rotated about two axes, with a shear-free origin."""
    a, b = np.deg2rad(17.0), np.deg2rad(-8.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.7, 0.45, 2.5])
    aff[:3, 3] = [-101.3, 87.25, -640.0]
    return aff


def _f32(affine: np.ndarray) -> np.ndarray:
    """What NIfTI-1 can store: the affine rounded to float32."""
    return np.asarray(affine, np.float32).astype(np.float64)


AXIS_AFFINE = np.diag([0.75, 0.5, 2.5, 1.0])
AXIS_AFFINE[:3, 3] = [-96.0, -80.5, 12.25]  # all float32-representable: stored bit-exactly

# ------------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "base_uri, parts, expected",
    [
        ("s3://b/run", ("cases", "x.nii.gz"), "s3://b/run/cases/x.nii.gz"),
        ("s3://b/run/", ("cases/", "x.nii.gz"), "s3://b/run/cases/x.nii.gz"),
        ("s3://b", ("x",), "s3://b/x"),
        ("file:///tmp/a", ("b", "c"), "file:///tmp/a/b/c"),
        ("/tmp/a", ("b", "c"), os.path.join("/tmp/a", "b", "c")),
        ("rel/dir", ("f.parquet",), os.path.join("rel/dir", "f.parquet")),
    ],
)
def test_join(base_uri, parts, expected):
    assert storage.join(base_uri, *parts) == expected


@pytest.mark.parametrize("part", ["/abs", "s3://other/x"])
def test_join_refuses_absolute_parts(part):
    with pytest.raises(ValueError, match="relative"):
        storage.join("s3://b/run", part)


def test_s3_options_come_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = storage.s3_storage_options()
    assert opts["endpoint_url"] == "http://127.0.0.1:9"
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    assert (opts["key"], opts["secret"]) == ("k", "s")
    assert opts["use_listings_cache"] is False
    fs, path = storage.get_fs("s3://bucket/a/b.nii")
    assert path == "bucket/a/b.nii"
    assert fs.endpoint_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("base", WHERE, indirect=True)
def test_storage_round_trip_and_listing(base):
    d = storage.join(base, "sub")
    storage.makedirs(d)
    assert not storage.exists(storage.join(d, "a.bin"))
    for name, payload in [("a.bin", b"alpha"), ("b.bin", b"\x00" * 1000), ("c.txt", b"")]:
        storage.atomic_write_bytes(storage.join(d, name), payload)
        assert storage.read_bytes(storage.join(d, name)) == payload
    storage.atomic_write_bytes(storage.join(d, "a.bin"), b"overwritten")  # no stale cache
    assert storage.read_bytes(storage.join(d, "a.bin")) == b"overwritten"
    names = ["a.bin", "b.bin", "c.txt"]
    assert storage.listdir(d) == [storage.join(d, n) for n in names]
    assert storage.glob(storage.join(d, "*.bin")) == [storage.join(d, n) for n in names[:2]]
    storage.remove(storage.join(d, "b.bin"))
    assert not storage.exists(storage.join(d, "b.bin"))
    assert storage.glob(storage.join(d, "*.bin")) == [storage.join(d, "a.bin")]
    storage.remove(storage.join(d, "b.bin"), missing_ok=True)
    with pytest.raises(FileNotFoundError, match="b.bin"):
        storage.read_bytes(storage.join(d, "b.bin"))


def test_glob_keeps_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.atomic_write_bytes(os.path.join("out", "x.nii"), b"1")
    assert storage.glob("out/*.nii") == [os.path.join("out", "x.nii")]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "f.bin"
    storage.atomic_write_bytes(str(target), b"data")
    assert os.listdir(target.parent) == ["f.bin"]


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    # mkstemp's temporaries are 0600; outputs must be readable like any file this process would create
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    storage.atomic_write_bytes(str(tmp_path / "atomic.bin"), b"x")
    mode = (tmp_path / "atomic.bin").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777 and mode & 0o044 == 0o044 & ~storage._UMASK


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    storage.atomic_write_bytes(str(target), b"old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        storage.atomic_write_bytes(str(target), b"new")
    with pytest.raises(OSError, match="disk on fire"):
        storage.atomic_write_bytes(str(tmp_path / "g.bin"), b"new")
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
    assert target.read_bytes() == b"old"


# ------------------------------------------------------------------------------- NIfTI


def _volume(kind: str, shape=(7, 6, 5), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    if kind == "image":
        return rng.integers(-1024, 3000, size=shape).astype(np.int16)
    if kind == "label":
        return rng.integers(0, 12, size=shape).astype(np.uint8)
    return rng.random(shape, dtype=np.float32)


@pytest.mark.parametrize("base", WHERE, indirect=True)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    "kind, dtype", [("image", np.int16), ("label", np.uint8), ("float", np.float32)]
)
def test_nifti_round_trip(base, suffix, kind, dtype):
    arr = _volume(kind)
    uri = storage.join(base, "cases", f"case_{kind}{suffix}")
    write_nifti(uri, arr, AXIS_AFFINE, kind=kind)
    vol = read_nifti(uri)
    assert vol.array.dtype == dtype
    np.testing.assert_array_equal(vol.array, arr)
    assert vol.affine.dtype == np.float64
    np.testing.assert_array_equal(vol.affine, AXIS_AFFINE)  # bit-exact
    assert vol.spacing == (0.75, 0.5, 2.5)
    hdr = read_header(uri)
    assert hdr.shape == arr.shape and hdr.dtype == dtype
    np.testing.assert_array_equal(hdr.affine, AXIS_AFFINE)
    assert hdr.zooms == (0.75, 0.5, 2.5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_fraction_kind_is_uint8_on_disk_and_float_in_memory(tmp_path, suffix):
    """Confidence maps: 1 byte per voxel on disk, read back within half a step of 1/255."""
    arr = _volume("float")
    arr[0, 0, 0], arr[0, 0, 1] = 0.0, 1.0
    uri = str(tmp_path / f"cm{suffix}")
    write_nifti(uri, arr, AXIS_AFFINE, kind="fraction")
    assert read_header(uri).dtype == np.uint8
    vol = read_nifti(uri)
    assert vol.array.dtype == np.float32
    assert np.abs(vol.array - arr).max() <= 0.5 / 255 + 1e-6
    assert vol.array[0, 0, 0] == 0.0 and vol.array[0, 0, 1] == 1.0 and vol.array.max() <= 1.0
    with pytest.raises(ValueError, match=r"fraction values must lie in \[0, 1\]"):
        write_nifti(str(tmp_path / f"bad{suffix}"), arr + 1.0, AXIS_AFFINE, kind="fraction")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_oblique_anisotropic_affine_preserved(tmp_path, suffix):
    aff = _oblique_affine()
    arr = _volume("label", shape=(9, 4, 3))
    uri = str(tmp_path / f"oblique{suffix}")
    write_nifti(uri, arr, aff, kind="label")
    vol = read_nifti(uri)
    np.testing.assert_array_equal(vol.affine, _f32(aff))  # exact up to NIfTI-1's float32
    np.testing.assert_allclose(vol.affine, aff, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.45, 2.5), rtol=1e-6)
    raw = nib.load(uri)
    assert int(raw.header["qform_code"]) == 1 and int(raw.header["sform_code"]) == 1
    np.testing.assert_allclose(raw.get_qform(), aff, atol=1e-4)  # rotation only: qform exact too
    np.testing.assert_array_equal(vol.array, arr)


def test_image_kind_rounds_and_clips_hu(tmp_path):
    arr = np.array([-1e6, -1000.4, -0.6, 0.5, 1.5, 2.49, 40000.0, 1e9], np.float64).reshape(2, 2, 2)
    uri = str(tmp_path / "ct.nii.gz")
    write_nifti(uri, arr, np.eye(4), kind="image")
    got = read_nifti(uri).array
    assert got.dtype == np.int16
    expected = [-32768, -1000, -1, 0, 2, 2, 32767, 32767]  # rint: half to even
    np.testing.assert_array_equal(got.ravel(), expected)


@pytest.mark.parametrize(
    "arr, kind, match",
    [
        (np.full((2, 2, 2), 256), "label", r"0\.\.255"),
        (np.full((2, 2, 2), -1), "label", r"0\.\.255"),
        (np.full((2, 2, 2), 1.5), "label", "non-integer"),
        (np.full((2, 2, 2), np.nan), "image", "non-finite"),
        (np.zeros((2, 2)), "image", "3D"),
        (np.zeros((2, 2, 2)), "mask", "kind"),
    ],
)
def test_write_refuses_bad_input_and_writes_nothing(tmp_path, arr, kind, match):
    uri = str(tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match=match):
        write_nifti(uri, arr, np.eye(4), kind=kind)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "affine, match",
    [(np.eye(3), r"\(4, 4\)"), (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
     (np.full((4, 4), np.nan), "finite")],
)
def test_write_refuses_bad_affine(tmp_path, affine, match):
    with pytest.raises(ValueError, match=match):
        write_nifti(str(tmp_path / "x.nii"), np.zeros((2, 2, 2)), affine, kind="float")


def test_write_refuses_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_nifti(str(tmp_path / "x.nrrd"), np.zeros((2, 2, 2)), np.eye(4))


@S3
def test_s3_listing_sees_objects_written_by_another_client(s3_uri):
    import boto3

    storage.atomic_write_bytes(storage.join(s3_uri, "a.bin"), b"a")
    assert storage.listdir(s3_uri) == [storage.join(s3_uri, "a.bin")]
    bucket, prefix = s3_uri[len("s3://"):].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/b.bin", Body=b"b")  # another writer
    assert storage.listdir(s3_uri) == [storage.join(s3_uri, n) for n in ("a.bin", "b.bin")]
    assert storage.exists(storage.join(s3_uri, "b.bin"))


@S3
def test_failed_s3_write_leaves_no_object(s3_uri):
    uri = storage.join(s3_uri, "bad.nii.gz")
    with pytest.raises(ValueError):
        write_nifti(uri, np.full((2, 2, 2), 300), np.eye(4), kind="label")
    assert not storage.exists(uri)


def _bucket_names() -> list[str]:
    import boto3

    return sorted(b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"])


@S3
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])   # s3fs would create / send a LocationConstraint
def test_s3_makedirs_and_writes_never_create_a_bucket(s3_server, monkeypatch, region):
    """makedirs, an atomic write, a Parquet table and open_file(wb) into a mistyped bucket: one clear
    BucketNotFoundError (a FileNotFoundError, so a job's one-line user error) naming it, and no bucket."""
    import uuid

    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    before = _bucket_names()
    missing = f"fcas-missing-{uuid.uuid4().hex[:8]}"
    run = f"s3://{missing}/run"
    writes = {
        "makedirs": lambda: storage.makedirs(storage.join(run, "cases")),
        "makedirs bucket": lambda: storage.makedirs(f"s3://{missing}"),
        "atomic_write_bytes": lambda: storage.atomic_write_bytes(storage.join(run, "a.json"), b"{}"),
        "write_table": lambda: write_table(storage.join(run, "rejects.parquet"), [], REJECTS_SCHEMA),
        "open_file": lambda: storage.open_file(storage.join(run, "b.bin"), "wb"),
    }
    for what, write in writes.items():
        with pytest.raises(storage.BucketNotFoundError) as exc:
            write()
        assert isinstance(exc.value, FileNotFoundError), what
        assert str(exc.value) == (f"s3://{missing}: bucket does not exist (FCaS never creates buckets; "
                                  "create it first)"), what
    assert _bucket_names() == before and missing not in before


@S3
def test_s3_makedirs_inside_an_existing_bucket_is_fine(s3_server, s3_uri):
    storage.makedirs(s3_server)                                               # the bucket itself
    storage.makedirs(storage.join(s3_uri, "cases", "deeper"))                 # a prefix: nothing to create
    storage.atomic_write_bytes(storage.join(s3_uri, "cases", "deeper", "a.bin"), b"a")
    with storage.open_file(storage.join(s3_uri, "b.bin"), "wb") as fh:
        fh.write(b"b")
    assert storage.read_bytes(storage.join(s3_uri, "cases", "deeper", "a.bin")) == b"a"
    assert storage.read_bytes(storage.join(s3_uri, "b.bin")) == b"b"


@S3
@pytest.mark.parametrize("job, args", [
    ("prepare", ["source=phantom:1", "preset=tiny"]),
    ("synthesize", ["preset=tiny", "n=2", "checkpoint=checkpoints/tiny", "templates=phantom:4"]),
])
def test_job_into_a_missing_bucket_exits_2_with_one_line_before_any_work(s3_server, job, args):
    """``out=s3://<typo>/run``: the first write (prepare's makedirs, synthesize's run.json) stops the
    job with the one-line reason, exit status 2, before Ray starts; the bucket is not created."""
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    missing = f"fcas-typo-{uuid.uuid4().hex[:8]}"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, f"jobs/{job}.py", f"out=s3://{missing}/run", *args],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (f"{job}: s3://{missing}: bucket does not exist (FCaS never creates buckets; "
                           "create it first)\n")
    assert missing not in _bucket_names()


def test_gzip_output_is_deterministic(tmp_path):
    arr = _volume("image")
    a, b = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")
    write_nifti(a, arr, AXIS_AFFINE)
    write_nifti(b, arr, AXIS_AFFINE)
    blob = storage.read_bytes(a)
    assert blob[4:8] == b"\x00" * 4  # gzip MTIME zeroed: same input, same bytes
    assert blob == storage.read_bytes(b)


@pytest.mark.parametrize("kind", ["image", "label", "fraction"])
def test_isal_and_zlib_files_hold_the_same_nifti(tmp_path, kind):
    """The fast ISA-L writer (the default) and zlib give different gzip streams of one NIfTI: gunzip,
    nibabel and SimpleITK read both to the same bytes and voxels, with the same geometry."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    arr = {"image": rng.integers(-1024, 3000, (20, 17, 9)), "label": rng.integers(0, 12, (20, 17, 9)),
           "fraction": rng.random((20, 17, 9)).astype(np.float32)}[kind]
    fast, ref = str(tmp_path / "isal.nii.gz"), str(tmp_path / "zlib.nii.gz")
    write_nifti(fast, arr, _oblique_affine(), kind=kind)   # codec="auto": isal when installed
    write_nifti(ref, arr, _oblique_affine(), kind=kind, codec="zlib")
    a, b = storage.read_bytes(fast), storage.read_bytes(ref)
    assert nifti._igzip is not None and a != b   # really two encoders
    assert gzip.decompress(a) == gzip.decompress(b)
    va, vb = read_nifti(fast), read_nifti(ref)
    assert va.array.dtype == vb.array.dtype and np.array_equal(va.array, vb.array)
    np.testing.assert_array_equal(nib.load(fast).get_fdata(), nib.load(ref).get_fdata())
    ia, ib = sitk.ReadImage(fast), sitk.ReadImage(ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
    assert ia.GetSpacing() == ib.GetSpacing() and ia.GetDirection() == ib.GetDirection()
    # SimpleITK's array is (k, j, i): ours transposed (scl_slope applied by both)
    np.testing.assert_allclose(sitk.GetArrayFromImage(ia), va.array.transpose(2, 1, 0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,shape,order", [("image", (33, 20, 17), "C"), ("label", (300, 7, 130), "C"),
                                              ("fraction", (16, 9, 5), "C"), ("float", (10, 11, 12, 2), "C"),
                                              ("label", (5, 6, 7), "F")])
def test_fast_serialisation_gives_nibabels_bytes(kind, shape, order):
    """write_nifti's own header + blocked transpose: byte for byte what nibabel's to_bytes writes."""
    rng = np.random.default_rng(3)
    arr = {"image": lambda: rng.integers(-1024, 3000, shape), "label": lambda: rng.integers(0, 12, shape),
           "fraction": lambda: rng.random(shape), "float": lambda: rng.random(shape)}[kind]()
    arr = np.asfortranarray(arr) if order == "F" else arr
    aff = _oblique_affine()
    data = nifti._to_kind(arr, kind, "x")
    img = nifti.nifti_image(data, aff, kind)
    assert nifti._nifti_bytes(img, data) == img.to_bytes()
    assert img.header.get_intent()[0] == ("label" if kind == "label" else "none")
    assert img.header["qform_code"] == img.header["sform_code"] == 1


def test_fast_serialisation_of_a_strided_array():
    """A uint8 label that is a strided view (no copy by _to_kind) serialises as nibabel's to_bytes does."""
    base = np.random.default_rng(4).integers(0, 12, (9, 14, 6)).astype(np.uint8)
    view = base[:, ::2]
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    data = nifti._to_kind(view, "label", "x")
    assert data.base is not None   # still the view
    img = nifti.nifti_image(data, _oblique_affine(), "label")
    assert nifti._nifti_bytes(img, data) == img.to_bytes()


def test_fraction_steps_equal_float64_rounding_and_clip():
    rng = np.random.default_rng(5)
    a = np.concatenate([rng.random(600_000), (np.arange(255) + 0.5) / 255, [0.0, 1.0]]).astype(np.float32)
    assert np.array_equal(nifti._fraction_steps(a), np.rint(a.astype(np.float64) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"fraction values must lie in \[0, 1\]"):
        nifti._fraction_steps(np.array([0.5, 1.5]))
    assert nifti._fraction_steps(np.array([-0.5, 0.5, 1.5]), clip=True).tolist() == [0, 128, 255]


def test_gzip_codec_is_checked():
    with pytest.raises(ValueError, match="unknown gzip codec 'brotli'"):
        write_nifti("/tmp/never.nii.gz", np.zeros((2, 2, 2)), np.eye(4), codec="brotli")
    assert gzip.decompress(nifti.gzip_bytes(b"abc" * 100, "zlib", 6)) == b"abc" * 100


def _bare_header(shape, dtype=np.int16) -> bytes:
    """A NIfTI-1 header (plus empty extension flag) declaring ``shape``, with no voxel data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(AXIS_AFFINE, code=1)
    hdr["vox_offset"] = 352
    buf = io.BytesIO()
    hdr.write_to(buf)
    return buf.getvalue() + b"\x00" * 4


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_read_header_of_huge_grid_is_fast_and_allocates_nothing(tmp_path, suffix):
    shape = (10_000, 10_000, 10_000)  # 10^12 voxels, 2 TB of int16
    blob = _bare_header(shape)
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    tracemalloc.start()
    t0 = time.perf_counter()
    hdr = read_header(str(path))
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert hdr.shape == shape and hdr.n_voxels == 10**12 and hdr.nbytes == 2 * 10**12
    np.testing.assert_array_equal(hdr.affine, AXIS_AFFINE)
    assert elapsed < 1.0
    assert peak < 4 * 2**20
    with pytest.raises(ValueError, match="max_voxels"):
        read_nifti(str(path), max_voxels=512**3)
    with pytest.raises(NiftiError, match="truncated voxel data"):
        read_nifti(str(path))  # header promises 2 TB that the file does not hold


def _valid_gz() -> bytes:
    img = nib.Nifti1Image(_volume("image", shape=(16, 16, 16)), AXIS_AFFINE)
    return gzip.compress(img.to_bytes())


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.nii.gz", lambda: b"", "empty file"),
        ("empty.nii", lambda: b"", "empty file"),
        ("truncated.nii.gz", lambda: _valid_gz()[: len(_valid_gz()) // 2], "gzip"),
        ("garbage-gzip.nii.gz", lambda: b"\x1f\x8b" + b"\x00" * 500, "gzip"),
        ("text.nii.gz", lambda: b"this is not a NIfTI file\n" * 40, "not a NIfTI"),
        ("short.nii", lambda: b"tiny", "not a NIfTI"),
        ("badmagic.nii", lambda: _bare_header((2, 2, 2))[:344] + b"xyz\x00" + b"\x00" * 12,
         "magic"),
    ],
)
def test_corrupt_files_raise_value_error_naming_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content())
    for reader in (read_nifti, read_header):
        if reader is read_header and name.startswith("truncated"):
            continue  # the header itself is intact; only the full read sees the truncation
        with pytest.raises(ValueError, match=match) as info:
            reader(str(path))
        assert isinstance(info.value, NiftiError)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_nifti(str(tmp_path / "nope.nii.gz"))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_header(str(tmp_path / "nope.nii.gz"))


# ------------------------------------------------------------------------------- manifests


def _case_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "case_id": f"case_{i:04d}",
            "image_uri": f"s3://lab/cases/case_{i:04d}_img.nii.gz",
            "label_uri": f"s3://lab/cases/case_{i:04d}_lbl.nii.gz",
            "shape": [64, 64, 32 + i],
            "spacing": (2.0, 2.0, 2.5),
            "class_voxels": {"left_ventricle": 1000 + i, "coronary_arteries": np.int64(12)},
            "split": ["train", "template", "reference", "test"][i % 4],
            "source": "phantom",
        }
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("base", WHERE, indirect=True)
@pytest.mark.parametrize(
    "schema, rows",
    [
        (CASES_SCHEMA, _case_rows(5)),
        ("cases", _case_rows(1)),
        (REJECTS_SCHEMA, [{"source": "/data/x.nii.gz", "reason": "truncated gzip", "stage": "validate"}]),
        (REJECTS_SCHEMA, []),
    ],
    ids=["cases-5", "cases-by-name", "rejects-1", "rejects-empty"],
)
def test_table_round_trip(base, schema, rows):
    uri = storage.join(base, "manifest", "cases.parquet")
    write_table(uri, rows, schema)
    table = read_table(uri)
    expected = manifest.SCHEMAS[schema] if isinstance(schema, str) else schema
    assert table.schema.equals(expected, check_metadata=False)
    assert table.num_rows == len(rows)
    got = table.to_pylist()
    for g, r in zip(got, rows):
        for k, v in r.items():
            if k == "class_voxels":
                assert manifest.map_to_dict(g[k]) == {kk: int(vv) for kk, vv in v.items()}
            elif isinstance(v, tuple):
                assert g[k] == list(v)
            else:
                assert g[k] == v


@pytest.mark.parametrize(
    "row_update, match",
    [
        ({"shape": [64, "64", 32]}, r"field 'shape'\[1\]: expected int32"),
        ({"shape": [64.5, 64, 32]}, r"field 'shape'\[0\]: expected int32"),
        ({"shape": [2**40, 1, 1]}, "out of range"),
        ({"spacing": "2.0"}, r"field 'spacing': expected list"),
        ({"case_id": 17}, r"field 'case_id': expected string"),
        ({"case_id": None}, "required field 'case_id'"),
        ({"class_voxels": {"lv": 1.5}}, r"class_voxels'\['lv'\]: expected int64"),
        ({"split": True}, "expected string"),
        ({"colour": "red"}, "unknown fields"),
    ],
)
def test_write_table_rejects_wrong_types(tmp_path, row_update, match):
    rows = _case_rows(3)
    rows[2] = {**rows[2], **row_update}
    uri = str(tmp_path / "cases.parquet")
    with pytest.raises(ValueError, match=match) as info:
        write_table(uri, rows, CASES_SCHEMA)
    assert "row 2" in str(info.value) or "unknown" in str(info.value)
    assert not os.path.exists(uri)


def test_optional_fields_default_to_null(tmp_path):
    row = {k: v for k, v in _case_rows(1)[0].items() if k not in ("split", "source", "class_voxels")}
    uri = str(tmp_path / "c.parquet")
    write_table(uri, [row], CASES_SCHEMA)
    got = read_table(uri).to_pylist()[0]
    assert got["split"] is None and got["class_voxels"] is None and got["shape"] == row["shape"]


SYN_SCHEMA = manifest.make_schema(
    "synthesis_test",
    [pa.field("sample_id", pa.int64(), nullable=False), pa.field("seed", pa.int64()),
     pa.field("image_uri", pa.string())],
)


@pytest.mark.parametrize("base", WHERE, indirect=True)
def test_sharded_dir_glob_and_dedup(base):
    d = storage.join(base, "syn")
    # part-00001 holds a retry of samples 1 and 3, written after part-00000
    write_table(storage.join(d, "part-00000.parquet"),
                [{"sample_id": i, "seed": 10 + i, "image_uri": f"old{i}"} for i in range(4)], SYN_SCHEMA)
    write_table(storage.join(d, "part-00001.parquet"),
                [{"sample_id": i, "seed": 10 + i, "image_uri": f"new{i}"} for i in (3, 1, 4)], SYN_SCHEMA)
    storage.atomic_write_bytes(storage.join(d, "_SUCCESS"), b"")
    whole = read_table(d)
    assert whole.num_rows == 7
    assert read_table(storage.join(d, "part-*.parquet")).num_rows == 7
    dedup = read_manifest_dedup(d, key="sample_id")
    assert dedup.column("sample_id").to_pylist() == [0, 2, 3, 1, 4]
    assert dedup.column("image_uri").to_pylist() == ["old0", "old2", "new3", "new1", "new4"]
    with pytest.raises(ValueError, match="dedup key 'case_id'"):
        read_manifest_dedup(d, key="case_id")


@pytest.mark.parametrize("base", WHERE, indirect=True)
def test_compaction_keeps_every_row_and_the_newest_write(base):
    d = storage.join(base, "syn")
    for k in range(40):   # 40 writer batches of 3 rows; batch 39 retries samples 0..2
        ids = range(3 * k, 3 * k + 3) if k < 39 else range(3)
        write_table(storage.join(d, f"part-{k:05d}.parquet"),
                    [{"sample_id": i, "seed": i, "image_uri": f"b{k}"} for i in ids], SYN_SCHEMA)
    before = read_manifest_dedup(d, key="sample_id")
    assert before.num_rows == 117
    assert manifest.compact(d, SYN_SCHEMA, key="sample_id", min_shards=50)["compacted"] is False   # too few shards
    res = manifest.compact(d, SYN_SCHEMA, key="sample_id", min_shards=32)
    assert res["compacted"] and res["shards_read"] == 40 and res["rows"] == 117
    names = [u.rsplit("/", 1)[-1] for u in storage.listdir(d)]
    assert len(names) == 1 and names[0].startswith("compact-0000000001-")
    after = read_manifest_dedup(d, key="sample_id")
    assert sorted(after.column("sample_id").to_pylist()) == list(range(117))
    assert {r["sample_id"]: r["image_uri"] for r in after.to_pylist() if r["sample_id"] < 3} == {0: "b39", 1: "b39", 2: "b39"}
    # a retry written after the compaction still wins; a second compaction folds both files into one
    write_table(storage.join(d, "part-zzz.parquet"), [{"sample_id": 5, "seed": 5, "image_uri": "late"}], SYN_SCHEMA)
    assert read_manifest_dedup(d, key="sample_id").to_pylist()[-1]["image_uri"] == "late"
    res = manifest.compact(d, SYN_SCHEMA, key="sample_id", min_shards=1)
    assert res["rows"] == 117 and len(storage.listdir(d)) == 1
    final = {r["sample_id"]: r["image_uri"] for r in read_table(d).to_pylist()}
    assert len(final) == 117 and final[5] == "late" and final[0] == "b39"


def test_compaction_without_key_keeps_duplicates_and_a_crash_loses_nothing(tmp_path):
    d = str(tmp_path / "rejects")
    for k in range(3):
        write_table(f"{d}/part-{k}.parquet", [{"sample_id": 1, "seed": k, "image_uri": None}], SYN_SCHEMA)
    shards = sorted(storage.listdir(d))
    real_remove = storage.remove_many
    storage.remove_many = lambda uris: None   # a crash after the compacted file is written, before the deletes
    try:
        manifest.compact(d, SYN_SCHEMA, min_shards=1)
    finally:
        storage.remove_many = real_remove
    assert len(storage.listdir(d)) == 4 and read_table(d).num_rows == 6   # duplicates, nothing lost
    assert read_manifest_dedup(d, key="sample_id").num_rows == 1
    manifest.compact(d, SYN_SCHEMA, min_shards=1)   # the next compaction folds the leftovers
    assert len(storage.listdir(d)) == 1 and read_table(d).num_rows == 6 and not any(storage.exists(s) for s in shards)


def test_read_table_schema_evolution_and_empty(tmp_path):
    old = manifest.make_schema("s", [pa.field("sample_id", pa.int64(), nullable=False)])
    write_table(str(tmp_path / "m" / "part-0.parquet"), [{"sample_id": 5}], old)
    t = read_table(str(tmp_path / "m"), schema=SYN_SCHEMA)
    assert t.schema.equals(SYN_SCHEMA) and t.to_pylist() == [{"sample_id": 5, "seed": None, "image_uri": None}]
    empty = read_table(str(tmp_path / "nothing-here"), schema=SYN_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(SYN_SCHEMA)
    with pytest.raises(FileNotFoundError):
        read_table(str(tmp_path / "nothing-here"))
    write_table(str(tmp_path / "from_table.parquet"), t, SYN_SCHEMA)  # a Table is cast, not re-validated
    assert read_table(str(tmp_path / "from_table.parquet")).equals(t)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        read_table(str(tmp_path / "junk.parquet"))
