"""Safe loading, ids and output paths confined to the run root, and no credentials in configs,
logs or outputs (issue 9 item 4)."""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from fcas.io import storage
from fcas.labels import default_schema, read_config
from fcas.models.bundle import load_tcdm
from fcas.models.checkpoint import checkpoint_digest, save_checkpoint
from fcas.pipeline.jobs import prepare_job_from_cfg, synthesis_job_from_cfg
from fcas.pipeline.prepare import PrepareJob, list_sources
from fcas.prepare import PreparedCase, PrepareSettings, safe_case_id, write_case
from fcas.security import (
    MAX_ID_LEN,
    CredentialsInConfigError,
    UnsafePathError,
    check_id,
    find_credentials,
    safe_child,
    sanitize_id,
)
from fcas.synthesis.outputs import sample_uris

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("fcas", "jobs", "benchmarks", "scripts")


# ---- safe loading ------------------------------------------------------------------------------
def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of torch.load / torch.serialization.load / a bare ``load`` imported from torch."""
    from_torch = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and (n.module or "").startswith("torch") for a in n.names if a.name == "load"}
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "load":
            base = f.value
            name = base.id if isinstance(base, ast.Name) else (base.attr if isinstance(base, ast.Attribute) else "")
            if name in ("torch", "serialization"):
                calls.append(node)
        elif isinstance(f, ast.Name) and f.id in from_torch:
            calls.append(node)
    return calls


def test_every_torch_load_uses_weights_only_true():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    found, bad, pickles = [], [], []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _torch_load_calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            found.append(where)
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(where)
        for node in ast.walk(tree):  # no pickle loads of files either, nor numpy's allow_pickle=True
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in ("load", "loads") and isinstance(f.value, ast.Name)
                    and f.value.id in ("pickle", "cloudpickle", "dill", "joblib")):
                pickles.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if any(k.arg == "allow_pickle" and getattr(k.value, "value", False) is not False for k in node.keywords):
                pickles.append(f"{path.relative_to(ROOT)}:{node.lineno} allow_pickle")
    assert len(files) > 50
    assert len(found) >= 2, found          # fcas/models/checkpoint.py and the evaluation report at least
    assert not bad, f"torch.load without weights_only=True: {bad}"
    assert not pickles, pickles


def test_the_scanner_sees_unsafe_calls():
    src = "import torch\nfrom torch import load as L\ntorch.load(f)\ntorch.load(f, weights_only=False)\nL(f)\n" \
          "torch.load(f, weights_only=True)\n"
    calls = _torch_load_calls(ast.parse(src))
    assert len(calls) == 4
    assert sum(1 for c in calls if any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                                       for k in c.keywords)) == 1


@pytest.fixture(scope="module")
def tcdm_ckpt(tmp_path_factory) -> str:
    """A real (untrained) tiny-preset TCDM checkpoint folder, built without training (~1 s)."""
    import torch

    from fcas.diffusion.conditioning import ConditionConfig
    from fcas.diffusion.training import TCDMSettings
    from fcas.models.networks import ModelConfig, build_tcdm, build_vae
    from fcas.presets import load_preset

    p = load_preset("tiny")
    model = dict(read_config("model", "tiny", "model config"))
    model.pop("name", None)
    out = str(tmp_path_factory.mktemp("tcdm") / "step_000000000")
    settings = TCDMSettings.from_dict({"data": "phantom:1", "out": out, "shape": p.shape, "spacing": p.spacing,
                                       "preset": "tiny", "model": model, "train": {"steps": 1}})
    config = {**settings.to_dict(), "scale_factor": 1.0}
    mcfg = ModelConfig.from_dict(config["model"])
    torch.manual_seed(0)
    tcdm = build_tcdm(mcfg, ConditionConfig(**config["condition"]).channels, init_controlnet_from_unet=False)
    vae = build_vae(mcfg.vae)
    save_checkpoint(out, config=config, step=0, half=True, state_dicts={
        "unet": tcdm.unet.state_dict(), "controlnet": tcdm.controlnet.state_dict(), "vae": vae.state_dict()})
    return out


def test_load_tcdm_checks_the_expected_digest(tcdm_ckpt):
    digest = checkpoint_digest(tcdm_ckpt)
    bundle = load_tcdm(tcdm_ckpt, expected_digest=digest)
    assert bundle.digest == digest == hashlib.sha256(Path(tcdm_ckpt, "checkpoint.json").read_bytes()).hexdigest()
    wrong = "0" * 64
    with pytest.raises(ValueError) as exc:
        load_tcdm(tcdm_ckpt, expected_digest=wrong)
    msg = str(exc.value)
    assert "\n" not in msg and "checkpoint.json" in msg and tcdm_ckpt in msg and wrong in msg and digest in msg


@pytest.mark.parametrize("name", ["unet", "controlnet", "vae"])
def test_tampered_tcdm_weights_are_refused_naming_the_file(tcdm_ckpt, tmp_path, name):
    ck = tmp_path / "ck"
    shutil.copytree(tcdm_ckpt, ck)
    data = bytearray((ck / f"{name}.pt").read_bytes())
    data[len(data) // 2] ^= 0x01                 # one bit: still a loadable zip, different weights
    (ck / f"{name}.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError) as exc:
        load_tcdm(str(ck))
    msg = str(exc.value)
    assert "\n" not in msg and str(ck / f"{name}.pt") in msg and "sha256" in msg


# ---- ids and paths -----------------------------------------------------------------------------
HOSTILE_PARTS = ["../x", "..", "a/../../b", "/etc/passwd", "%2e%2e", "%2e%2e%2fetc", "..%2f..%2fx", ".hidden",
                 "a\\..\\b", "s3://other/x", "file:///etc/x", "~/x", "C:\\x", "x\x00y", "", "a//b", "./x"]


@pytest.mark.parametrize("root_kind", ["local", "file", "s3"])
@pytest.mark.parametrize("part", HOSTILE_PARTS)
def test_safe_child_refuses_escapes(tmp_path, root_kind, part):
    root = {"local": str(tmp_path / "run"), "file": f"file://{tmp_path}/run", "s3": "s3://bucket/run"}[root_kind]
    with pytest.raises(UnsafePathError):
        safe_child(root, "cases", part)
    with pytest.raises(UnsafePathError):
        safe_child(root, part)


@pytest.mark.parametrize("root", ["LOCAL", "s3://bucket/run", "s3://bucket", "relative/out"])
def test_safe_child_accepts_plain_names(tmp_path, root):
    root = str(tmp_path / "run") if root == "LOCAL" else root
    uri = safe_child(root, "samples", "s00000007_image.nii.gz")
    assert uri == storage.join(root, "samples", "s00000007_image.nii.gz")
    assert safe_child(root, "cases/good0_label.nii.gz") == storage.join(root, "cases", "good0_label.nii.gz")


def test_safe_child_refuses_symlinks_out_of_the_root(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    (root / "inside").mkdir(parents=True)
    outside.mkdir()
    (root / "cases").symlink_to(outside, target_is_directory=True)     # a sub-folder leading out
    with pytest.raises(UnsafePathError, match="outside the run root"):
        safe_child(str(root), "cases", "a_image.nii.gz")
    (root / "samples").mkdir()
    (root / "samples" / "s00000001_image.nii.gz").symlink_to(tmp_path / "victim")   # a file leading out
    with pytest.raises(UnsafePathError, match="outside the run root"):
        safe_child(str(root), "samples", "s00000001_image.nii.gz")
    (root / "alias").symlink_to(root / "inside", target_is_directory=True)   # a symlink that stays inside
    assert safe_child(str(root), "alias", "x.nii.gz") == str(root / "alias" / "x.nii.gz")
    # a root that is itself a symlink is the user's choice, and fine
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    assert safe_child(str(tmp_path / "link"), "inside", "y") == str(tmp_path / "link" / "inside" / "y")


@pytest.mark.parametrize("sid", ["../1", "1/../../x", "/abs", -1, 1.5, True, None, "7"])
@pytest.mark.parametrize("root", ["LOCAL", "s3://bucket/run"])
def test_sample_uris_refuse_non_integer_or_negative_ids(tmp_path, root, sid):
    root = str(tmp_path) if root == "LOCAL" else root
    with pytest.raises(ValueError):
        sample_uris(root, sid)


@pytest.mark.parametrize("root", ["LOCAL", "s3://bucket/run"])
def test_sample_uris_stay_under_the_run_root(tmp_path, root):
    root = str(tmp_path) if root == "LOCAL" else root
    for sid in (0, 7, np.int64(123456789)):
        uris = sample_uris(root, sid)
        for u in uris.values():
            assert u.startswith(storage.join(root, "samples") + "/") and ".." not in u


@pytest.mark.parametrize("good", ["phantom_00001", "ct-0042", "A.b_c-9", "x" * MAX_ID_LEN])
def test_check_id_accepts(good):
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/abs", "a..b", ".hidden", "x" * (MAX_ID_LEN + 1),
                                 "%2e%2e", "a b", "a\\b", "é", "a\x00", "s3://b/k"])
def test_check_id_refuses_manifest_ids(bad):
    with pytest.raises(UnsafePathError):
        check_id(bad, "case id")


@pytest.mark.parametrize("name, expected", [
    ("../../etc/pass wd.nii.gz", "pass_wd"),
    ("case..01_image.nii.gz", "case_01_image"),
    ("%2e%2e%2fx.nii.gz", "2e_2e_2fx"),
    (".hidden.nii.gz", "hidden"),
    ("C:\\data\\ct 7.nii", "ct_7"),
    ("ok-Name_3.NII.GZ", "ok-Name_3"),
])
def test_sanitize_id_for_source_file_names(name, expected):
    assert sanitize_id(name) == expected == check_id(expected)


def test_sanitize_id_bounds_length_and_keeps_long_names_distinct():
    a, b = sanitize_id("a" * 300 + "1.nii.gz"), sanitize_id("a" * 300 + "2.nii.gz")
    assert len(a) <= MAX_ID_LEN and len(b) <= MAX_ID_LEN and a != b
    check_id(a), check_id(b)
    for hopeless in ("...", "%%%", "/", ""):
        with pytest.raises(ValueError):
            safe_case_id(hopeless)


def test_prepare_derives_safe_case_ids_from_hostile_file_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for stem in ("..evil x", "%2e%2e%2fup", "ok"):
        for kind in ("image", "label"):
            (src / f"{stem}_{kind}.nii.gz").write_bytes(b"")
    job = PrepareJob(source=f"dir:{src}", out=str(tmp_path / "out"), settings=PrepareSettings((8, 8, 8), (1, 1, 1)))
    items, rejects = list_sources(job)
    assert not rejects
    ids = sorted(i["case_id"] for i in items)
    assert ids == ["2e_2e_2fup", "evil_x", "ok"]
    assert all(check_id(i) == i for i in ids)


def test_prepare_rejects_colliding_or_underivable_case_ids_instead_of_overwriting(tmp_path):
    """'a b' and 'a_b' both sanitize to 'a_b': the second would overwrite the first's files; '...'
    sanitizes to nothing. Both become listing rejects, the job goes on."""
    src = tmp_path / "src"
    src.mkdir()
    for stem in ("a b", "a_b", "...", "ok"):
        for kind in ("image", "label"):
            (src / f"{stem}_{kind}.nii.gz").write_bytes(b"")
    job = PrepareJob(source=str(src), out=str(tmp_path / "out"), settings=PrepareSettings((8, 8, 8), (1, 1, 1)))
    items, rejects = list_sources(job)
    assert sorted(i["case_id"] for i in items) == ["a_b", "ok"]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(reasons) == 2 and all("\n" not in r for r in reasons)
    assert "cannot derive a case id" in reasons[0] and "..._image.nii.gz" in reasons[0]
    assert "is already used by" in reasons[1] and "a_b_image.nii.gz" in reasons[1]


@pytest.mark.parametrize("case_id", ["../../evil", "/abs/evil", "..", ".hidden", "a/b"])
@pytest.mark.parametrize("root", ["LOCAL", "s3://bucket/run"])
def test_write_case_refuses_unsafe_case_ids(tmp_path, root, case_id):
    root = str(tmp_path / "run") if root == "LOCAL" else root
    case = PreparedCase(case_id, np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(UnsafePathError):
        write_case(case, root, default_schema())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))    # nothing written anywhere


def test_write_case_writes_a_safe_case_under_the_root(tmp_path):
    case = PreparedCase("ct-01", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.eye(4))
    row = write_case(case, str(tmp_path), default_schema())
    assert row["image_uri"] == str(tmp_path / "cases" / "ct-01_image.nii.gz") and Path(row["label_uri"]).is_file()


# ---- credentials in configs ---------------------------------------------------------------------
_COMPOSED: dict = {}


def _cfg(name: str, overrides: list[str]):
    """The job's Hydra config (composed once per job) with ``key=value`` overrides merged in."""
    from omegaconf import OmegaConf

    if name not in _COMPOSED:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            _COMPOSED[name] = compose(config_name=name)
    base = OmegaConf.create(OmegaConf.to_container(_COMPOSED[name], resolve=False))   # not struct: '+key' adds
    return OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"   # AWS's documented example secret
