"""Shared pytest fixtures. Each section belongs to one area; append new sections below."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default; a finished or failed tiny run then waits up to
# that long at each poll (about 5 s a fit here). Tests poll every 0.25 s; Ray passes the variable on to the
# controller and to the jobs' subprocesses that keep the environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# --------------------------------------------------------------------------------------------
# S3: a real moto_server (moto[server], test extra) on 127.0.0.1 for s3:// round trips.
# --------------------------------------------------------------------------------------------

S3_BUCKET = "fcas-test"
_S3_ENV_CLEARED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
)


def _moto_server_bin() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    return shutil.which("moto_server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 60.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = Path(log_path).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log}")
        try:
            with opener.open(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """Base URI ``s3://fcas-test`` of a bucket on a moto_server started for this session.

    Sets ``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_DEFAULT_REGION`` (and ``NO_PROXY`` for 127.0.0.1) for the session, restores them after,
    and stops the server even when tests fail. Fails when moto_server is not installed (it is a test extra).
    """
    binary = _moto_server_bin()
    if binary is None:
        pytest.fail("moto_server not installed (pip install -e '.[test]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="moto_server.", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    mp = pytest.MonkeyPatch()
    try:
        _wait_until_up(endpoint, proc, log.name)
        for name in _S3_ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for var in ("NO_PROXY", "no_proxy"):
            prev = os.environ.get(var, "")
            mp.setenv(var, ",".join(v for v in (prev, "127.0.0.1", "localhost") if v))

        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        os.unlink(log.name)


@pytest.fixture
def s3_uri(s3_server, request) -> str:
    """A fresh prefix ``s3://fcas-test/<test-name>-<random>`` for one test."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-")
    return f"{s3_server}/{name}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# Ray: one local Ray instance per test session (real Ray, 2 CPUs, no dashboard).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """Ray workers get this session's S3 endpoint and (fake) credentials through the runtime
    environment, the way a cluster passes them: they do not inherit variables set after start."""
    import ray

    s3_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                         "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                         "NO_PROXY", "no_proxy") if k in os.environ}
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **s3_env}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# TCDM: a real tiny-preset checkpoint (2 training steps, random VAE) for sampler/synthesis tests.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """URI of a TCDM checkpoint folder at the tiny preset, trained for 2 steps on phantoms."""
    from fcas.training.tcdm import smoke_checkpoint

    return smoke_checkpoint(str(tmp_path_factory.mktemp("tcdm-tiny")))


@pytest.fixture(scope="session")
def tiny_run12(ray_local, tiny_checkpoint, tmp_path_factory):
    """``(out Path, summary)`` of one 12-sample tiny synthesis run (the bundled phantom:4 library
    prepared under it, 4 DDIM steps, previews), shared read-only by the synthesis, CAL and fault tests."""
    from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
    from fcas.presets import load_preset
    from fcas.synthesis.sampler import SamplerSettings

    tiny = load_preset("tiny")
    out = tmp_path_factory.mktemp("syn12")
    summary = run_synthesis(SynthesisJob(n=12, out=str(out), checkpoint=tiny_checkpoint, templates="phantom:4",
                                         shape=tiny.shape, spacing=tiny.spacing,
                                         sampler=SamplerSettings(steps=4, ssv_every=1),
                                         resources=Resources(writer_batch_size=3), config_hash="test"),
                            progress=False)
    return out, summary


@pytest.fixture(scope="session")
def tiny_templates(tiny_run12):
    """``cases.parquet`` URI of the tiny template library (4 phantoms: 1 template, 3 references)."""
    return str(tiny_run12[0] / "templates" / "cases.parquet")
