"""Training loop of the KL autoencoder (plain PyTorch; Ray Train wiring in :mod:`fcas.pipeline.train_vae`).

L1 reconstruction + a small KL term (:func:`fcas.models.vae.vae_loss`), AdamW, random crops keyed by
``rng([seed, step, rank])``; rank 0 writes checkpoint folders (``config.json`` with the latent
``scale_factor``, ``vae.pt``, ``optimizer.pt``) every ``checkpoint_every`` steps and a restart resumes
from the latest. Hand-written loop; the network and blending are MONAI's.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

import torch

from fcas.diffusion.data import CaseArrays, crop_slices, load_cases
from fcas.diffusion.pairs import step_rng
from fcas.io import storage
from fcas.models.checkpoint import (
    checkpoint_dir,
    config_hash,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_into,
    no_report,
    save_checkpoint,
)
from fcas.models.networks import VAEConfig, build_vae
from fcas.models.vae import compute_scale_factor, vae_loss

log = logging.getLogger(__name__)

__all__ = ["VAETrainConfig", "VAESettings", "train_vae_loop"]


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    crop: tuple[int, int, int] | None = None
    kl_weight: float = 1e-6
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    scale_factor_cases: int = 8

    def __post_init__(self) -> None:
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"bad VAE train settings steps={self.steps} batch_size={self.batch_size}")


@dataclass(frozen=True)
class VAESettings:
    data: str
    out: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    preset: str = "tiny"
    model_name: str = "tiny"
    vae: VAEConfig = field(default_factory=VAEConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAESettings":
        t = dict(d.get("train") or {})
        unknown = set(t) - {f.name for f in fields(VAETrainConfig)}
        if unknown:
            raise ValueError(f"unknown VAE train keys {sorted(unknown)}")
        return cls(
            data=str(d["data"]), out=str(d["out"]),
            shape=tuple(int(v) for v in d["shape"]), spacing=tuple(float(v) for v in d["spacing"]),
            preset=str(d.get("preset", "custom")), model_name=str(d.get("model_name", "custom")),
            vae=VAEConfig(**dict(d.get("vae") or {})), train=VAETrainConfig(**t),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


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
) -> dict:
    tc = settings.train
    device = torch.device(device)
    if cases is None:
        cases = load_cases(settings.data, settings.shape, settings.spacing, split="train")
    torch.manual_seed(tc.seed)
    vae = build_vae(settings.vae).to(device)
    opt_sd, start, history = None, 0, {"step": [], "loss": []}
    latest = latest_checkpoint(settings.out)
    if latest is not None:
        ck = load_checkpoint(latest)
        mine = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings.vae).items()}
        if ck.config.get("model", {}).get("vae") != mine:
            raise ValueError(f"checkpoint {latest} holds a different VAE architecture; use another out=")
        load_into(vae, ck.state_dict("vae"), storage.join(latest, "vae.pt"))
        opt_sd, start = ck.state_dict("optimizer"), ck.step
        if "history" in ck.files:
            history = {k: [float(x) for x in v.tolist()] for k, v in ck.state_dict("history").items()}
    module = wrap_model(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if opt_sd is not None:
        opt.load_state_dict(opt_sd)

    def save(step: int) -> str:
        vae.eval()
        k = min(tc.scale_factor_cases, len(cases))
        sf = compute_scale_factor(vae, cases.images[:k].to(device))
        vae.train()
        vae_dict = {k2: list(v) if isinstance(v, tuple) else v for k2, v in asdict(settings.vae).items()}
        config = {**settings.to_dict(), "model": {"name": settings.model_name, "vae": vae_dict},
                  "scale_factor": sf, "config_hash": config_hash(settings.to_dict())}
        uri = checkpoint_dir(settings.out, step)
        save_checkpoint(uri, config=config, step=step, state_dicts={
            "vae": vae.state_dict(), "optimizer": opt.state_dict(),
            "history": {k2: torch.tensor(v, dtype=torch.float64) for k2, v in history.items()}})
        if tc.keep_checkpoints > 0:
            for _, old in list_checkpoints(settings.out)[: -tc.keep_checkpoints]:
                storage.remove(old, recursive=True, missing_ok=True)
        return uri

    bar = None
    if progress and rank == 0 and start < tc.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train_vae", unit="step", dynamic_ncols=True)
    vae.train()
    t_start, done, last = time.perf_counter(), 0, float("nan")
    for step in range(start + 1, tc.steps + 1):
        t0 = time.perf_counter()
        rng = step_rng(tc.seed, step, rank)
        idx = rng.integers(0, len(cases), size=tc.batch_size)
        crops = [cases.images[i][(slice(None), *crop_slices(cases.shape, tc.crop, rng))] for i in idx]
        x = torch.stack(crops).to(device)
        loss, parts = vae_loss(module, x, tc.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if not math.isfinite(last):
            raise FloatingPointError(f"VAE loss is {last} at step {step}")
        history["step"].append(float(step))
        history["loss"].append(last)
        done += 1
        dt = time.perf_counter() - t0
        ck_uri = save(step) if rank == 0 and (step % tc.checkpoint_every == 0 or step == tc.steps) else None
        report({"step": step, "loss": last, "step_time_s": dt,
                "samples_per_s": tc.batch_size * world_size / dt, **parts}, checkpoint_uri=ck_uri)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last:.4f}")
    if bar is not None:
        bar.close()
    return {"start_step": start, "final_step": max(start, tc.steps), "steps_run": done, "last_loss": last,
            "seconds": time.perf_counter() - t_start}