CREDENTIAL_OVERRIDES = [
    (["+aws_secret_access_key=plainvalue1"], "aws_secret_access_key: credential key"),
    (["+aws_access_key_id=plainvalue2"], "aws_access_key_id: credential key"),
    (["+storage.key=plainvalue3"], "storage.key: credential key"),
    (["+storage.options.secret=plainvalue4"], "storage.options.secret: credential key"),
    (["+s3.token=plainvalue5"], "s3.token: credential key"),
    (["+db.password=plainvalue6"], "db.password: credential key"),
    (["+notes=AKIAIOSFODNN7EXAMPLE"], "notes: value looks like an AWS access key id"),
    ([f"+notes={SECRET}"], "notes: value looks like a 40-character secret key"),
    (["out=s3://someone:plainvalue7@bucket/x"], "out: URI with user:password@"),
    (["+creds=${oc.env:AWS_SECRET_ACCESS_KEY}"], "creds: interpolates a credential environment variable"),
]


@pytest.mark.parametrize("overrides, finding", CREDENTIAL_OVERRIDES)
def test_job_configs_with_credentials_are_refused(overrides, finding):
    for job, build in (("prepare", prepare_job_from_cfg), ("synthesize", synthesis_job_from_cfg)):
        with pytest.raises(CredentialsInConfigError) as exc:
            build(_cfg(job, overrides))
        msg = str(exc.value)
        assert finding in msg and "environment" in msg and f"the {job} config" in msg
        assert overrides[0].split("=", 1)[1] not in msg     # the error never repeats the value


