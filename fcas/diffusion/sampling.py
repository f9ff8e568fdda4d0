"""Reverse sampling of TCDM in latent space (DDIM / DDPM / RFlow via MONAI's schedulers), exposing
the predicted clean latent ``x̂0`` at every k-th step for SSV.

The condition embedding ``E_ctrl(c_raw)`` (the only part of the ControlNet that sees the full-resolution
condition) does not depend on ``Z_t`` or ``t``, so it is computed ONCE per call and reused at every
step (:class:`fcas.models.networks.TemplateControlNet` accepts it precomputed). Latents larger than
one window are denoised window by window at each step with MONAI's ``SlidingWindowInferer`` (the
latent and the condition embedding share the latent grid, so they are windowed together). MAISI's
networks (``model=maisi*``) also get the voxel spacing: the bundle's, or ``spacing=``.

All randomness comes from the caller's ``torch.Generator`` (initial noise, and DDPM / eta>0 noise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import RFlowScheduler

from fcas.diffusion.schedulers import SchedulerConfig, build_sampling_scheduler
from fcas.models.networks import TCDM
from fcas.models.vae import sliding_window_decode, vae_decode

__all__ = ["SampleResult", "sample", "decode_latent"]


@dataclass
class SampleResult:
    """``latent (B, 4, d, h, w)`` (scaled, as the diffusion model sees it); ``intermediates``: the
    collected x̂0 (or noisy latents) at ``timesteps``, each like ``latent``."""

    latent: torch.Tensor
    intermediates: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    step_indices: list[int] = field(default_factory=list)

    def __iter__(self):  # allows ``latent, x0s = sample(...)``
        yield self.latent
        yield self.intermediates


def _unpack(models) -> tuple[TCDM, SchedulerConfig | None]:
    if isinstance(models, TCDM):
        return models, None
    model = getattr(models, "model", None)
    if not isinstance(model, TCDM):
        raise ValueError(f"sample() needs a TCDM or a TCDMBundle, got {type(models).__name__}")
    return model, models.scheduler


@torch.no_grad()
def sample(
    models,
    condition: torch.Tensor,
    generator: torch.Generator | None,
    steps: int,
    scheduler: str = "ddim",
    collect_every: int = 0,
    *,
    scheduler_config: SchedulerConfig | None = None,
    collect: str = "x0",
    collect_from: float = 0.0,
    eta: float = 0.0,
    cache_condition: bool = True,
    window: Sequence[int] | None = None,
    window_overlap: float = 0.25,
    latent_channels: int | None = None,
    clip_x0: float | None | str = "auto",
    spacing: Sequence[float] | None = None,
) -> SampleResult:
    """Sample latents conditioned on ``condition``.

    Args:
        models: a :class:`fcas.diffusion.bundle.TCDMBundle` (its scheduler config is used) or a ``TCDM``.
        condition: ``c_raw (B, C, D, H, W)`` built by :func:`fcas.diffusion.conditioning.build_c_raw`;
            the latent is ``(B, 4, D/4, H/4, W/4)``.
        generator: source of the initial noise (and of DDPM / ``eta > 0`` noise); CPU generators work
            for any device (noise is drawn on the generator's device, then moved).
        steps: number of reverse steps.
        scheduler: 'ddim' | 'ddpm' (models trained with DDPM) or 'rflow' (trained with RFlow).
        collect_every: k > 0 collects the intermediate at step indices 0, k, 2k, ... (SSV); 0 none.
        collect: 'x0' (predicted clean latent, the default reading of SSV) or 'latent' (noisy Z_t after
            the step, the paper's literal wording).
        collect_from: fraction of the reverse steps skipped before collecting: with ``s0 =
            floor(collect_from * steps)`` the step indices ``s0, s0 + k, ...`` are collected (0: from
            the first step; 0.5: the late, low-noise half only).
        eta: DDIM stochasticity (0 = deterministic DDIM).
        cache_condition: embed the condition once (True) or inside every step (False; for benchmarks).
        window: latent window size for sliding-window denoising; None = whole latent at once.
        clip_x0: DDIM/DDPM clip the predicted x̂0 to ``[-clip_x0, clip_x0]`` before each step (latents
            are scaled to unit variance); None = no clipping; 'auto' = the bundle's
            ``config['sampling']['clip_x0']`` if set, else None. Not applied by RFlow.
        spacing: voxel spacing (mm) for MAISI's networks (which need it); default: the bundle's.
            MONAI's networks ignore it.

    Returns:
        :class:`SampleResult` (unpacks as ``latent, intermediates``).
    """
    model, bundle_sched = _unpack(models)
    sched_cfg = scheduler_config or bundle_sched or SchedulerConfig(kind="rflow" if scheduler == "rflow" else "ddpm")
    if collect not in ("x0", "latent"):
        raise ValueError(f"collect must be 'x0' or 'latent', got {collect!r}")
    if condition.ndim != 5 or any(s % 4 for s in condition.shape[2:]):
        raise ValueError(f"condition must be (B, C, D, H, W) with D, H, W divisible by 4, got {tuple(condition.shape)}")
    if collect_every < 0:
        raise ValueError(f"collect_every must be >= 0, got {collect_every}")
    if not 0.0 <= collect_from < 1.0:
        raise ValueError(f"collect_from must be in [0, 1), got {collect_from}")
    first = int(collect_from * steps)
    sch = build_sampling_scheduler(sched_cfg, scheduler, steps)
    if clip_x0 == "auto":
        clip_x0 = ((getattr(models, "config", None) or {}).get("sampling") or {}).get("clip_x0")
    if clip_x0 is not None and not isinstance(sch, RFlowScheduler):
        if not float(clip_x0) > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
        sch.clip_sample = True
        sch.clip_sample_values = [-float(clip_x0), float(clip_x0)]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    condition = condition.to(device=device, dtype=dtype)
    c_lat = latent_channels or model.unet.out_channels
    shape = (condition.shape[0], c_lat, *(s // 4 for s in condition.shape[2:]))
    gdev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device, dtype)

    emb = model.embed_condition(condition) if cache_condition else None
    kw = {}
    if model.maisi is not None:
        kw["spacing"] = spacing if spacing is not None else getattr(models, "spacing", None)
        if kw["spacing"] is None:
            raise ValueError("MAISI's networks need the voxel spacing: pass spacing= (or sample from a TCDMBundle)")

    def denoise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(device).expand(z_t.shape[0])
        if window is None or all(w >= s for w, s in zip(window, z_t.shape[2:])):
            return model(z_t, tt, c_raw=None if emb is not None else condition, cond_embedding=emb, **kw)
        if emb is None:
            raise ValueError("sliding-window denoising needs cache_condition=True")
        inferer = SlidingWindowInferer(roi_size=tuple(window), sw_batch_size=1, overlap=window_overlap, mode="gaussian")

        def predictor(zc: torch.Tensor) -> torch.Tensor:
            zt_w, emb_w = zc[:, :c_lat], zc[:, c_lat:]
            return model(zt_w, tt[: zt_w.shape[0]], cond_embedding=emb_w, **kw)

        return inferer(torch.cat([z_t, emb], dim=1), predictor)

    timesteps = sch.timesteps
    is_rflow = isinstance(sch, RFlowScheduler)
    out = SampleResult(latent=z)
    for i, t in enumerate(timesteps):
        t_tensor = torch.as_tensor(t).reshape(1)
        pred = denoise(z, t_tensor)
        if is_rflow:
            next_t = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)
            z, x0 = sch.step(pred, t, z, next_t)
        elif scheduler == "ddim":
            z, x0 = sch.step(pred, int(t), z, eta=eta, generator=generator)
        else:
            z, x0 = sch.step(pred, int(t), z, generator=generator)
        if collect_every and i >= first and (i - first) % collect_every == 0:
            out.intermediates.append((x0 if collect == "x0" else z).clone())
            out.timesteps.append(int(t))
            out.step_indices.append(i)
    out.latent = z
    return out


@torch.no_grad()
def decode_latent(
    vae: torch.nn.Module,
    latent: torch.Tensor,
    scale_factor: float,
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Scaled latent ``(B, 4, d, h, w)`` -> image ``(B, 1, 4d, 4h, 4w)`` in [0, 1] (clipped)."""
    if window is None or all(w >= s for w, s in zip(window, latent.shape[2:])):
        img = vae_decode(vae, latent, scale_factor)
    else:
        img = sliding_window_decode(vae, latent, window, scale_factor, overlap=overlap)
    return img.clamp(0.0, 1.0)
