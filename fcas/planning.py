"""Scale planner: for the synthesis job, how many sampler actors and CPU workers, how long, how many
GPU-hours, how many bytes and how much money a run of ``n`` samples takes; for TCDM training
(:func:`make_training_plan`), the steps, GPU-hours and GPU memory of a training run.

Hand-written arithmetic over per-stage costs; every input figure carries its source and every output
says how it was derived, so a plan can be checked line by line. The costs come from a hardware
profile (``configs/hardware/<name>.yaml``): either figures measured by ``benchmarks/synthesize.py``
(a JSON file the profile points at) or published figures given in the profile with their source
(e.g. MAISI's A100 sampling times). Costs are kept per unit of work (seconds per denoising step per
latent megavoxel, per decoded megavoxel, per core and megavoxel on the CPU side) and scaled linearly
to the preset's grid: an approximation that the profile states.

The model: one sampler actor per GPU (or ``sampler_actors`` CPU actors on a GPU-less profile) turns
out ``actors / sampler_s`` samples per second; the CPU stages (MGM, writer) need
``cpu_core_s`` core-seconds per sample, so keeping the samplers busy takes
``ceil(gpu_rate * cpu_core_s)`` cores. Wall time = start-up + n / min(sampler rate, CPU rate).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fcas.bundled import resolve
from fcas.config_files import read_config
from fcas.presets import load_preset

__all__ = ["Figure", "HardwareProfile", "PlanRequest", "TrainingPlanRequest", "load_hardware", "make_plan",
           "make_training_plan", "format_plan"]

_UNIT_FIGURES = {
    "dm_s_per_step_per_latent_mvox": "s",
    "decode_s_per_mvox": "s",
    "ssv_latent_s_per_mvox": "s",
    "mgm_core_s_per_mvox": "core*s",
    "writer_core_s_per_mvox": "core*s",
    "startup_s": "s",
    "image_bytes_per_voxel": "B",
    "label_bytes_per_voxel": "B",
    "confidence_bytes_per_voxel": "B",
    "preview_bytes_per_sample": "B",
}
# optional figures, needed by the training plan only
_TRAIN_FIGURES = {
    "infer_peak_gib_per_latent_mvox": "GiB",   # denoiser forward (no grad): peak GPU memory per latent Mvox
    "train_backward_factor": "ratio",          # (forward + backward) / forward time of the denoiser
    "train_activation_factor": "ratio",        # activations kept for backward / the inference peak
    "encode_vs_decode": "ratio",               # VAE encode time / decode time at one size
    "gpu_memory_gib": "GiB",                   # memory of one GPU
}


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str

    def to_json(self) -> dict:
        return {"value": self.value, "unit": self.unit, "source": self.source}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    accelerator: str                    # gpu | cpu
    sampler_actors_per_node: int        # one per GPU; CPU profiles: actors on the node
    node_cores: int                     # cores of the sampler node type
    figures: dict[str, Figure] = field(default_factory=dict)
    prices: dict[str, Figure] = field(default_factory=dict)


def _measured(path: str) -> tuple[dict, str]:
    p = Path(resolve(path))   # benchmarks/results/...: the cwd's, $FCAS_HOME's or the bundled copy
    if not p.is_file():
        raise ValueError(f"hardware profile: benchmark results {p} not found; run benchmarks/synthesize.py --json {path}")
    data = json.loads(p.read_text())
    return data, f"{path} (benchmarks/synthesize.py, {data.get('cpus')} CPUs, {data.get('date')})"


def _from_benchmark(path: str) -> dict[str, Figure]:
    """Unit costs derived from a ``benchmarks/synthesize.py --json`` result (single-threaded stages)."""
    data, src = _measured(path)
    pipe, ssv = data["pipeline"], data["ssv"]
    preset = load_preset(pipe["preset"])
    mvox = pipe["voxels"] / 1e6
    latent_mvox = math.prod(preset.latent_shape) / 1e6
    split = pipe["sampler_split_seconds"]
    alone = pipe["stage_alone_seconds_per_sample"]
    files = pipe["output_bytes_per_sample"]
    vox = pipe["voxels"]
    at = f"{src}; {pipe['preset']} preset {tuple(preset.shape)}"
    return {
        "dm_s_per_step_per_latent_mvox": Figure(split["sample_s"] / pipe["steps"] / latent_mvox, "s",
                                                f"{at}: sample_s / steps / latent Mvox"),
        "decode_s_per_mvox": Figure(split["decode_s"] / mvox, "s", f"{at}: decode_s / Mvox"),
        "ssv_latent_s_per_mvox": Figure(split["ssv_s"] / mvox, "s", f"{at}: ssv_s (latent mode) / Mvox"),
        "mgm_core_s_per_mvox": Figure(alone["mgm"] / mvox, "core*s", f"{at}: MGM stage alone, 1 thread, / Mvox"),
        "writer_core_s_per_mvox": Figure(alone["writer"] / mvox, "core*s",
                                         f"{at}: writer stage alone (NIfTI gzip + preview), 1 thread, / Mvox"),
        "startup_s": Figure(pipe["pipeline_startup_s"], "s",
                            f"{at}: pipeline time at n=2 minus 2 samples at the marginal rate"),
        "image_bytes_per_voxel": Figure(files["image.nii.gz"] / vox, "B", f"{at}: mean compressed image file / voxels"),
        "label_bytes_per_voxel": Figure(files["label.nii.gz"] / vox, "B", f"{at}: mean compressed label file / voxels"),
        "confidence_bytes_per_voxel": Figure(files["confidence.nii.gz"] / vox, "B",
                                             f"{at}: mean compressed confidence file / voxels"),
        "preview_bytes_per_sample": Figure(files.get("preview.png", 0), "B", f"{at}: mean preview PNG"),
        "_ssv_image_overhead": Figure(ssv["ssv_overhead_image"], "ratio", f"{src}: image-mode SSV vs off"),
    }


def _figure(name: str, spec: Any, where: str) -> Figure:
    if not isinstance(spec, Mapping) or "value" not in spec or not str(spec.get("source", "")).strip():
        raise ValueError(f"{where}: figure {name!r} needs a value and a non-empty source, got {spec!r}")
    unit = _UNIT_FIGURES.get(name, _TRAIN_FIGURES.get(name, ""))
    return Figure(float(spec["value"]), str(spec.get("unit", unit)), str(spec["source"]))


def load_hardware(name_or_path: str) -> HardwareProfile:
    """``configs/hardware/<name>.yaml`` (or a path) -> profile with every figure sourced."""
    cfg = dict(read_config("hardware", name_or_path, "hardware profile"))
    where = f"hardware profile {name_or_path!r}"
    figures: dict[str, Figure] = {}
    if cfg.get("measured"):
        figures.update(_from_benchmark(str(cfg["measured"])))
    base = cfg.get("inherit")
    if base:
        figures = {**load_hardware(str(base)).figures, **figures}
    for k, spec in (cfg.get("figures") or {}).items():
        if k not in _UNIT_FIGURES and k not in _TRAIN_FIGURES:
            raise ValueError(f"{where}: unknown figure {k!r}; known: {sorted({**_UNIT_FIGURES, **_TRAIN_FIGURES})}")
        figures[k] = _figure(k, spec, where)
    missing = sorted(set(_UNIT_FIGURES) - set(figures))
    if missing:
        raise ValueError(f"{where}: missing figures {missing} (give them under figures: or measured:)")
    accel = str(cfg.get("accelerator", "gpu"))
    if accel not in ("gpu", "cpu"):
        raise ValueError(f"{where}: accelerator must be gpu or cpu, got {accel!r}")
    prices = {k: _figure(k, v, where) for k, v in (cfg.get("prices") or {}).items()}
    return HardwareProfile(name=str(cfg.get("name", name_or_path)), description=str(cfg.get("description", "")),
                           accelerator=accel, sampler_actors_per_node=int(cfg.get("sampler_actors_per_node", 1)),
                           node_cores=int(cfg.get("node_cores", 1)), figures=figures, prices=prices)


@dataclass(frozen=True)
class PlanRequest:
    n: int
    preset: str = "paper"
    hardware: str = "a100-80gb"
    sampler_nodes: int = 8               # GPU workers (or CPU sampler nodes on a CPU profile)
    cpu_worker_cores: int = 32           # cores of one CPU worker (cluster/aws.yaml: c6i.8xlarge)
    steps: int = 20
    ssv_mode: str = "latent"             # latent | image | off
    ssv_every: int = 4
    ssv_start: float = 0.0               # fraction of the steps skipped before SSV collects
    preview: bool = True
    prices: Mapping[str, Any] = field(default_factory=dict)   # overrides of the profile's prices

    def __post_init__(self) -> None:
        if self.n < 0 or self.sampler_nodes < 1 or self.cpu_worker_cores < 1 or self.steps < 1:
            raise ValueError(f"plan needs n >= 0, sampler_nodes >= 1, cpu_worker_cores >= 1, steps >= 1; got {self}")
        if self.ssv_mode not in ("latent", "image", "off"):
            raise ValueError(f"ssv_mode must be latent, image or off, got {self.ssv_mode!r}")


def _d(value: float, unit: str, how: str) -> Figure:
    return Figure(value, unit, f"derived: {how}")


def make_plan(req: PlanRequest, hw: HardwareProfile | None = None) -> dict:
    """The plan as ``{"request", "inputs": {name: Figure}, "plan": {name: Figure}}`` (JSON-able via
    :func:`plan_to_json`)."""
    hw = hw or load_hardware(req.hardware)
    f = hw.figures
    p = load_preset(req.preset)
    mvox = math.prod(p.shape) / 1e6
    lat = math.prod(p.latent_shape) / 1e6
    inputs = {k: v for k, v in f.items() if not k.startswith("_")}
    inputs["preset_mvox"] = Figure(mvox, "Mvox", f"configs/preset/{p.name}.yaml shape {tuple(p.shape)}")
    inputs["preset_latent_mvox"] = Figure(lat, "Mvox", f"configs/preset/{p.name}.yaml latent_shape {tuple(p.latent_shape)}")
    out: dict[str, Figure] = {}
    dm = req.steps * lat * f["dm_s_per_step_per_latent_mvox"].value
    dec = mvox * f["decode_s_per_mvox"].value
    n_inter = len(range(int(req.ssv_start * req.steps), req.steps, req.ssv_every))
    ssv = {"off": 0.0, "latent": mvox * f["ssv_latent_s_per_mvox"].value, "image": n_inter * dec}[req.ssv_mode]
    sampler_s = dm + dec + ssv
    out["sampler_s_per_sample"] = _d(sampler_s, "s", f"steps*latent_Mvox*dm ({dm:.3g}) + Mvox*decode ({dec:.3g}) + "
                                     f"SSV {req.ssv_mode} ({ssv:.3g})")
    cpu_core_s = mvox * (f["mgm_core_s_per_mvox"].value + f["writer_core_s_per_mvox"].value)
    out["cpu_core_s_per_sample"] = _d(cpu_core_s, "core*s", "Mvox * (mgm + writer core*s per Mvox)")
    actors = req.sampler_nodes * hw.sampler_actors_per_node
    out["sampler_actors"] = _d(actors, "actors", f"sampler_nodes * {hw.sampler_actors_per_node} per node")
    sampler_rate = actors / sampler_s
    out["sampler_samples_per_s"] = _d(sampler_rate, "samples/s", "sampler_actors / sampler_s_per_sample")
    cores_needed = sampler_rate * cpu_core_s
    out["cpu_cores_to_keep_samplers_busy"] = _d(math.ceil(cores_needed), "cores", "sampler rate * cpu core*s per sample")
    if hw.accelerator == "gpu":
        cpu_workers = max(1, math.ceil(cores_needed / req.cpu_worker_cores))
        out["cpu_workers"] = _d(cpu_workers, "nodes", f"ceil(cores / {req.cpu_worker_cores} cores per CPU worker)")
        cpu_cores = cpu_workers * req.cpu_worker_cores
    else:
        # a GPU-less node: the sampler actors hold their cores; MGM and writing share the rest
        cpu_workers = 0
        cpu_cores = max(req.sampler_nodes * hw.node_cores - actors, 1)
        out["cpu_workers"] = _d(0, "nodes", f"none: MGM/writer use the {cpu_cores} core(s) the samplers leave free")
    cpu_rate = cpu_cores / cpu_core_s if cpu_core_s > 0 else math.inf
    rate = min(sampler_rate, cpu_rate)
    out["pipeline_samples_per_s"] = _d(rate, "samples/s", "min(sampler rate, CPU cores / cpu core*s per sample)")
    wall = f["startup_s"].value + (req.n / rate if req.n else 0.0)
    out["wall_s"] = _d(wall, "s", "startup + n / pipeline rate")
    out["wall_h"] = _d(wall / 3600, "h", "wall_s / 3600")
    gpus = req.sampler_nodes if hw.accelerator == "gpu" else 0
    out["gpu_hours"] = _d(gpus * wall / 3600, "GPU*h", f"{gpus} GPUs held for the wall time")
    out["gpu_busy_hours"] = _d(req.n * sampler_s / 3600 if gpus else 0.0, "GPU*h", "n * sampler_s (no idle)")
    bytes_per = mvox * 1e6 * (f["image_bytes_per_voxel"].value + f["label_bytes_per_voxel"].value
                              + f["confidence_bytes_per_voxel"].value)
    bytes_per += f["preview_bytes_per_sample"].value if req.preview else 0.0
    out["output_bytes_per_sample"] = _d(bytes_per, "B", "voxels * (image + label + CM compressed bytes/voxel) + preview")
    out["output_bytes"] = _d(req.n * bytes_per, "B", "n * bytes per sample")
    out["output_tb"] = _d(req.n * bytes_per / 1e12, "TB", "output_bytes / 1e12")
    prices = {k: v for k, v in hw.prices.items()}
    for k, v in (req.prices or {}).items():
        prices[k] = Figure(float(v), "USD/h", "given on the command line (prices.*)")
    cost = 0.0
    how = []
    if "sampler_node_hour" in prices:
        cost += req.sampler_nodes * wall / 3600 * prices["sampler_node_hour"].value
        how.append("sampler_nodes * wall_h * sampler_node_hour")
    if cpu_workers and "cpu_worker_hour" in prices:
        cost += cpu_workers * wall / 3600 * prices["cpu_worker_hour"].value
        how.append("cpu_workers * wall_h * cpu_worker_hour")
    if "head_hour" in prices:
        cost += wall / 3600 * prices["head_hour"].value
        how.append("wall_h * head_hour")
    if how:
        out["cost_usd"] = _d(cost, "USD", " + ".join(how))
    inputs.update({f"price_{k}": v for k, v in prices.items()})
    return {"request": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in req.__dict__.items()},
            "hardware": {"name": hw.name, "description": hw.description, "accelerator": hw.accelerator},
            "bottleneck": "sampler" if sampler_rate <= cpu_rate else "cpu", "inputs": inputs, "plan": out}


@dataclass(frozen=True)
class TrainingPlanRequest:
    """A TCDM training run. The paper's: 200 ImageCAS cases, 200 epochs, batch 4 (here 2 pairs, both
    directions of each: 4 samples), 512x512x128 crops, one A100."""

    preset: str = "paper"
    model: str = "paper"                 # configs/model/<name>.yaml (parameters counted from it)
    hardware: str = "a100-80gb"
    gpus: int = 1
    cases: int = 200
    epochs: int = 200                    # an epoch: every case once as the target I_A
    batch_pairs: int = 2                 # pairs per GPU and step (x2 directions: the samples of one step)
    latent_cache: bool = False           # latents from the cache job instead of encoding every crop
    ema: bool = True
    amp: bool = True                     # fp16 autocast (train.amp, on by default on CUDA): activations at 2 B

    def __post_init__(self) -> None:
        if min(self.gpus, self.cases, self.epochs, self.batch_pairs) < 1:
            raise ValueError(f"training plan needs gpus, cases, epochs, batch_pairs >= 1; got {self}")


def _parameters(model: str, schema: str = "cardiac") -> tuple[int, int, str]:
    """(trainable UNet + ControlNet, frozen VAE) parameter counts of ``configs/model/<model>.yaml``, built on
    the meta device (no memory, no weights)."""
    import torch

    from fcas.diffusion.conditioning import ConditionConfig
    from fcas.models.networks import ModelConfig, build_tcdm, build_vae

    cfg = ModelConfig.from_dict(dict(read_config("model", model, "model config")))
    with torch.device("meta"):
        tcdm = build_tcdm(cfg, ConditionConfig(schema=schema).channels, init_controlnet_from_unet=False)
        vae = build_vae(cfg.vae)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return n(tcdm.unet) + n(tcdm.controlnet), n(vae), f"configs/model/{model}.yaml, counted on the meta device"


def make_training_plan(req: TrainingPlanRequest, hw: HardwareProfile | None = None) -> dict:
    """Steps, wall time, GPU-hours and per-GPU memory of TCDM training, each figure sourced; the time
    scales the profile's measured or published *sampling* cost of the same denoiser, so every training
    figure rests on the stated factors (``train_*`` figures of the profile) until a GPU measures one."""
    hw = hw or load_hardware(req.hardware)
    if hw.accelerator != "gpu":
        raise ValueError(f"hardware profile {hw.name!r} has no GPU; the training plan is for GPU profiles")
    f = hw.figures
    missing = sorted(set(_TRAIN_FIGURES) - set(f))
    if missing:
        raise ValueError(f"hardware profile {hw.name!r}: the training plan needs figures {missing}")
    p = load_preset(req.preset)
    crop = tuple(p.train_crop or p.shape)
    down = [a // b for a, b in zip(p.shape, p.latent_shape)]
    crop_mvox = math.prod(crop) / 1e6
    crop_lat = math.prod(c // d for c, d in zip(crop, down)) / 1e6
    trainable, frozen, where = _parameters(req.model)
    inputs = {k: v for k, v in f.items() if k in ("dm_s_per_step_per_latent_mvox", "decode_s_per_mvox", *_TRAIN_FIGURES)}
    inputs["crop_mvox"] = Figure(crop_mvox, "Mvox", f"configs/preset/{p.name}.yaml train_crop {crop}")
    inputs["crop_latent_mvox"] = Figure(crop_lat, "Mvox", f"train_crop / the preset's {tuple(down)}x downsampling")
    inputs["trainable_parameters"] = Figure(trainable, "params", f"UNet + ControlNet of {where}")
    inputs["vae_parameters"] = Figure(frozen, "params", f"frozen VAE of {where}")
    out: dict[str, Figure] = {}
    per_gpu = 2 * req.batch_pairs
    steps = math.ceil(req.epochs * req.cases / (per_gpu * req.gpus))
    out["steps"] = _d(steps, "steps", f"ceil(epochs * cases / ({per_gpu} samples per GPU and step * {req.gpus} GPUs))")
    fwd = crop_lat * f["dm_s_per_step_per_latent_mvox"].value
    denoise = per_gpu * fwd * f["train_backward_factor"].value
    encode = 0.0 if req.latent_cache else per_gpu * crop_mvox * f["decode_s_per_mvox"].value * f["encode_vs_decode"].value
    step_s = denoise + encode
    out["step_s"] = _d(step_s, "s", f"{per_gpu} samples * (crop latent Mvox * dm * train_backward_factor ({denoise:.3g} s) + "
                       + ("no encode: latent cache)" if req.latent_cache else
                          f"crop Mvox * decode * encode_vs_decode ({encode:.3g} s))"))
    wall = steps * step_s + f["startup_s"].value
    out["wall_h"] = _d(wall / 3600, "h", "(steps * step_s + startup) / 3600; data-parallel overhead not counted")
    out["gpu_hours"] = _d(req.gpus * wall / 3600, "GPU*h", f"{req.gpus} GPUs * wall_h")
    gib = 1024 ** 3
    state = trainable * (4 + 4 + 8 + (4 if req.ema else 0)) + frozen * 4
    out["weights_and_optimizer_gib"] = _d(state / gib, "GiB", "trainable * (4 weight + 4 grad + 8 AdamW"
                                          + (" + 4 EMA" if req.ema else "") + " B) + VAE * 4 B, fp32")
    act = per_gpu * crop_lat * f["infer_peak_gib_per_latent_mvox"].value * f["train_activation_factor"].value
    act *= 0.5 if req.amp else 1.0
    out["activations_gib"] = _d(act, "GiB", f"{per_gpu} samples * crop latent Mvox * inference peak per latent Mvox (fp32) "
                                "* train_activation_factor" + (" * 0.5 (fp16 autocast)" if req.amp else ""))
    peak = state / gib + act
    out["peak_memory_gib_per_gpu"] = _d(peak, "GiB", "weights_and_optimizer + activations")
    out["memory_fraction_of_gpu"] = _d(peak / f["gpu_memory_gib"].value, "ratio",
                                       "peak_memory_gib_per_gpu / gpu_memory_gib (> 1: lower batch_pairs or the crop)")
    return {"title": f"FCaS TCDM training plan: preset={p.name} model={req.model} hardware={hw.name} gpus={req.gpus} "
                     f"cases={req.cases} epochs={req.epochs} batch_pairs={req.batch_pairs} "
                     f"latent_cache={str(req.latent_cache).lower()}",
            "request": dict(req.__dict__), "hardware": {"name": hw.name, "description": hw.description,
                                                        "accelerator": hw.accelerator},
            "bottleneck": "gpu", "inputs": inputs, "plan": out}


def plan_to_json(plan: dict) -> dict:
    return {**plan, "inputs": {k: v.to_json() for k, v in plan["inputs"].items()},
            "plan": {k: v.to_json() for k, v in plan["plan"].items()}}


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:.3e}"


def format_plan(plan: dict) -> str:
    """Human-readable plan: one line per figure with its unit and source."""
    r = plan["request"]
    title = plan.get("title") or (f"FCaS synthesis plan: n={r['n']:,} preset={r['preset']} hardware="
                                  f"{plan['hardware']['name']} sampler_nodes={r['sampler_nodes']} steps={r['steps']} "
                                  f"ssv={r['ssv_mode']}")
    lines = [title, "", "inputs:"]
    for k, v in plan["inputs"].items():
        lines.append(f"  {k:34s} {_fmt(v.value):>14s} {v.unit:10s} [{v.source}]")
    lines += ["", f"plan (bottleneck: {plan['bottleneck']}):"]
    for k, v in plan["plan"].items():
        lines.append(f"  {k:34s} {_fmt(v.value):>14s} {v.unit:10s} [{v.source}]")
    return "\n".join(lines)
