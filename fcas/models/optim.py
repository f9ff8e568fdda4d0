"""Optimisation helpers shared by the VAE and TCDM training loops: the learning-rate schedule
(:func:`lr_at`) and an exponential moving average of the weights (:func:`make_ema`).

The EMA is PyTorch's own ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``;
only the schedule formula is written here.
"""
from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["SCHEDULES", "lr_at", "make_ema"]

SCHEDULES = ("constant", "cosine")


def lr_at(cfg, step: int) -> float:
    """Learning rate of ``step`` (1-based) for a config with ``lr``, ``lr_min``, ``warmup_steps``,
    ``schedule`` and ``steps``: linear warm-up, then constant or a cosine decay to ``lr_min`` at ``steps``."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * frac))


def make_ema(module: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``module`` (parameters and buffers), updated with ``ema.update_parameters(module)``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {decay}")
    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
