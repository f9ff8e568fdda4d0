"""The TCDM training loop (plain PyTorch; Ray Train wiring lives in :mod:`fcas.pipeline.train_tcdm`).

One step on every worker: draw ``batch_pairs`` random ordered pairs ``(a, b)`` from
``rng([seed, step, rank])``, crop both cases at one window, encode the targets with the frozen VAE,
build ``c_raw`` for both directions and minimise the bidirectional loss (the paper's Eq. 4) with AdamW.
Rank 0 writes a checkpoint folder every ``checkpoint_every`` steps; a restart resumes from the latest
complete one. Because every draw is keyed by ``(seed, step, rank)``, a resumed run of the in-memory
loop (``cases=`` or ``data=`` loaded whole, what tests and benchmarks use) follows the same trajectory as an
uninterrupted one. Streamed (``case_stream=``, the Ray Train job): the pairs come from a bounded buffer of
``buffer_cases`` cases (:class:`fcas.diffusion.data.CaseBuffer`); the draws are still keyed by
``(seed, step, rank)`` and weights, optimizer, EMA, history and step resume exactly, but the buffer is
refilled from the stream after a restart, so a resumed streamed run is not bit-identical to an
uninterrupted one (which cases sit in the buffer depends on Ray Data's delivery order). A buffer that holds
every case of its shard and is never refilled (one worker, ``make weights``) is filled in case-id order:
such a run, fresh or resumed, draws the same pairs whatever order the stream delivered.

``train.latent_cache=<uri>`` (a ``jobs/cache_latents.py`` output, :mod:`fcas.diffusion.latent_cache`): the
targets' latents come from the cache instead of the VAE -- the pair's crop window divided by 4 in latent
space, the same window of M_A, M_B, I_B (and I_A for A@B) on the image grid for the conditions; the pairs,
windows and noise are drawn exactly as without it. A cache made with another VAE, lacking training cases
or at another grid is refused before anything is trained.

``unet_mode``: ``joint`` trains UNet and ControlNet together; ``pretrain_freeze`` (MAISI's recipe)
first trains the UNet alone (unconditional) for ``pretrain_steps``, then freezes it and trains the
ControlNet. The hooks ``wrap_model`` (e.g. Ray's ``prepare_model`` / DDP) and ``report`` are
injected by the caller. ``init=maisi:<unet>,<controlnet>`` starts a fresh run (``model=maisi*``) from
MAISI's released weights (:mod:`fcas.models.maisi`); MAISI's networks also get the preset's spacing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator, Mapping

import torch

from fcas.diffusion.conditioning import build_c_raw
from fcas.diffusion.data import CaseArrays, CaseBuffer, case_rows, load_cases, pair_batch
from fcas.diffusion.latent_cache import check_latent_cache, load_cached_cases
from fcas.diffusion.losses import bidirectional_loss
from fcas.diffusion.pairs import refill_due, refill_rng, sample_pairs, step_rng
from fcas.diffusion.schedulers import build_train_scheduler
from fcas.models.bundle import load_vae
from fcas.models.bundle import vae_digest as digest_of_vae
from fcas.models.checkpoint import config_hash, latest_checkpoint, load_into, no_report
from fcas.io import storage
from fcas.models.networks import build_tcdm, maisi_inputs, set_activation_checkpointing, set_flash_attention
from fcas.training.loop import TrainingRun, amp_context, grad_scaler
from fcas.training.tcdm_settings import ARCH_KEYS, TCDMSettings, TrainConfig
from fcas.models.optim import lr_at, make_ema
from fcas.models.vae import compute_scale_factor, latent_scale_factor, vae_encode

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TCDMSettings", "train_tcdm_loop", "ARCH_KEYS"]   # the settings: fcas.training.tcdm_settings

def _mean_over_ranks(value: float, device: torch.device) -> float:
    """``value`` averaged over the DDP ranks (streamed ranks see different cases), else itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _torch_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(step_rng(seed, step, rank).integers(0, 2**62)))
    return g


