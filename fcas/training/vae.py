"""Training loop of the KL autoencoder (plain PyTorch; Ray Train wiring in :mod:`fcas.pipeline.train_vae`).

The recipe follows what works for 3D CT autoencoders (MAISI): L1 + ``ssim_weight`` * (1 - SSIM) +
a small KL term (:func:`fcas.models.vae.vae_loss`), optionally a patch adversarial term (MONAI
``PatchDiscriminator`` + least-squares ``PatchAdversarialLoss``) switched on after ``adv_start``
warm-up steps; AdamW with a linear warm-up and a cosine decay to ``lr_min``. Every step draws its
random crops, flips and intensity jitter from ``rng([seed, step, rank])``, so a resumed run sees the
same data as an uninterrupted one (in memory: ``cases=`` or ``data=`` loaded whole; streamed through a
bounded :class:`fcas.diffusion.data.CaseBuffer` of ``buffer_cases`` cases, as the Ray Train job does, the
draws keep their ``(seed, step, rank)`` keys but the buffer's contents after a restart depend on the
stream, so a resumed streamed run is not bit-identical, unless the buffer holds every case and is never
refilled: it is filled in case-id order). Rank 0 writes checkpoint folders (``config.json``
with the latent ``scale_factor``, ``vae.pt``, ``optimizer.pt``, the discriminator when used, ``history.pt`` with the
loss and the held-out ``val_ssim`` / ``val_psnr`` curves of ``val_data``) every ``checkpoint_every``
steps; a restart resumes from the latest. Hand-written loop and schedule; networks and losses are MONAI's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from fcas.diffusion.data import CaseArrays, CaseBuffer, crop_slices, load_cases
from fcas.diffusion.pairs import refill_due, refill_rng, step_rng
from fcas.io import storage
from fcas.models.optim import lr_at
from fcas.models.checkpoint import config_hash, load_into, no_report
from fcas.models.networks import build_vae, jsonable, set_activation_checkpointing
from fcas.models.vae import compute_scale_factor, vae_loss, vae_decode, vae_encode
from fcas.training.loop import TrainingRun, amp_context, grad_scaler
from fcas.training.vae_settings import VAESettings, VAETrainConfig

log = logging.getLogger(__name__)

__all__ = ["VAETrainConfig", "VAESettings", "train_vae_loop", "lr_at", "augment_crop", "reconstruction_scores"]


def augment_crop(x: torch.Tensor, rng, intensity: bool = False) -> torch.Tensor:
    """Flip each spatial axis with p = 0.5; with ``intensity`` also x * U(0.9, 1.1) + U(-0.05, 0.05), clipped.

    ``x``: ``(1, D, H, W)`` in [0, 1]. A VAE must reconstruct any orientation and contrast it is
    given, so these only widen what it learns (unlike segmentation, where flips swap left/right).
    """
    flips = [a + 1 for a in range(3) if rng.random() < 0.5]
    if flips:
        x = torch.flip(x, dims=flips)
    if not intensity:
        return x
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    return (x * float(scale) + float(shift)).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_scores(vae: torch.nn.Module, images: torch.Tensor, device) -> dict[str, float]:
    """Mean SSIM (the project's metric) and PSNR (dB, data range 1) of whole-volume reconstructions."""
    from fcas.metrics.image import psnr, ssim

    ss, ps = [], []
    for img in images:
        x = img[None].to(device)
        r = vae_decode(vae, vae_encode(vae, x)).clamp(0, 1)
        ss.append(float(ssim(r[0, 0].cpu(), x[0, 0].cpu())))
        ps.append(psnr(r[0, 0].cpu(), x[0, 0].cpu()))
    return {"val_ssim": sum(ss) / len(ss), "val_psnr": sum(ps) / len(ps)}


def _discriminator():
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1,
                              norm="INSTANCE")


