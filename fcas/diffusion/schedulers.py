"""Scheduler glue: MONAI's ``DDPMScheduler`` / ``DDIMScheduler`` / ``RFlowScheduler`` from one config.

Training uses ``kind='ddpm'`` (noise prediction, the paper's Eq. 3) or ``kind='rflow'`` (velocity, MAISI v2).
A model trained with DDPM samples with DDIM (or DDPM); a model trained with RFlow samples with RFlow.
Timesteps for training are drawn here from an explicit ``torch.Generator`` (MONAI's RFlow draws from
the global RNG, which would break per-sample determinism).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SchedulerConfig", "build_train_scheduler", "build_sampling_scheduler", "sample_timesteps", "training_target"]

SAMPLERS_FOR = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}


@dataclass(frozen=True)
class SchedulerConfig:
    kind: str = "ddpm"
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"  # MAISI's DDPM settings
    beta_start: float = 0.0015
    beta_end: float = 0.0195

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS_FOR:
            raise ValueError(f"unknown scheduler kind {self.kind!r}; use one of {sorted(SAMPLERS_FOR)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")


def build_train_scheduler(cfg: SchedulerConfig):
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler   # here: the config alone needs no MONAI

    if cfg.kind == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=True)
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        clip_sample=False,
    )


def build_sampling_scheduler(cfg: SchedulerConfig, sampler: str, num_inference_steps: int):
    """Scheduler for reverse sampling with ``num_inference_steps`` steps, timesteps already set."""
    if sampler not in SAMPLERS_FOR[cfg.kind]:
        raise ValueError(
            f"sampler {sampler!r} does not fit a model trained with {cfg.kind!r}; use one of {SAMPLERS_FOR[cfg.kind]}"
        )
    if not 1 <= num_inference_steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {cfg.num_train_timesteps}], got {num_inference_steps}")
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    if sampler == "rflow":
        s = RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=True)
    else:
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        s = cls(
            num_train_timesteps=cfg.num_train_timesteps,
            schedule=cfg.schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            clip_sample=False,
        )
    s.set_timesteps(num_inference_steps)
    return s


def sample_timesteps(scheduler, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training timesteps, uniform over ``[0, T)`` (int64), drawn from ``generator``."""
    return torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator, dtype=torch.long)


def training_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses: noise (DDPM, Eq. 3), ``z0 - noise`` (RFlow) or the velocity."""
    from monai.networks.schedulers import RFlowScheduler

    if isinstance(scheduler, RFlowScheduler):
        return z0 - noise
    pred = getattr(scheduler, "prediction_type", "epsilon")
    if pred == "epsilon":
        return noise
    if pred == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    if pred == "sample":
        return z0
    raise ValueError(f"unsupported prediction type {pred!r}")
