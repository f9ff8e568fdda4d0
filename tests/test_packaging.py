"""Packaging (issue 17): configs, label schemas, bundled checkpoints and benchmark results are package data
(fcas.bundled finds them), one ``fcas <job>`` command runs every job, from any directory.

The wheel test builds the wheel from a copy of the working tree (no build/ left in the repository) and
installs it with ``--no-deps`` into a fresh venv without pip; a .pth line then lends that venv this
environment's site-packages for the dependencies. A path in a .pth is not a site dir, so the .pth files there
(among them the editable install's finder, which maps ``fcas`` to the repository) are not run: ``fcas`` can only
come from the wheel, and the commands run in a directory outside the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fcas.bundled import config_dir, resolve
from fcas.config_files import read_config
from fcas.pipeline.commands import JOBS, main

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = (".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
SECRET = "fcasPackagingSecret0123456789"


def _run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "FCAS_HOME", "RAY_ADDRESS")}
    return {**env, **extra}


# ---- the resolver and the command, in this environment (a checkout or an editable install) -------------
def test_resolve_prefers_the_cwd_then_fcas_home_then_the_bundled_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("FCAS_HOME", raising=False)
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (home / "checkpoints" / "tiny").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert resolve("checkpoints/tiny") == str(ROOT / "checkpoints" / "tiny")
    measured = "benchmarks/results/synthesize_demo_cpu2.json"
    assert resolve(measured) == str(ROOT / measured)
    monkeypatch.setenv("FCAS_HOME", str(home))
    assert resolve("checkpoints/tiny") == str(home / "checkpoints" / "tiny")
    assert resolve("checkpoints/demo") == str(ROOT / "checkpoints" / "demo")   # not in FCAS_HOME: the bundled one
    (cwd / "checkpoints" / "tiny").mkdir(parents=True)
    assert resolve("checkpoints/tiny") == "checkpoints/tiny"                    # the user's own, as given
    for given in ("checkpoints/none", "outputs/weights/vae", "s3://bucket/checkpoints/demo", "/abs/checkpoints/demo"):
        assert resolve(given) == given
    monkeypatch.setenv("FCAS_HOME", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="FCAS_HOME=.* is not a directory"):
        resolve("checkpoints/demo")


def test_fcas_home_configs_replace_the_bundled_ones(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(tmp_path / "configs" / "labels" / "cardiac.yaml", tmp_path / "configs" / "labels" / "mine.yaml")
    plan = tmp_path / "configs" / "plan.yaml"
    text = plan.read_text()
    assert "\nn: 100000" in text
    plan.write_text(text.replace("\nn: 100000", "\nn: 7"))
    monkeypatch.setenv("FCAS_HOME", str(tmp_path))
    assert config_dir() == tmp_path / "configs"
    assert read_config("labels", "mine", "label schema") == read_config("labels", "cardiac", "label schema")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resolve("configs/labels/mine.yaml") == str(tmp_path / "configs" / "labels" / "mine.yaml")
    proc = _run([sys.executable, "-m", "fcas", "plan", "format=json"], tmp_path / "elsewhere",
                _clean_env(FCAS_HOME=str(tmp_path)))
    assert json.loads(proc.stdout)["request"]["n"] == 7                        # Hydra composed FCAS_HOME's plan.yaml


def test_jobs_run_from_another_directory(tmp_path):
    """This checkout's command and scripts, outside the repository root (defaults resolve to the bundled files)."""
    for cmd in ([sys.executable, "-m", "fcas", "plan", "n=10", "preset=demo", "gpu=cpu-2core", "format=json"],
                [sys.executable, ROOT / "jobs" / "plan.py", "n=10", "preset=demo", "gpu=cpu-2core", "format=json"]):
        proc = _run(cmd, cwd=tmp_path, env=_clean_env(), timeout=120)
        assert json.loads(proc.stdout)["hardware"]["name"] == "cpu-2core"
    assert list(tmp_path.iterdir()) == []


