"""A local Ray cluster end to end: ``cluster/local.sh start`` (a head node with the dashboard on
loopback), ``cluster/local.sh submit --no-wait -- python jobs/<job>.py ...`` (``ray job submit`` with the
repository as working dir), wait for SUCCEEDED through the job API, check the manifest the job wrote,
and ``cluster/local.sh stop`` — in a ``finally``, so the head goes even when the test fails.

Isolation from the in-process ``ray.init(num_cpus=2)`` of other tests (and other Ray instances on the
machine): the head gets its own ``--temp-dir`` (so its ``ray_current_cluster`` file is not in /tmp/ray,
where a plain ``ray.init()`` would find and join it), free ports for every component, no inherited
``RAY_ADDRESS``; this test talks to it only by explicit address and stops only the processes it
started (the head's process tree, by pid).

The job is a table entry: the synthesis job at the tiny preset by default (with the session's tiny
checkpoint and template library), ``FCAS_CLUSTER_TEST_JOB=prepare`` for the prepare job.
"""
from __future__ import annotations

import os
import re
import shutil
import secrets
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcas.io import manifest, storage
from tests.procs import process_tree

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(420)]


@dataclass(frozen=True)
class ClusterJob:
    """A job for the cluster test: its command (``{out}`` is the output directory), the manifest it
    writes (relative to ``out``; a Parquet file or a directory of shards), its row count and key."""

    command: tuple[str, ...]
    manifest: str
    rows: int
    key: str


JOBS = {
    "prepare": ClusterJob(
        ("python", "jobs/prepare.py", "source=phantom:3", "preset=tiny", "out={out}"),
        manifest="cases.parquet", rows=3, key="case_id"),
    "synthesize": ClusterJob(
        ("python", "jobs/synthesize.py", "preset=tiny", "n=4", "out={out}", "checkpoint={ckpt}",
         "templates={templates}", "sampler.steps=3", "ssv.every=1", "progress=false"),
        manifest="manifest", rows=4, key="sample_id"),
}
DEFAULT_JOB = "synthesize"
FORWARDED_ENDPOINT = "http://127.0.0.1:9/not-a-real-endpoint"
JOB_TIMEOUT_S = 300  # typical: 30-60 s on 2 busy cores; the bound is for a loaded CI machine


def _head_env(state: Path) -> dict[str, str]:
    # none of Ray's settings of this process (RAY_ADDRESS, or what an in-process ray.init() exported)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        FCAS_RAY_STATE=str(state / "state"),
        FCAS_RAY_TEMP_DIR=str(state / "ray"),  # short: Ray's unix socket paths live below it
        FCAS_RAY_PORT="0",  # any free port; never the default 6379/6380 or 8265 a user may hold
        FCAS_RAY_DASHBOARD_PORT="0",
        FCAS_RAY_NUM_CPUS="2",
        FCAS_RAY_OBJECT_STORE_BYTES=str(100 * 1024 * 1024),
        FCAS_RAY_STOP_GRACE="5",
        OMP_NUM_THREADS="1",
        RAY_AUTH_MODE="token",  # this head's own token, not ~/.ray/auth_token
        RAY_AUTH_TOKEN_PATH=str(state / "auth_token"),
    )
    (state / "auth_token").write_text(secrets.token_hex(32))
    (state / "auth_token").chmod(0o600)
    return env


