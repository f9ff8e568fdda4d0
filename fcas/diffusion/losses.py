"""TCDM objectives named after the seed: ``q_sample`` (forward noising), ``p_losses`` (Eq. 3) and
``bidirectional_loss`` (Eq. 4, L_{A@B} + L_{B@A}), with optional Min-SNR-γ loss weighting
(:func:`min_snr_weight`, Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

Hand-written in the style of lucidrains' denoising-diffusion-pytorch over MONAI's schedulers (which give
the noise schedule, not the loss weighting).
All randomness (noise, timesteps) comes from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fcas.diffusion.schedulers import sample_timesteps, training_target

__all__ = ["q_sample", "p_losses", "bidirectional_loss", "min_snr_weight"]


def q_sample(scheduler, z0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: ``Z_t`` from clean latents ``z0 (B, C, d, h, w)`` at ``timesteps (B,)``."""
    return scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight of each timestep ``(B,)``: the loss of timestep ``t`` in x0 terms is clamped at SNR ``γ``.

    ``SNR(t) = ᾱ_t / (1 - ᾱ_t)``; for noise targets the weight is ``min(SNR, γ) / SNR``, for velocity targets
    ``min(SNR, γ) / (SNR + 1)``, for clean-sample targets ``min(SNR, γ)``. Low-noise steps, whose gradients
    otherwise dominate and conflict with the high-noise ones, are damped (the paper's γ = 5).
    Not defined for RFlow (its continuous time has no ᾱ): raises.
    """
    from monai.networks.schedulers import RFlowScheduler

    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    if isinstance(scheduler, RFlowScheduler):
        raise ValueError("min-SNR weighting needs a DDPM/DDIM noise schedule, not RFlow")
    ac = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = ac / (1.0 - ac)
    clamped = snr.clamp(max=gamma)
    pred = getattr(scheduler, "prediction_type", "epsilon")
    if pred == "epsilon":
        return clamped / snr
    if pred == "v_prediction":
        return clamped / (snr + 1.0)
    if pred == "sample":
        return clamped
    raise ValueError(f"unsupported prediction type {pred!r}")


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
    snr_gamma: float | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Seed Eq. 3: ``|| eps - eps_theta(Z_t, t, c) ||^2`` (or the RFlow velocity target).

    Args:
        model: ``model(z_t, t, c_raw) -> (B, C, d, h, w)`` (a :class:`fcas.models.TCDM`).
        z0: clean latents ``(B, C, d, h, w)``; c_raw: ``(B, C_cond, 4d, 4h, 4w)``.
        reduction: 'mean' (scalar) or 'none' (per-sample ``(B,)``).
        snr_gamma: None = the plain loss; γ > 0 = each sample's loss times :func:`min_snr_weight`.
        model_kwargs: passed on to ``model`` (``spacing=`` for MAISI's networks).
    """
    if z0.shape[0] != c_raw.shape[0]:
        raise ValueError(f"batch of z0 ({z0.shape[0]}) and c_raw ({c_raw.shape[0]}) differ")
    noise, t = _draw(z0, scheduler, generator)
    z_t = q_sample(scheduler, z0, t, noise)
    pred = model(z_t, t, c_raw, **model_kwargs)
    target = training_target(scheduler, z0, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(scheduler, t, snr_gamma)
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
    snr_gamma: float | None = None,
    **model_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Seed Eq. 4: ``L_TCDM = L_{A@B} + L_{B@A}``, both directions in ONE forward pass.

    ``B@A`` (template B guides target A): target ``z_a``, condition ``c_b_at_a`` (from M_A, M_B, I_B).
    ``A@B``: target ``z_b``, condition ``c_a_at_b``. With ``c_a_at_b=None`` only ``B@A`` is trained
    (the one-direction ablation). One concatenated batch keeps DDP to one forward per backward.

    ``snr_gamma``: Min-SNR-γ weighting of both terms (see :func:`p_losses`).
    Returns ``(loss, {"loss_b_at_a": ..., "loss_a_at_b": ...})``; ``model_kwargs`` go to ``model``.
    """
    if c_a_at_b is None:
        loss = p_losses(model, scheduler, z_a, c_b_at_a, generator, snr_gamma=snr_gamma, **model_kwargs)
        return loss, {"loss_b_at_a": float(loss.detach())}
    n = z_a.shape[0]
    per = p_losses(model, scheduler, torch.cat([z_a, z_b]), torch.cat([c_b_at_a, c_a_at_b]), generator, "none",
                   snr_gamma=snr_gamma, **model_kwargs)
    l_ba, l_ab = per[:n].mean(), per[n:].mean()
    return l_ab + l_ba, {"loss_b_at_a": float(l_ba.detach()), "loss_a_at_b": float(l_ab.detach())}