@pytest.mark.parametrize("job", ["prepare", "synthesize", "train_tcdm", "train_vae", "export_nnunet"])
def test_shipped_configs_hold_no_credentials(job):
    assert find_credentials(_cfg(job, [])) == []


def test_empty_credential_keys_and_look_alikes_are_allowed():
    assert find_credentials({"storage": {"key": None, "secret": ""}, "digest": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
                             "checkpoint": "checkpoints/demo", "out": "s3://bucket/run-01", "tokens": 3,
                             "hash": "a" * 40}) == []


# ---- credentials never leak into outputs or logs ------------------------------------------------
def _texts_of(uri: str) -> dict[str, bytes]:
    """Every file under ``uri`` -> its bytes, plus the gunzipped bytes of .gz files and the decoded
    rows of Parquet files (compression could hide a string from a plain byte grep)."""
    fs, path = storage.get_fs(uri)
    out = {}
    for p in fs.find(path):
        data = fs.cat_file(p)
        blobs = [data]
        if data[:2] == b"\x1f\x8b":
            blobs.append(gzip.decompress(data))
        if p.endswith(".parquet"):
            blobs.append(repr(pq.read_table(io.BytesIO(data)).to_pylist()).encode())
        out[p] = b"\n".join(blobs)
    return out


def _sentinels() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {"AWS_ACCESS_KEY_ID": f"FCASKEYID{tag[:11].upper()}", "AWS_SECRET_ACCESS_KEY": f"fcasSecret{tag}",
            "AWS_SESSION_TOKEN": f"fcasToken{tag}"}


