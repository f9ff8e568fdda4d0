"""The VAE training settings (:class:`VAESettings`, :class:`VAETrainConfig`): plain frozen dataclasses, without
the networks, so ``fcas train_vae`` checks a config before MONAI loads. The loop: :mod:`fcas.training.vae`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fcas.models.configs import VAEConfig
from fcas.models.optim import SCHEDULES
from fcas.settings import build
from fcas.training.loop import check_amp_dtype

__all__ = ["VAETrainConfig", "VAESettings"]


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"      # constant | cosine (decay to lr_min at `steps`)
    warmup_steps: int = 0           # linear warm-up from 0 to lr
    lr_min: float = 0.0
    crop: tuple[int, int, int] | None = None
    kl_weight: float = 1e-6
    ssim_weight: float = 0.0        # weight of 1 - SSIM next to L1
    adv_weight: float = 0.0         # patch adversarial term (0: off)
    adv_start: int = 0              # steps of warm-up before the adversarial term starts
    disc_lr: float = 1e-4
    augment: bool = False           # random flips of every axis per crop
    intensity_jitter: bool = False  # and intensity scale/shift per crop
    val_data: str | None = None     # held-out cases scored (SSIM / PSNR) at every checkpoint
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    scale_factor_cases: int = 8
    buffer_cases: int = 8           # streamed training: cases a worker holds (crops are drawn among them)
    refill_every: int = 1           # steps between buffer refills (0: never; the job sets 0 when one worker holds all)
    # GPU memory / speed levers (docs/benchmarks.md): autocast on CUDA, MONAI's activation checkpointing of
    # encoder and decoder, channels-last-3d layout of weights and crops
    amp: bool = False
    amp_dtype: str = "bfloat16"     # bfloat16 | float16 (with a loss scaler)
    activation_checkpointing: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        check_amp_dtype(self.amp_dtype)
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"bad VAE train settings steps={self.steps} batch_size={self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown VAE lr schedule {self.schedule!r}; use 'constant' or 'cosine'")
        if self.warmup_steps < 0 or self.adv_start < 0 or min(self.ssim_weight, self.adv_weight, self.kl_weight) < 0:
            raise ValueError("VAE warmup_steps, adv_start and the loss weights must be >= 0")
        if self.buffer_cases < 1 or self.refill_every < 0:
            raise ValueError(f"VAE buffer_cases must be >= 1 and refill_every >= 0, got {self.buffer_cases}, "
                             f"{self.refill_every}")



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
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: a config that names no preset or model is ``custom``."""
        return {"preset": "custom", "model_name": "custom", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAESettings":
        return build(cls, d)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