def train_vae_loop(
    settings: VAESettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    report: Callable[..., None] = no_report,
    progress: bool = True,
    cases: CaseArrays | None = None,
    val_cases: CaseArrays | None = None,
    case_stream: Callable[[], Iterator[Mapping[str, Any]]] | None = None,
) -> dict:
    """Run (or resume) VAE training; cases as :func:`fcas.training.tcdm.train_tcdm_loop` takes them."""
    tc = settings.train
    device = torch.device(device)
    buffer = None
    if cases is None and case_stream is not None:
        buffer = CaseBuffer(case_stream(), tc.buffer_cases)
        cases = buffer.cases
    elif cases is None:
        cases = load_cases(settings.data, settings.shape, settings.spacing, split="train")
    if val_cases is None and tc.val_data and rank == 0:
        val_cases = load_cases(tc.val_data, settings.shape, settings.spacing, split="val")
    torch.manual_seed(tc.seed)
    vae = build_vae(settings.vae).to(device)
    disc = _discriminator().to(device) if tc.adv_weight > 0 else None
    vae_dict = jsonable(asdict(settings.vae))
    run = TrainingRun("train_vae", settings.out, tc.steps, arch=vae_dict,
                      arch_of=lambda c: (c.get("model") or {}).get("vae"), what="VAE architecture", rank=rank,
                      world_size=world_size, report=report, keep=tc.keep_checkpoints, every=tc.checkpoint_every,
                      progress=progress)
    opt_sd = disc_opt_sd = None
    ck = run.resume()
    if ck is not None:
        load_into(vae, ck.state_dict("vae"), storage.join(ck.uri, "vae.pt"))
        opt_sd = ck.state_dict("optimizer")
        if disc is not None and "discriminator" in ck.files:
            load_into(disc, ck.state_dict("discriminator"), storage.join(ck.uri, "discriminator.pt"))
            disc_opt_sd = ck.state_dict("disc_optimizer")
    history = run.history
    set_activation_checkpointing(vae, tc.activation_checkpointing)
    layout = torch.channels_last_3d if tc.channels_last else torch.contiguous_format
    vae.to(memory_format=layout)
    module = wrap_model(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if opt_sd is not None:
        opt.load_state_dict(opt_sd)
    disc_module = disc_opt = adv_loss = None
    if disc is not None:
        from monai.losses import PatchAdversarialLoss

        disc_module = wrap_model(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.disc_lr)
        if disc_opt_sd is not None:
            disc_opt.load_state_dict(disc_opt_sd)
        adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def checkpoint(step: int):
        """(config, state dicts) of ``step``; the held-out scores join the history first."""
        vae.eval()
        k = min(tc.scale_factor_cases, len(cases))
        sf = compute_scale_factor(vae, cases.images[:k].to(device))
        if val_cases is not None:
            scores = reconstruction_scores(vae, val_cases.images, device)
            history.setdefault("val_step", []).append(float(step))
            for key, v in scores.items():
                history.setdefault(key, []).append(v)
            log.info("train_vae step %d: held-out SSIM %.4f PSNR %.2f dB", step, scores["val_ssim"],
                     scores["val_psnr"])
        vae.train()
        config = {**settings.to_dict(), "model": {"name": settings.model_name, "vae": vae_dict},
                  "scale_factor": sf, "config_hash": config_hash(settings.to_dict())}
        states = {"vae": vae.state_dict(), "optimizer": opt.state_dict()}
        if disc is not None:
            states.update(discriminator=disc.state_dict(), disc_optimizer=disc_opt.state_dict())
        return config, states

    scaler = grad_scaler(device, tc.amp, tc.amp_dtype)
    vae.train()
    for step in run.steps():
        t0 = time.perf_counter()
        rng = step_rng(tc.seed, step, rank)
        # the posterior sample (reparameterisation) and the discriminator draw from torch's global generator:
        # seeded by (seed, step, rank), so a resumed run continues bit-exactly
        torch.manual_seed(int(np.random.default_rng([tc.seed, step, rank, 3]).integers(2 ** 62)))
        if buffer is not None and refill_due(tc.refill_every, step):
            buffer.refill(refill_rng(tc.seed, step, rank))
        idx = rng.integers(0, len(cases), size=tc.batch_size)
        crops = [cases.images[i][(slice(None), *crop_slices(cases.shape, tc.crop, rng))] for i in idx]
        if tc.augment:
            crops = [augment_crop(c, rng, tc.intensity_jitter) for c in crops]
        x = torch.stack(crops).to(device).to(memory_format=layout)
        lr = lr_at(tc, step)
        for group in opt.param_groups:
            group["lr"] = lr
        use_adv = disc is not None and step > tc.adv_start
        with amp_context(device, tc.amp, tc.amp_dtype):
            loss, parts, recon = vae_loss(module, x, tc.kl_weight, tc.ssim_weight, return_recon=True)
        loss, recon = loss.float(), recon.float()
        if use_adv:
            disc.requires_grad_(False)  # the generator's term: gradients reach the VAE only
            g_adv = adv_loss(disc(recon)[-1], target_is_real=True, for_discriminator=False)
            disc.requires_grad_(True)
            loss = loss + tc.adv_weight * g_adv
            parts["adv_g"] = float(g_adv.detach())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if use_adv:
            # real and fake in one forward (one DDP forward per backward); instance norm keeps them apart
            logits = disc_module(torch.cat([recon.detach().float(), x.float()]))[-1]
            n = x.shape[0]
            d_loss = 0.5 * (adv_loss(logits[:n], target_is_real=False, for_discriminator=True)
                            + adv_loss(logits[n:], target_is_real=True, for_discriminator=True))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            parts["adv_d"] = float(d_loss.detach())
        last = run.finite(loss, step)
        dt = time.perf_counter() - t0
        run.end_step(step, {"loss": last, "lr": lr, "step_time_s": dt,
                            "samples_per_s": tc.batch_size * world_size / dt, **parts},
                     checkpoint=lambda step=step: checkpoint(step))
    return run.close()