class _UnconditionalUNet(torch.nn.Module):
    """Adapter so the UNet alone fits ``p_losses``'s ``model(z_t, t, c_raw)`` (pretraining stage)."""

    def __init__(self, unet, maisi=None):
        super().__init__()
        self.unet = unet
        self.maisi = maisi   # MAISI's UNet (a MaisiConfig) also reads spacing, ...

    def forward(self, z_t, t, c_raw=None, spacing=None):
        if self.maisi is None:
            return self.unet(z_t, t)
        return self.unet(z_t, t, **maisi_inputs(self.maisi, z_t, spacing)[0])


def train_tcdm_loop(
    settings: TCDMSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    report: Callable[..., None] = no_report,
    progress: bool = True,
    cases: CaseArrays | None = None,
    case_stream: Callable[[], Iterator[Mapping[str, Any]]] | None = None,
) -> dict:
    """Run (or resume) training up to ``settings.train.steps``; returns a summary dict.

    Cases: ``cases`` (in memory), else ``case_stream()`` (an endless iterator of single cases feeding a
    :class:`CaseBuffer` of ``train.buffer_cases``), else ``settings.data`` loaded whole (from
    ``train.latent_cache`` when set). With a latent cache, ``cases`` / the stream carry ``latents``.

    ``report(metrics, checkpoint_uri=None, checkpoint_step=False)`` is called every step on every rank (Ray Train needs
    all ranks to report). Checkpoints go to ``settings.out/step_XXXXXXXXX``.
    """
    tc = settings.train
    device = torch.device(device)
    cond = settings.condition
    schema = cond.label_schema
    buffer = None
    cached = None
    if tc.latent_cache:   # refused before any work when stale (the Ray job checked it on the driver too)
        ids = None if cases is not None or case_stream is not None else \
            [r["case_id"] for r in case_rows(settings.data, "train")]
        cached = check_latent_cache(tc.latent_cache, digest_of_vae(settings.vae, tc.seed), ids,
                                    settings.shape if tc.crop is None else None, settings.spacing)
    if cases is None and case_stream is not None:
        buffer = CaseBuffer(case_stream(), tc.buffer_cases)
        cases = buffer.cases
    elif cases is None:
        cases = load_cached_cases(cached) if cached else load_cases(settings.data, settings.shape, settings.spacing,
                                                                    split="train")
    if tc.latent_cache and cases.latents is None:
        raise ValueError(f"train.latent_cache={tc.latent_cache} is set, but the training cases carry no latents")
    if len(cases) < 2:
        raise ValueError(f"TCDM training needs >= 2 cases, {settings.data!r} gave {len(cases)}")
    if tuple(cases.shape) != tuple(settings.shape) and tc.crop is None:
        raise ValueError(f"cases have grid {cases.shape}, the preset expects {settings.shape}")

    # ---- networks (same init on every rank; DDP broadcasts rank 0's anyway) ----
    vae, vae_cfg, scale_factor, vae_digest = load_vae(settings.vae, settings.model.vae, seed=tc.seed)
    if vae_cfg != settings.model.vae:
        settings = TCDMSettings(**{**settings.__dict__, "model": replace(settings.model, vae=vae_cfg)})
    vae.to(device)
    torch.manual_seed(tc.seed)
    model = build_tcdm(settings.model, cond.channels).to(device)
    scheduler = build_train_scheduler(settings.scheduler)
    # MAISI's networks read the voxel spacing (mm); MONAI's take no extra input
    model_kwargs = {"spacing": settings.spacing} if settings.model.kind == "maisi" else {}

    # ---- resume ----
    run = TrainingRun("train_tcdm", settings.out, tc.steps, arch=settings.arch(),
                      arch_of=lambda c: {k: c.get(k) for k in ARCH_KEYS}, what="model/condition/scheduler/shape",
                      rank=rank, world_size=world_size, report=report, keep=tc.keep_checkpoints,
                      every=tc.checkpoint_every, progress=progress)
    opt_state, stage_at_ckpt = None, None
    ema = make_ema(model, tc.ema_decay) if tc.ema_decay > 0 else None
    ck = run.resume()
    latest = ck.uri if ck is not None else None
    if ck is not None:
        load_into(model.unet, ck.state_dict("unet"), storage.join(latest, "unet.pt"))
        load_into(model.controlnet, ck.state_dict("controlnet"), storage.join(latest, "controlnet.pt"))
        if ema is not None:
            if "ema" in ck.files:
                load_into(ema, ck.state_dict("ema"), storage.join(latest, "ema.pt"))
            else:  # EMA switched on for a run that had none: start it at the current weights
                ema = make_ema(model, tc.ema_decay)
        opt_state = ck.state_dict("optimizer")
        scale_factor = float(ck.config["scale_factor"])
        stage_at_ckpt = ck.config.get("stage")
        if rank == 0:
            log.info("resuming from %s at step %d%s", latest, ck.step, " (init= not used)" if settings.init else "")
    start_step = run.start
    maisi_init = None
    if latest is None and settings.init:
        from fcas.models.maisi import load_maisi_init

        maisi_init = load_maisi_init(model, settings.init)
        if scale_factor is None and maisi_init.scale_factor is not None:
            scale_factor = maisi_init.scale_factor   # MAISI's UNet was trained on latents of this scale
        if ema is not None:
            ema = make_ema(model, tc.ema_decay)
    if cases.latents is not None and cases.latents.shape[1] != vae_cfg.latent_channels:
        raise ValueError(f"latent cache {tc.latent_cache} holds {cases.latents.shape[1]} latent channels, the VAE "
                         f"gives {vae_cfg.latent_channels}")
    if scale_factor is None:
        k = min(tc.scale_factor_cases, len(cases))
        own = latent_scale_factor(cases.latents[:k]) if cases.latents is not None else \
            compute_scale_factor(vae, cases.images[:k].to(device))
        scale_factor = _mean_over_ranks(own, device)

    # ---- in-process latents (frozen VAE; only without crops and without a latent cache) ----
    latents = None
    if tc.crop is None and cases.latents is None:
        with torch.no_grad():
            latents = torch.cat([vae_encode(vae, cases.images[i:i + 1].to(device), scale_factor) for i in range(len(cases))])

    def stage_of(step: int) -> str:
        return "unet" if tc.unet_mode == "pretrain_freeze" and step < tc.pretrain_steps else "tcdm"

    # GPU memory / speed levers (the loss and gradients are the same with or without them)
    set_activation_checkpointing(model, tc.activation_checkpointing)
    if tc.fused_attention and device.type == "cuda":
        set_flash_attention(model, True)
    layout = torch.channels_last_3d if tc.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    state = {"stage": None, "module": None, "opt": None}

    def enter_stage(stage: str, opt_sd=None):
        if stage == "unet":
            model.unet.requires_grad_(True)
            model.controlnet.requires_grad_(False)
            trainable = _UnconditionalUNet(model.unet, model.maisi)
        else:
            model.controlnet.requires_grad_(True)
            model.unet.requires_grad_(tc.unet_mode == "joint")
            trainable = model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        if opt_sd is not None:
            opt.load_state_dict(opt_sd)
        state.update(stage=stage, module=wrap_model(trainable), opt=opt)

    scaler = grad_scaler(device, tc.amp, tc.amp_dtype)
    first = stage_of(start_step)
    enter_stage(first, opt_state if (opt_state is not None and stage_at_ckpt in (None, first)) else None)

    def checkpoint() -> tuple[dict, dict]:
        config = {**settings.to_dict(), "scale_factor": scale_factor, "vae_digest": vae_digest,
                  "stage": state["stage"], "config_hash": config_hash(settings.to_dict())}
        return config, {
            "unet": model.unet.state_dict(),
            "controlnet": model.controlnet.state_dict(),
            "vae": vae.state_dict(),
            "optimizer": state["opt"].state_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {}),
        }

    samples_per_step = tc.batch_pairs * (2 if tc.bidirectional else 1) * world_size
    for step in run.steps():
        if stage_of(step - 1) != state["stage"]:
            enter_stage(stage_of(step - 1))
        t0 = time.perf_counter()
        rng = step_rng(tc.seed, step, rank)
        gen = _torch_generator(tc.seed, step, rank, device)
        if buffer is not None and refill_due(tc.refill_every, step):
            slot = buffer.refill(refill_rng(tc.seed, step, rank))
            if latents is not None:
                with torch.no_grad():
                    latents[slot] = vae_encode(vae, cases.images[slot:slot + 1].to(device), scale_factor)[0]
        pairs = sample_pairs(len(cases), tc.batch_pairs, rng, cases.sites)
        batch = pair_batch(cases, pairs, tc.crop, rng)
        with torch.no_grad():
            if cases.latents is not None:   # the cache: unscaled posterior means at the pair's window
                z_a = batch["latent_a"].to(device) * scale_factor
                z_b = batch["latent_b"].to(device) * scale_factor
            elif latents is not None:
                z_a, z_b = latents[pairs[:, 0]], latents[pairs[:, 1]]
            else:
                z_a = vae_encode(vae, batch["image_a"].to(device), scale_factor)
                z_b = vae_encode(vae, batch["image_b"].to(device), scale_factor)
            lab_a, lab_b = batch["label_a"].to(device), batch["label_b"].to(device)
            img_a, img_b = batch["image_a"].to(device), batch["image_b"].to(device)
            c_ba = build_c_raw(lab_a, lab_b, img_b, schema, cond.encoding, cond.mask_only)
            c_ab = build_c_raw(lab_b, lab_a, img_a, schema, cond.encoding, cond.mask_only) if tc.bidirectional else None
            z_a, z_b = z_a.to(memory_format=layout), z_b.to(memory_format=layout)
            c_ba = c_ba.to(memory_format=layout)
            c_ab = c_ab.to(memory_format=layout) if c_ab is not None else None
        with amp_context(device, tc.amp, tc.amp_dtype):
            loss, parts = bidirectional_loss(state["module"], scheduler, z_a, z_b, c_ba, c_ab, gen,
                                             snr_gamma=tc.min_snr_gamma, **model_kwargs)
        opt = state["opt"]
        lr = lr_at(tc, step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.grad_clip)
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        dt = time.perf_counter() - t0
        last_loss = run.finite(loss, step)
        metrics = {"loss": last_loss, "lr": lr, "stage": state["stage"], "step_time_s": dt,
                   "samples_per_s": samples_per_step / dt, **parts}
        run.end_step(step, metrics, checkpoint=checkpoint,
                     postfix={"loss": f"{last_loss:.4f}", "sps": f"{samples_per_step / dt:.2f}"})
    summary = run.close()
    return {
        **summary,
        "samples_per_s": (samples_per_step * summary["steps_run"] / summary["seconds"]) if summary["steps_run"] else 0.0,
        "scale_factor": scale_factor,
        "latest_checkpoint": latest_checkpoint(settings.out) if rank == 0 else None,
        **({"init": asdict(maisi_init)} if maisi_init is not None else {}),   # what init= loaded / re-initialised
    }


def smoke_checkpoint(out: str, preset: str = "tiny", data: str = "phantom:3", steps: int = 2) -> str:
    """Train ``steps`` steps at ``preset`` (random VAE) into ``out``; returns the checkpoint URI.

    Not a useful model: a real, loadable checkpoint of the preset's architecture for tests and
    benchmarks that need one in seconds.
    """
    import warnings

    from fcas.labels import read_config
    from fcas.presets import load_preset

    p = load_preset(preset)
    model = dict(read_config("model", preset, "model config"))
    model.pop("name", None)
    settings = TCDMSettings.from_dict({
        "data": data, "out": str(out), "shape": p.shape, "spacing": p.spacing, "preset": preset,
        "model": model, "train": {"steps": steps, "checkpoint_every": steps, "scale_factor_cases": 2},
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tcdm_loop(settings, progress=False)
    uri = latest_checkpoint(str(out))
    if uri is None:
        raise RuntimeError(f"training {steps} steps wrote no checkpoint under {out}")
    return uri