def _assert_no_sentinel(blobs: dict[str, bytes], sentinels: dict[str, str]) -> None:
    for where, blob in blobs.items():
        for var, value in sentinels.items():
            assert value.encode() not in blob, f"{var} leaked into {where}"


PREPARE_FILES = sorted(["cases.parquet", "rejects.parquet", "prepare_summary.json", "preview.png",
                        "phantom_00000_image.nii.gz", "phantom_00000_label.nii.gz",
                        "phantom_00001_image.nii.gz", "phantom_00001_label.nii.gz"])


@pytest.mark.s3
def test_environment_credentials_never_reach_outputs_or_logs(ray_local, s3_uri, monkeypatch, caplog, capfd):
    """prepare (phantom:2, tiny) to the S3 test server with sentinel credentials in the driver's
    environment: none of them in the captured logs (every logger at DEBUG except botocore's, see
    below), stdout/stderr, the summary or any output file (Parquet decoded, NIfTI gunzipped).
    The session's Ray workers hold the fixture's credentials; the CLI variant below covers workers."""
    import logging

    from fcas.pipeline.prepare import run_prepare
    from fcas.presets import load_preset

    sentinels = _sentinels()
    for k, v in sentinels.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.DEBUG)
    # botocore's own DEBUG log prints request headers (the access key id is in the Authorization
    # header); that is botocore's opt-in debugging, not ours: keep it at INFO as jobs run it
    for name in ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        caplog.set_level(logging.INFO, logger=name)
    tiny = load_preset("tiny")
    job = PrepareJob(source="phantom:2", out=s3_uri, settings=PrepareSettings(tiny.shape, tiny.spacing), preview=1,
                     splits=(("template", 0.5), ("reference", 0.5)))
    summary = run_prepare(job)
    assert summary["written"] == 2
    outputs = _texts_of(s3_uri)
    assert sorted(k.rsplit("/", 1)[-1] for k in outputs) == PREPARE_FILES
    captured = capfd.readouterr()
    logs = {"caplog": "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records).encode(),
            "stdout": captured.out.encode(), "stderr": captured.err.encode()}
    assert len(caplog.records) > 0
    _assert_no_sentinel({**outputs, **logs}, sentinels)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FCAS_CLI_LEAK_TEST"), reason="opt-in (set FCAS_CLI_LEAK_TEST=1): "
                    "starts its own Ray, 60-100 s on a loaded 2-core machine")
