"""Ray wiring of ``make reproduce``: the two Ray jobs the reproduction calls (prepare, synthesize) and
``run(cfg)`` for ``jobs/reproduce.py``. The stages and the report are :mod:`fcas.reproduction` (Ray-free)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import DictConfig

from fcas.pipeline.jobs import plain_config
from fcas.pipeline.prepare import PrepareJob, run_prepare
from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
from fcas.prepare import PrepareSettings
from fcas.reproduction import ReproduceSettings, Runners, run_reproduce
from fcas.synthesis.sampler import SamplerSettings

log = logging.getLogger(__name__)

__all__ = ["ray_runners", "settings_from_cfg", "run"]


def ray_runners(ray_address: str | None = None, progress: bool = False) -> Runners:
    """:class:`fcas.reproduction.Runners` backed by the prepare and synthesis Ray jobs."""

    def prepare(source: str, out: str, shape, spacing, splits, seed: int) -> dict:
        job = PrepareJob(source=source, out=out, settings=PrepareSettings(shape=tuple(shape), spacing=tuple(spacing)),
                         splits=tuple(splits), seed=seed, preview=0)
        return run_prepare(job, ray_address)

    def synthesize(n: int, out: str, checkpoint: str, templates: str, run_seed: int, steps: int, ssv_every: int,
                   shape, spacing, sampler_actors: int = 1, ssv_mode: str = "latent", ssv_start: float = 0.0,
                   sampler_threads: int = 0) -> dict:
        k = int(sampler_actors)
        job = SynthesisJob(n=n, out=out, checkpoint=checkpoint, templates=templates, run_seed=run_seed,
                           shape=tuple(shape), spacing=tuple(spacing), preview=False,
                           sampler=SamplerSettings(steps=steps, ssv_every=ssv_every, ssv_mode=ssv_mode,
                                                   ssv_start=ssv_start),
                           resources=Resources(sampler_actors=(k, k), sampler_cpus=0.5 if k < 2 else 0.6,
                                               sampler_threads=int(sampler_threads)))
        return run_synthesis(job, ray_address, progress=progress)

    return Runners(prepare=prepare, synthesize=synthesize)


def settings_from_cfg(cfg: DictConfig | Mapping[str, Any]) -> tuple[ReproduceSettings, dict]:
    """``configs/reproduce.yaml`` -> (settings of the chosen ``scale``, the plain config that made them)."""
    from fcas.pipeline.jobs import check_job_config

    check_job_config(cfg, "reproduce")
    c = plain_config(cfg)
    scale = str(c["scale"])
    if scale not in c["scales"]:
        raise ValueError(f"scale={scale!r}: choose one of {sorted(c['scales'])}")
    d = {**dict(c["scales"][scale]), "scale": scale}
    for k in ("work", "results", "plots"):
        if c.get(k) is not None:
            d[k] = c[k]
    d["work"] = str(d["work"]).replace("{scale}", scale)
    used = {"scale": scale, **{k: v for k, v in d.items()}}
    return ReproduceSettings.from_dict(d), used


def run(cfg: DictConfig | Mapping[str, Any]) -> dict:
    s, used = settings_from_cfg(cfg)
    c = plain_config(cfg)
    out = run_reproduce(s, ray_runners((c.get("ray") or {}).get("address"), bool(c.get("progress", False))), used)
    log.info("reproduce: %s", out)
    return out