def _local_sh(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(LOCAL_SH), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _read_state(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def _running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies, left to a reaper, run nothing)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@dataclass
class LocalCluster:
    env: dict[str, str]
    dashboard: str
    head_pid: int
    workdir: Path


@pytest.fixture
def local_cluster():
    """A head node started by ``cluster/local.sh``; stopped (and checked gone) even on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="fcas-rc-", dir="/tmp"))
    env = _head_env(workdir)
    state_file = Path(env["FCAS_RAY_STATE"]) / "cluster.env"
    head_pid = None
    seen: set[int] = set()
    try:
        started = _local_sh(env, "start", timeout=150)
        assert started.returncode == 0, f"local.sh start failed:\n{started.stdout}\n{started.stderr}"
        state = _read_state(state_file)
        head_pid = int(state["PID"])
        # set after the head started, so only `submit`'s forwarding can bring it to the job
        env = {**env, "AWS_ENDPOINT_URL": FORWARDED_ENDPOINT}
        yield LocalCluster(env=env, dashboard=state["DASHBOARD"], head_pid=head_pid, workdir=workdir)
    finally:
        if head_pid is None and state_file.exists():
            head_pid = int(_read_state(state_file)["PID"])
        if head_pid is not None:
            seen = process_tree(head_pid)
            try:
                stopped = _local_sh(env, "stop", timeout=60)
            except subprocess.TimeoutExpired as exc:
                stopped = subprocess.CompletedProcess(exc.cmd, -1, str(exc.stdout), str(exc.stderr))
            deadline = time.monotonic() + 10
            while _running(seen) and time.monotonic() < deadline:
                time.sleep(0.2)
            survivors = _running(seen)
            for pid in survivors:  # only processes of this head, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
        if head_pid is not None:
            assert stopped.returncode == 0, f"local.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"
            assert not survivors, f"local.sh stop left processes of the head running: {sorted(survivors)}"


def _parse_status(out: str, submission_id: str) -> str:
    """The status in ``ray job status`` output (it words terminal states as sentences)."""
    for sentence, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{submission_id}' {sentence}" in out:
            return status
    found = re.search(r"Status for job '[^']+': (\w+)", out)
    return found.group(1) if found else f"unknown: {out[-500:]}"


def _job_status(env: dict[str, str], submission_id: str, timeout: float) -> str:
    """The job's status (``local.sh status <id>``) once terminal, or its last one after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        out = _local_sh(env, "status", submission_id, timeout=60).stdout
        status = _parse_status(out, submission_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(1)


def test_local_sh_runs_a_job_through_ray_job_submit(local_cluster, tiny_checkpoint, tiny_templates):
    job = JOBS[os.environ.get("FCAS_CLUSTER_TEST_JOB", DEFAULT_JOB)]
    env = local_cluster.env
    out = local_cluster.workdir / "out"  # absolute: the job runs in an uploaded copy of the repo
    command = [part.format(out=out, ckpt=tiny_checkpoint, templates=tiny_templates) for part in job.command]
    tag = uuid.uuid4().hex[:8]
    job_id, probe_id = f"fcas-test-job-{tag}", f"fcas-test-probe-{tag}"

    # a probe beside the job: which Python, which fcas and which environment a job driver gets
    probe = _local_sh(env, "submit", "--no-wait", "--submission-id", probe_id, "--", "python", "-c",
                      "import sys, os, fcas; print('PROBE', sys.executable, fcas.__file__, os.getcwd(),"
                      " os.environ.get('OMP_NUM_THREADS'), os.environ.get('AWS_ENDPOINT_URL'))")
    assert probe.returncode == 0, f"submit --no-wait failed:\n{probe.stdout}\n{probe.stderr}"

    # the head carries the cloud node types' label for its CPUs (cluster/aws.yaml: cpu_worker)
    # (`ray status` answers "No cluster status" for a few seconds after the head starts: ask again)
    deadline = time.monotonic() + 60
    while True:
        status = _local_sh(env, "status", timeout=60)
        assert status.returncode == 0, status.stderr
        if re.search(r"/2\.0 cpu_worker", status.stdout) or time.monotonic() > deadline:
            break
        time.sleep(4)   # each `ray status` is a Ray CLI process: polling fast takes CPU from the job
    assert re.search(r"/2\.0 cpu_worker", status.stdout), status.stdout

    # the job itself: `ray job submit` waits, tails the logs, exits 1 when the job FAILED
    try:
        ran = _local_sh(env, "submit", "--submission-id", job_id, "--", *command, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} did not finish in {JOB_TIMEOUT_S} s:\n{str(exc.stdout)[-4000:]}")
    logs = ran.stdout[-4000:] + ran.stderr[-2000:]
    assert ran.returncode == 0, logs
    assert f"Job '{job_id}' succeeded" in ran.stdout + ran.stderr, logs

    table = manifest.read_manifest_dedup(str(out / job.manifest), key=job.key)  # readers drop retried rows
    assert table.num_rows == job.rows, logs
    uri_columns = [c for c in table.column_names if c.endswith("_uri")]
    table = manifest.resolve_uris(table, str(out), uri_columns)   # a run's sample paths are relative to it
    for column in uri_columns:
        for uri in table.column(column).to_pylist():
            assert uri is None or storage.exists(uri), f"{column}: {uri} missing"

    assert _job_status(env, probe_id, 60) == "SUCCEEDED"
    probe_logs = _local_sh(env, "logs", probe_id, timeout=60).stdout
    line = next(ln for ln in probe_logs.splitlines() if ln.startswith("PROBE "))
    executable, fcas_file, cwd, omp, endpoint = line.split()[1:]
    assert Path(executable) == VENV_PYTHON  # .venv/bin first on PATH, not the system python
    assert Path(fcas_file).is_relative_to(cwd)  # fcas from the uploaded working dir
    assert "working_dir_files" in cwd and Path(cwd).is_relative_to(local_cluster.workdir / "ray")
    assert not (Path(cwd) / ".venv").exists() and not (Path(cwd) / ".git").exists()  # excluded
    assert omp == "1"  # cluster/runtime_env.yaml env_vars reached the driver
    assert endpoint == FORWARDED_ENDPOINT  # forwarded from the submitting shell, set after `start`