def test_fcas_command_usage_and_refusals(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    usage = capsys.readouterr().out
    assert exc.value.code == 0 and all(job in usage for job in JOBS)
    with pytest.raises(SystemExit) as exc:
        main(["nope", "n=1"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("fcas: unknown job 'nope'; jobs: synthesize")
    for argv, job in ((["plan", "n=1", f"+aws_secret_access_key={SECRET}"], "plan"),
                      ([f"aws_secret_access_key={SECRET}"], "fcas")):
        with pytest.raises(SystemExit) as exc:   # refused before Hydra parses them, the value never echoed
            main(argv)
        out = capsys.readouterr()
        assert exc.value.code == 2 and SECRET not in out.out + out.err
        assert out.err.startswith(f"{job}: ") and "<redacted>" in out.err and out.err.count("\n") == 1


# ---- the wheel, installed in a fresh venv, run outside the repository ---------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(wheel, venv, cwd)``: the wheel built from this working tree, installed alone in a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    shutil.copytree(ROOT, tmp / "src", ignore=shutil.ignore_patterns(*NOT_SOURCES))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", tmp / "src", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist"], tmp)
    (wheel,) = (tmp / "dist").glob("fcas-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    _run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel], tmp)
    # only now the dependencies: pip above saw an empty venv, so it could not touch this environment's fcas
    purelib = _run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp).stdout.strip()
    Path(purelib, "_fcas_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (tmp / "elsewhere").mkdir()
    return wheel, venv, tmp / "elsewhere"


@pytest.mark.slow
def test_wheel_holds_configs_checkpoints_and_benchmark_results(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "checkpoints").glob("*/*"),
            *(ROOT / "benchmarks" / "results").glob("*.json")]
    missing = sorted({f"fcas/{p.relative_to(ROOT)}" for p in data if p.is_file()} - names)
    assert not missing, missing
    assert {"fcas/configs/labels/cardiac.yaml", "fcas/configs/preset/tiny.yaml",
            "fcas/configs/hardware/cpu-2core.yaml", "fcas/checkpoints/tiny/checkpoint.json",
            "fcas/checkpoints/demo/unet.pt", "fcas/__main__.py", "fcas/pipeline/commands/synthesize.py"} <= names
    assert not [n for n in names if n.split("/")[0] in ("configs", "checkpoints", "jobs", "tests", "benchmarks")]
    assert wheel.stat().st_size < 30e6
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fcas = fcas.pipeline.commands:main" in entry_points
    assert all(f"fcas-{job} = fcas.pipeline.commands.{job}:command" in entry_points for job in JOBS)


@pytest.mark.slow
def test_installed_package_reads_its_data_outside_the_repo(installed):
    _, venv, cwd = installed
    code = ("import json, fcas; from fcas.bundled import config_dir, resolve; from fcas.labels import load_schema; "
            "from fcas.presets import load_preset; print(json.dumps([fcas.__file__, str(config_dir()), "
            "resolve('checkpoints/tiny'), len(load_schema('cardiac').names), load_preset('tiny').name]))")
    file, configs, tiny, n_labels, preset = json.loads(_run([venv / "bin" / "python", "-c", code], cwd,
                                                            _clean_env()).stdout)
    inside = str(venv.resolve())   # the wheel's copy, not the repository (nor its editable install)
    assert file.startswith(inside) and configs.startswith(inside) and tiny.startswith(inside)
    assert n_labels > 1 and preset == "tiny"


@pytest.mark.slow
def test_installed_commands_run_outside_the_repo(installed, tmp_path):
    _, venv, cwd = installed
    bin_, env = venv / "bin", _clean_env()
    usage = _run([bin_ / "python", "-m", "fcas", "--help"], cwd, env).stdout
    assert all(job in usage for job in JOBS)
    plan = json.loads(_run([bin_ / "fcas", "plan", "n=50", "preset=demo", "gpu=cpu-2core", "sampler_nodes=1",
                            "format=json"], cwd, env).stdout)
    assert plan["hardware"]["name"] == "cpu-2core"               # measured: benchmarks/results/*.json, bundled
    assert json.loads(_run([bin_ / "fcas-plan", "n=10", "format=json"], cwd, env).stdout)["request"]["n"] == 10
    out = tmp_path / "run"
    proc = _run([bin_ / "fcas", "synthesize", "preset=tiny", "n=2", f"out={out}", "progress=false",
                 "templates=phantom:4", "sampler.steps=4"], cwd, env, timeout=600)
    assert "synthesize: 2/2 samples" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_written"] == 2 and summary["checkpoint"] == "checkpoints/tiny"
    digest = (ROOT / "checkpoints" / "tiny" / "DIGEST").read_text().split()[0]
    assert digest in (out / "run.json").read_text()              # the bundled tiny checkpoint, from the wheel
