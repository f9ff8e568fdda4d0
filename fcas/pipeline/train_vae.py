"""Ray Train wiring of VAE training (same ``fit`` as TCDM; the loop is :func:`fcas.training.vae.train_vae_loop`).

The cases are streamed as for TCDM (:func:`fcas.pipeline.train_tcdm.cases_dataset`, a buffer of
``train.buffer_cases`` per worker); the held-out ``val_data`` set is small and loaded by rank 0.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import DictConfig

from fcas.training.vae_settings import VAESettings
from fcas.diffusion.data import case_rows
from fcas.pipeline.ray_env import ensure_ray
from fcas.pipeline.jobs import plain_config
from fcas.pipeline.train_tcdm import cases_dataset, fit, shard_cases, stream_plan, worker_hooks

log = logging.getLogger(__name__)

__all__ = ["vae_settings_from_cfg", "run"]


def vae_settings_from_cfg(cfg: DictConfig | Mapping[str, Any]) -> VAESettings:
    from fcas.pipeline.jobs import check_job_config

    check_job_config(cfg, "train_vae")
    c = plain_config(cfg)
    preset, train = c["preset"], dict(c.get("train") or {})
    if train.get("crop") is None and preset.get("train_crop") is not None:
        train["crop"] = preset["train_crop"]
    return VAESettings.from_dict({
        "data": c["data"], "out": c["out"], "shape": preset["shape"], "spacing": preset["spacing"],
        "preset": preset.get("name", "custom"), "model_name": c["model"].get("name", "custom"),
        "vae": c["model"]["vae"], "train": train,
    })


def _vae_worker(config: dict) -> None:
    from fcas.training.vae import train_vae_loop

    settings = VAESettings.from_dict(config["settings"])
    rank, world, device, wrap, report = worker_hooks(config.get("threads"))
    summary = train_vae_loop(settings, rank=rank, world_size=world, device=device, wrap_model=wrap,
                             report=report, progress=config.get("progress", True), case_stream=shard_cases)
    if summary["steps_run"] == 0:
        report({"step": summary["final_step"], "steps_run": 0})


def run(cfg: DictConfig | Mapping[str, Any]) -> dict:
    from fcas.models.checkpoint import latest_checkpoint

    from dataclasses import replace

    from fcas.io.storage import absolute

    settings = vae_settings_from_cfg(cfg)
    # Ray Train workers run in their own directory: resolve relative paths here, on the driver
    settings = replace(settings, data=absolute(settings.data), out=absolute(settings.out),
                       train=replace(settings.train, val_data=absolute(settings.train.val_data)))
    tr = plain_config(cfg).get("trainer") or {}
    workers = int(tr.get("num_workers", 2))
    rows = case_rows(settings.data, "train")   # a missing data source is one line, before Ray starts
    ensure_ray(tr.get("address"))
    data_cpus = float(tr.get("data_cpus", 0.25))
    ds = cases_dataset(rows, settings.shape, settings.spacing, data_cpus, settings.train.seed)
    settings = replace(settings, train=stream_plan(settings.train, len(rows), workers, 1))
    result = fit(_vae_worker, {"settings": settings.to_dict(), "progress": bool(tr.get("progress", True))},
                 name=f"vae-{settings.preset}", num_workers=workers, datasets={"train": ds}, data_cpus=data_cpus,
                 use_gpu=bool(tr.get("use_gpu", False)), address=tr.get("address"),
                 storage_path=tr.get("storage_path"), max_failures=int(tr.get("max_failures", 0)),
                 cpus_per_worker=float(tr.get("cpus_per_worker", 0.5)))
    summary = {"metrics": dict(result.metrics or {}), "latest_checkpoint": latest_checkpoint(settings.out),
               "out": settings.out}
    log.debug("train_vae: %s", summary)   # the job prints its own one-line summary
    return summary
