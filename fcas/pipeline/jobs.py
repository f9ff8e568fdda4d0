"""Hydra config -> frozen job dataclasses, resolved once on the driver.

Every ``*_from_cfg`` first refuses a config that holds credentials (:func:`check_job_config`):
credentials come from the environment only, so they never reach a saved config or a manifest.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from fcas.security import CredentialsInConfigError, refuse_credentials


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
    from fcas.prepare import PrepareSettings

    settings = PrepareSettings(
        shape=tuple(int(v) for v in cfg.preset.shape),
        spacing=tuple(float(v) for v in cfg.preset.spacing),
        max_voxels=int(cfg.limits.max_voxels),
        hu_min=float(cfg.limits.hu_min),
        hu_max=float(cfg.limits.hu_max),
        min_hu_spread=float(cfg.limits.min_hu_spread),
        label_mapping=cfg.label_mapping,
    )
    return PrepareJob(
        source=str(cfg.source),
        out=str(cfg.out),
        settings=settings,
        images=str(cfg.images),
        labels=cfg.labels,               # one glob, or {label source: glob}
        schema=str(cfg.schema),
        splits=tuple((str(k), float(v)) for k, v in cfg.splits.items()),
        seed=int(cfg.seed),
        preview=int(cfg.get("preview", 0)),
    )


def synthesis_job_from_cfg(cfg: DictConfig):
    from omegaconf import OmegaConf

    check_job_config(cfg, "synthesize")

    from fcas.models.checkpoint import config_hash
    from fcas.pipeline.synthesize import Resources, SynthesisJob
    from fcas.synthesis.sampler import SamplerSettings

    s, v, r = cfg.sampler, cfg.ssv, cfg.resources
    sampler = SamplerSettings(
        steps=int(s.steps), scheduler=str(s.scheduler), eta=float(s.eta),
        ssv_mode=str(v.mode), ssv_every=int(v.every), ssv_collect=str(v.collect), ssv_quantile=float(v.quantile),
        ssv_start=float(v.get("start", 0.0)),
        window=None if s.window is None else tuple(int(w) for w in s.window),
        decode_window=None if s.decode_window is None else tuple(int(w) for w in s.decode_window),
        device=str(s.device),
    )
    resources = Resources(
        sampler_actors=tuple(int(a) for a in r.sampler_actors), sampler_gpus=float(r.sampler_gpus),
        sampler_cpus=float(r.sampler_cpus), sampler_batch_size=int(r.sampler_batch_size),
        mgm_actors=tuple(int(a) for a in r.mgm_actors), mgm_cpus=float(r.mgm_cpus),
        writer_cpus=float(r.writer_cpus), plan_cpus=float(r.plan_cpus), writer_batch_size=int(r.writer_batch_size),
        actor_max_restarts=int(r.actor_max_restarts), actor_task_retries=int(r.actor_task_retries),
        writer_retries=int(r.writer_retries), sampler_tries=int(r.sampler_tries),
        compact_every=int(r.get("compact_every", 5000)), lease_ttl=float(r.get("lease_ttl", 120.0)),
        sampler_threads=int(r.get("sampler_threads", 0)),
    )
    plain = OmegaConf.to_container(cfg, resolve=True)
    # the hash names the settings that decide a sample's content, so n / out / resources may change on reruns
    traced = {k: plain[k] for k in ("preset", "mgm", "seed", "templates", "checkpoint", "schema", "sampler", "ssv")}
    return SynthesisJob(
        n=int(cfg.n), out=str(cfg.out), checkpoint=str(cfg.checkpoint), templates=str(cfg.templates),
        run_seed=int(cfg.seed), shape=tuple(int(x) for x in cfg.preset.shape),
        spacing=tuple(float(x) for x in cfg.preset.spacing), sampler=sampler, mgm=plain["mgm"],
        schema=str(cfg.schema), preview=bool(cfg.preview), resources=resources, config_hash=config_hash(traced),
        checkpoint_digest=cfg.get("checkpoint_digest") or None,
        identity={k: v for k, v in traced.items() if k != "checkpoint"},
    )


def plan_request_from_cfg(cfg: DictConfig):
    """configs/plan.yaml -> :class:`fcas.planning.PlanRequest` (``what=synthesis``) or
    :class:`fcas.planning.TrainingPlanRequest` (``what=training``)."""
    from omegaconf import OmegaConf

    from fcas.planning import PlanRequest, TrainingPlanRequest

    what = str(cfg.get("what", "synthesis"))
    if what not in ("synthesis", "training"):
        raise ValueError(f"what={what!r}: use synthesis or training")
    if what == "training":
        t = cfg.training
        return TrainingPlanRequest(preset=str(cfg.preset.name), model=str(t.model), hardware=str(cfg.gpu),
                                   gpus=int(t.gpus), cases=int(t.cases), epochs=int(t.epochs),
                                   batch_pairs=int(t.batch_pairs), latent_cache=bool(t.latent_cache),
                                   ema=bool(t.ema), amp=bool(t.amp))

    return PlanRequest(n=int(cfg.n), preset=str(cfg.preset.name), hardware=str(cfg.gpu),
                       sampler_nodes=int(cfg.sampler_nodes), cpu_worker_cores=int(cfg.cpu_worker_cores),
                       steps=int(cfg.sampler.steps), ssv_mode=str(cfg.ssv.mode), ssv_every=int(cfg.ssv.every),
                       ssv_start=float(cfg.ssv.get("start", 0.0)),
                       preview=bool(cfg.preview),
                       prices={k: v for k, v in (OmegaConf.to_container(cfg.prices) or {}).items() if v is not None})
