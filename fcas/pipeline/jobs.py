"""Hydra config -> frozen job dataclasses, resolved once on the driver (read by :func:`fcas.settings.build`:
unknown keys of a group that becomes one dataclass, e.g. ``resources``, are refused, values typed).

Every ``*_from_cfg`` first refuses a config that holds credentials (:func:`check_job_config`):
credentials come from the environment only, so they never reach a saved config or a manifest.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from fcas.security import CredentialsInConfigError, refuse_credentials
from fcas.settings import build


def plain_config(cfg) -> dict:
    """A job's config as a plain dict: a Hydra ``DictConfig`` resolved, a mapping copied."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def check_job_config(cfg, job: str = "job") -> None:
    """``CredentialsInConfigError`` (a ``ValueError``) when the config holds credential keys or values.

    Inside a Hydra run (a ``jobs/*.py`` entry point) the refusal is printed to stderr and the
    process exits with status 2 instead: Hydra answers any exception of the task by printing the
    command-line overrides, which would repeat the credential the user just typed.
    """
    try:
        refuse_credentials(cfg, f"the {job} config")
    except CredentialsInConfigError as err:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_job_from_cfg(cfg: DictConfig):
    """``configs/prepare.yaml`` -> :class:`fcas.pipeline.prepare.PrepareJob` (imports are per job, so that a
    light job such as ``plan`` does not pay for Ray and MONAI)."""
    check_job_config(cfg, "prepare")

    from fcas.pipeline.prepare import PrepareJob

    c = OmegaConf.to_container(cfg, resolve=True)
    settings = {"shape": c["preset"]["shape"], "spacing": c["preset"]["spacing"], **c["limits"],
                "label_mapping": c["label_mapping"]}
    return build(PrepareJob, {
        "source": c["source"], "out": c["out"], "settings": settings, "images": c["images"],
        "labels": c["labels"],           # one glob, or {label source: glob}
        "schema": c["schema"], "splits": c["splits"], "seed": c["seed"], "preview": c.get("preview", 0),
    })


def synthesis_job_from_cfg(cfg: DictConfig):
    check_job_config(cfg, "synthesize")

    from fcas.models.checkpoint import config_hash
    from fcas.pipeline.synthesize import SynthesisJob

    plain = OmegaConf.to_container(cfg, resolve=True)
    # the hash names the settings that decide a sample's content, so n / out / resources may change on reruns
    traced = {k: plain[k] for k in ("preset", "mgm", "seed", "templates", "checkpoint", "schema", "sampler", "ssv")}
    return build(SynthesisJob, {
        "n": plain["n"], "out": plain["out"], "checkpoint": plain["checkpoint"], "templates": plain["templates"],
        "run_seed": plain["seed"], "shape": plain["preset"]["shape"], "spacing": plain["preset"]["spacing"],
        "sampler": {**plain["sampler"], **{f"ssv_{k}": v for k, v in plain["ssv"].items()}},   # SamplerSettings
        "mgm": plain["mgm"], "schema": plain["schema"], "preview": plain["preview"],
        "resources": plain["resources"], "config_hash": config_hash(traced),
        "checkpoint_digest": plain.get("checkpoint_digest") or None,
        "identity": {k: v for k, v in traced.items() if k != "checkpoint"},
    })


def plan_request_from_cfg(cfg: DictConfig):
    """configs/plan.yaml -> :class:`fcas.planning.PlanRequest` (``what=synthesis``) or
    :class:`fcas.planning.TrainingPlanRequest` (``what=training``)."""
    from fcas.planning import PlanRequest, TrainingPlanRequest

    c = OmegaConf.to_container(cfg, resolve=True)
    what = str(c.get("what", "synthesis"))
    if what not in ("synthesis", "training"):
        raise ValueError(f"what={what!r}: use synthesis or training")
    common = {"preset": c["preset"]["name"], "hardware": c["gpu"]}
    if what == "training":
        return build(TrainingPlanRequest, {**common, **c["training"]}, where="training")
    ssv = c["ssv"]
    return build(PlanRequest, {
        **common, "n": c["n"], "sampler_nodes": c["sampler_nodes"], "cpu_worker_cores": c["cpu_worker_cores"],
        "steps": c["sampler"]["steps"], "ssv_mode": ssv["mode"], "ssv_every": ssv["every"],
        "ssv_start": ssv.get("start", 0.0), "preview": c["preview"],
        "prices": {k: v for k, v in (c.get("prices") or {}).items() if v is not None},
    })
