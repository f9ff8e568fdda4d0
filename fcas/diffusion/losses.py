"""TCDM objectives named after the seed: ``q_sample`` (forward noising), ``p_losses`` (Eq. 3) and
``bidirectional_loss`` (Eq. 4, L_{A@B} + L_{B@A}).

Hand-written in the style of lucidrains' denoising-diffusion-pytorch over MONAI's schedulers.
All randomness (noise, timesteps) comes from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fcas.diffusion.schedulers import sample_timesteps, training_target

__all__ = ["q_sample", "p_losses", "bidirectional_loss"]


def q_sample(scheduler, z0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: ``Z_t`` from clean latents ``z0 (B, C, d, h, w)`` at ``timesteps (B,)``."""
    return scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)


def _draw(z0: torch.Tensor, scheduler, generator: torch.Generator | None):
    gdev = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(z0.shape, generator=generator, device=gdev, dtype=torch.float32).to(z0.device, z0.dtype)
    t = sample_timesteps(scheduler, z0.shape[0], generator).to(z0.device)
    return noise, t


def p_losses(
    model,
    scheduler,
    z0: torch.Tensor,
    c_raw: torch.Tensor,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs,
) -> torch.Tensor:
    """Seed Eq. 3: ``|| eps - eps_theta(Z_t, t, c) ||^2`` (or the RFlow velocity target).

    Args:
        model: ``model(z_t, t, c_raw) -> (B, C, d, h, w)`` (a :class:`fcas.models.TCDM`).
        z0: clean latents ``(B, C, d, h, w)``; c_raw: ``(B, C_cond, 4d, 4h, 4w)``.
        reduction: 'mean' (scalar) or 'none' (per-sample ``(B,)``).
        model_kwargs: passed on to ``model`` (``spacing=`` for MAISI's networks).
    """
    if z0.shape[0] != c_raw.shape[0]:
        raise ValueError(f"batch of z0 ({z0.shape[0]}) and c_raw ({c_raw.shape[0]}) differ")
    noise, t = _draw(z0, scheduler, generator)
    z_t = q_sample(scheduler, z0, t, noise)
    pred = model(z_t, t, c_raw, **model_kwargs)
    target = training_target(scheduler, z0, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def bidirectional_loss(
    model,
    scheduler,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    c_b_at_a: torch.Tensor,
    c_a_at_b: torch.Tensor | None,
    generator: torch.Generator | None = None,
    **model_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Seed Eq. 4: ``L_TCDM = L_{A@B} + L_{B@A}``, both directions in ONE forward pass.

    ``B@A`` (template B guides target A): target ``z_a``, condition ``c_b_at_a`` (from M_A, M_B, I_B).
    ``A@B``: target ``z_b``, condition ``c_a_at_b``. With ``c_a_at_b=None`` only ``B@A`` is trained
    (the one-direction ablation). One concatenated batch keeps DDP to one forward per backward.

    Returns ``(loss, {"loss_b_at_a": ..., "loss_a_at_b": ...})``; ``model_kwargs`` go to ``model``.
    """
    if c_a_at_b is None:
        loss = p_losses(model, scheduler, z_a, c_b_at_a, generator, **model_kwargs)
        return loss, {"loss_b_at_a": float(loss.detach())}
    n = z_a.shape[0]
    per = p_losses(model, scheduler, torch.cat([z_a, z_b]), torch.cat([c_b_at_a, c_a_at_b]), generator, "none",
                   **model_kwargs)
    l_ba, l_ab = per[:n].mean(), per[n:].mean()
    return l_ab + l_ba, {"loss_b_at_a": float(l_ba.detach()), "loss_a_at_b": float(l_ab.detach())}