def test_cli_environment_credentials_never_reach_outputs_or_logs(s3_uri):
    """The whole CLI (Hydra, a fresh local Ray whose workers inherit the sentinel credentials,
    output on the S3 test server): none of them in stdout/stderr, Ray's session logs or any output."""
    sentinels = _sentinels()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")       # short: Ray's socket paths must fit
    env = {**os.environ, **sentinels, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "jobs/prepare.py", "source=phantom:2", f"out={s3_uri}", "preset=tiny",
                               "preview=1", "splits={template: 0.5, reference: 0.5}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "prepare: 2 cases written, 0 rejected" in proc.stdout
        logs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
        for p in Path(ray_tmp).rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 20_000_000 and "sockets" not in p.parts:
                logs[str(p)] = p.read_bytes()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    outputs = _texts_of(s3_uri)
    assert sorted(k.rsplit("/", 1)[-1] for k in outputs) == PREPARE_FILES
    assert len(logs) > 10                                    # Ray wrote its session logs there
    _assert_no_sentinel({**outputs, **logs}, sentinels)


def test_cli_refuses_a_config_with_credentials_without_echoing_it(monkeypatch, capsys):
    """The Hydra entry point, in this process: exit status 2, the reason on stderr, and not the
    value (Hydra would print the overrides, credential included, for any exception of the task)."""
    import importlib.util

    from hydra.core.global_hydra import GlobalHydra

    value = f"fcasCliSecret{uuid.uuid4().hex}"
    monkeypatch.setattr(sys, "argv", ["jobs/prepare.py", f"+aws_secret_access_key={value}", "source=phantom:1"])
    # run as __main__ (as `python jobs/prepare.py` does), so Hydra finds ../configs beside the file
    spec = importlib.util.spec_from_file_location("__main__", ROOT / "jobs" / "prepare.py")
    try:
        with pytest.raises(SystemExit) as exc:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        GlobalHydra.instance().clear()
    assert exc.value.code == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "CredentialsInConfigError" in text and "aws_secret_access_key: credential key" in text
    assert "environment" in text
    assert value not in text and "Error executing job" not in text
