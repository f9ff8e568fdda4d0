"""cluster/: the autoscaler YAMLs pass Ray's own schema validation (the same calls `ray up` makes), the
KubeRay manifests and the Dockerfile have the structure the cluster needs, cluster/local.sh handles its
arguments. Fast (no cluster is started here; tests/test_local_cluster.py starts one)."""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
IMAGE = "ghcr.io/fcas/fcas-runtime:0.1.0"
AUTOSCALER_FILES = ["aws.yaml", "gcp.yaml"]
WORKER_TYPES = {"cpu_worker": "CPU", "gpu_worker": "GPU"}  # custom resource -> what it counts


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _dockerfile_args() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))


# --------------------------------------------------------------------------------------------
# Autoscaler configs (ray up)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    validate_config(copy.deepcopy(config))  # the file as written: Ray's ray-schema.json + its checks
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does: provider defaults merged, docker checked
    validate_config(prepared)
    assert prepared["available_node_types"].keys() == {"head", "cpu_worker", "gpu_worker"}
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def _set(config: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()


@pytest.mark.parametrize("path,value,error", [
    ("available_node_types.gpu_worker.resources.gpu_worker", 0.5, jsonschema.ValidationError),
    ("available_node_types.cpu_worker.min_workers", "0", jsonschema.ValidationError),
    ("available_node_types.cpu_worker.typo_field", 1, jsonschema.ValidationError),
    ("available_node_types.gpu_worker.node_config", _DELETE, jsonschema.ValidationError),
    ("docker.unknown_option", True, jsonschema.ValidationError),
    ("head_node_type", "no_such_type", ValueError),
    ("provider", _DELETE, jsonschema.ValidationError),
    ("available_node_types.cpu_worker.min_workers", 30, ValueError),  # more than the cluster's max_workers
])
@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_rays_validation_rejects_a_broken_copy(name, path, value, error):
    """The validation is real: one wrong field in a copy of each file is refused."""
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(error):
        validate_config(_set(_load(name), path, value))


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_node_types(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no GPU, no tasks
    assert not any(key in head["resources"] for key in WORKER_TYPES)
    total_max = 0
    for label, counts in WORKER_TYPES.items():
        node = types[label]
        assert node["min_workers"] == 0 and node["max_workers"] > 0  # autoscaling from zero
        assert node["resources"][label] == node["resources"][counts] >= 1  # one label unit per CPU/GPU
        total_max += node["max_workers"]
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert config["max_workers"] == total_max
    assert config["docker"]["image"] == IMAGE
    assert config["file_mounts"] == {"~/fcas": "."}
    assert any("pip install" in cmd and "-e ~/fcas" in cmd for cmd in config["setup_commands"])
    assert any("--autoscaling-config" in cmd for cmd in config["head_start_ray_commands"])
    gpu_config = types["gpu_worker"]["node_config"]
    if config["provider"]["type"] == "gcp":
        assert gpu_config["guestAccelerators"][0]["acceleratorCount"] == types["gpu_worker"]["resources"]["GPU"]
    else:
        assert gpu_config["InstanceType"].startswith(("g", "p"))  # an EC2 GPU family


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------


def _ray_start_resources(group: dict) -> dict:
    """KubeRay's rayStartParams.resources: a JSON object inside one more layer of quotes."""
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name,kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifest_structure(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _dockerfile_args()["RAY_VERSION"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups.keys() == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] == 0 == group["replicas"] and group["maxReplicas"] > 0
    images = [c["image"] for g in [head, *groups.values()] for c in _containers(g)]
    assert images and set(images) == {IMAGE}

    cpu_limits = _containers(groups["cpu"])[0]["resources"]["limits"]
    gpu_limits = _containers(groups["gpu"])[0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert _ray_start_resources(groups["cpu"]) == {"cpu_worker": int(cpu_limits["cpu"])}
    assert _ray_start_resources(groups["gpu"]) == {"gpu_worker": int(gpu_limits["nvidia.com/gpu"])}
    # S3 endpoint and credentials reach the pods from a secret, nowhere else
    for group in [head, *groups.values()]:
        for container in _containers(group):
            assert {"secretRef": {"name": "fcas-s3", "optional": True}} in container["envFrom"]
            assert not any(e.get("name", "").startswith("AWS_") for e in container.get("env", []))


def test_rayjob_entrypoint_and_its_cluster():
    job = _load("kuberay/rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/synthesize.py"]
    args = dict(a.split("=", 1) for a in argv[2:])
    assert args["n"] == "100000" and args["out"].startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M).group(1)
    assert runtime_env["working_dir"] == workdir  # where the image holds jobs/
    # one cluster definition: the RayJob's ephemeral cluster is the RayCluster's spec
    assert job["spec"]["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]


# --------------------------------------------------------------------------------------------
# Runtime image
# --------------------------------------------------------------------------------------------


def test_dockerfile_is_pinned_and_installs_the_package():
    text = (CLUSTER / "Dockerfile").read_text()
    args = _dockerfile_args()
    bases = re.findall(r"^FROM (\S+)", text, flags=re.M) + re.findall(r"COPY --from=(\S+)", text)
    assert bases, "no base image"
    for image in bases:
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d[\w.-]*", tag), f"{image}: not pinned to a versioned tag"
        assert "latest" not in tag
    assert re.match(r"nvidia/cuda:12\.\d+\.\d+-", bases[0])  # a CUDA 12 base
    assert args["PYTHON_VERSION"] == "3.11"
    torch = args["TORCH_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', text)
    make_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), flags=re.M)
    if make_torch:  # the same torch as the development environment
        assert make_torch.group(1) == torch
    assert re.search(r"pip install -e \.", text)
    for path in ("pyproject.toml", "setup.py", "fcas", "configs", "checkpoints", "benchmarks/results", "jobs"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, flags=re.M), f"{path} not copied"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["RAY_VERSION"])


def test_no_credentials_in_cluster_files():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path  # an AWS access key id
            assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text), path


# --------------------------------------------------------------------------------------------
# cluster/local.sh and the runtime_env it submits with
# --------------------------------------------------------------------------------------------


def test_runtime_env_excludes_what_must_not_be_uploaded():
    env = _load("runtime_env.yaml")
    assert {".git", ".venv", "outputs"} <= set(env["excludes"])
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {}))


