"""The settings of one TCDM training run (:class:`TCDMSettings`, its :class:`TrainConfig`), built once on the
driver from the job's config through :func:`fcas.settings.build` and written into every checkpoint; ``arch``
is the part a resumed run must share. The loop is :mod:`fcas.training.tcdm`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fcas.diffusion.conditioning import ConditionConfig
from fcas.diffusion.schedulers import SchedulerConfig
from fcas.models.configs import ModelConfig, jsonable
from fcas.models.optim import SCHEDULES
from fcas.settings import build
from fcas.training.loop import check_amp_dtype

__all__ = ["TrainConfig", "TCDMSettings", "ARCH_KEYS"]

ARCH_KEYS = ("model", "condition", "scheduler", "shape")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_pairs: int = 1  # pairs per worker and step; bidirectional doubles the samples
    lr: float = 1e-4
    weight_decay: float = 1e-2
    crop: tuple[int, int, int] | None = None  # training crop in voxels (multiples of 4); None = whole
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3  # 0 keeps all
    bidirectional: bool = True
    unet_mode: str = "joint"  # 'joint' | 'pretrain_freeze'
    pretrain_steps: int = 0
    amp: bool = True  # autocast: CUDA; CPU only with amp_dtype bfloat16
    amp_dtype: str = "float16"  # float16 (with a loss scaler) | bfloat16
    activation_checkpointing: bool = False  # UNet/ControlNet blocks recomputed in backward: less memory, more time
    channels_last: bool = False  # channels_last_3d layout of the networks and their inputs
    fused_attention: bool = False  # PyTorch's fused scaled_dot_product_attention in MONAI's blocks (CUDA only)
    grad_clip: float = 1.0
    scale_factor_cases: int = 8
    schedule: str = "constant"  # constant | cosine (decay to lr_min at `steps`)
    warmup_steps: int = 0       # linear warm-up from 0 to lr
    lr_min: float = 0.0
    ema_decay: float = 0.0      # > 0: keep an EMA of the weights (saved beside them; export ships it)
    buffer_cases: int = 8       # streamed training: cases a worker holds (pairs are drawn among them)
    refill_every: int = 1       # steps between buffer refills (0: never; the job sets 0 when one worker holds all)
    latent_cache: str | None = None   # a jobs/cache_latents.py output: latents read, not encoded (same VAE)
    min_snr_gamma: float | None = None  # Min-SNR-γ loss weighting (e.g. 5); None = the plain Eq. 3 loss

    def __post_init__(self) -> None:
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        check_amp_dtype(self.amp_dtype)
        if self.unet_mode not in ("joint", "pretrain_freeze"):
            raise ValueError(f"unknown unet_mode {self.unet_mode!r}; use 'joint' or 'pretrain_freeze'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; use one of {SCHEDULES}")
        if not 0.0 <= self.ema_decay < 1.0 or self.warmup_steps < 0:
            raise ValueError(f"need 0 <= ema_decay < 1 and warmup_steps >= 0, got {self.ema_decay}, {self.warmup_steps}")
        if self.buffer_cases < 2:
            raise ValueError(f"buffer_cases must be >= 2 (pairs need two cases), got {self.buffer_cases}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or null for the plain loss), got {self.min_snr_gamma}")
        if self.refill_every < 0:
            raise ValueError(f"refill_every must be >= 0 (0: never refill), got {self.refill_every}")
        if self.steps < 0 or self.batch_pairs < 1 or self.checkpoint_every < 1:
            raise ValueError(
                f"need steps >= 0, batch_pairs >= 1, checkpoint_every >= 1; got {self.steps}, "
                f"{self.batch_pairs}, {self.checkpoint_every}"
            )


@dataclass(frozen=True)
class TCDMSettings:
    """Resolved configuration of one TCDM training run (built once on the driver)."""

    data: str
    out: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    vae: str | None = None
    init: str | None = None   # maisi:<unet file>,<controlnet file>: a fresh run starts from MAISI's weights
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: a config that names no preset is ``custom``; no model is
        :class:`ModelConfig`'s reading of ``{}`` (named ``custom``)."""
        return {"preset": "custom", "model": {}, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TCDMSettings":
        return build(cls, d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        if d["init"] is None:   # configs as before init existed
            del d["init"]
        if d["train"]["latent_cache"] is None:   # ... and before the latent cache
            del d["train"]["latent_cache"]
        return jsonable(d)

    def arch(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in ARCH_KEYS}