def _local_sh(tmp_path, *args, **env_vars):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FCAS_RAY_STATE": str(tmp_path / "state"), **env_vars}
    return subprocess.run(["bash", str(CLUSTER / "local.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_local_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")]).returncode == 0


@pytest.mark.parametrize("args,rc,message", [
    ((), 2, "local.sh start"),
    (("restart",), 2, "local.sh submit"),
    (("submit", "--", "python", "jobs/prepare.py"), 1, "no cluster started by this script"),
    (("status",), 1, "no cluster started by this script"),
    (("logs", "raysubmit_x"), 1, "no cluster started by this script"),
    (("stop",), 1, "no cluster started by this script"),
])
def test_local_sh_arguments(tmp_path, args, rc, message):
    done = _local_sh(tmp_path, *args)
    assert done.returncode == rc, done.stderr
    assert message in done.stderr


@pytest.mark.parametrize("shell_env,forwarded", [
    ({}, {}),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
     {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}),
    ({"MY_VAR": "1", "FCAS_FORWARD_ENV": "MY_VAR", "UNRELATED": "x"}, {"MY_VAR": "1"}),
])
def test_local_sh_runtime_env_forwards_the_shells_storage_settings(tmp_path, shell_env, forwarded):
    done = _local_sh(tmp_path, "runtime-env", **shell_env)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    base = _load("runtime_env.yaml")
    assert env["excludes"] == base["excludes"]
    assert env["env_vars"] == {**base["env_vars"], **forwarded}
