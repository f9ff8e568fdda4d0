"""The segmentation net F of the CAL experiments: MONAI's DynUNet (nnU-Net-like), sized by config.

Classes are the background plus the eight cardiac classes of the label schema (ids 0..8); the
surrounding tissues (lung, bone, soft tissue) are mapped to background before training
(``LabelSchema.cardiac_only``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from monai.networks.nets import DynUNet

from fcas.settings import build

__all__ = ["SegNetConfig", "build_segnet"]


@dataclass(frozen=True)
class SegNetConfig:
    """DynUNet sizes: one entry of ``filters`` / ``kernel_size`` / ``strides`` per level."""

    name: str = "tiny"
    filters: tuple[int, ...] = (8, 16, 32)
    kernel_size: tuple[int, ...] = (3, 3, 3)
    strides: tuple[int, ...] = (1, 2, 2)
    norm: str = "instance"
    res_block: bool = False
    in_channels: int = 1
    out_channels: int = 9  # background + 8 cardiac classes

    def __post_init__(self) -> None:
        for k in ("filters", "kernel_size", "strides"):
            object.__setattr__(self, k, tuple(int(v) for v in getattr(self, k)))
        n = len(self.filters)
        if n < 2 or len(self.kernel_size) != n or len(self.strides) != n:
            raise ValueError(f"filters, kernel_size and strides need one entry per level (>= 2 levels); got "
                             f"{self.filters}, {self.kernel_size}, {self.strides}")
        if self.out_channels < 2:
            raise ValueError(f"out_channels must be >= 2, got {self.out_channels}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SegNetConfig":
        return build(cls, d)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (product of the strides)."""
        out = 1
        for s in self.strides:
            out *= s
        return out


def build_segnet(cfg: SegNetConfig) -> torch.nn.Module:
    """``DynUNet``: ``(B, 1, D, H, W)`` image in [0, 1] -> ``(B, out_channels, D, H, W)`` logits."""
    return DynUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        kernel_size=list(cfg.kernel_size),
        strides=list(cfg.strides),
        upsample_kernel_size=list(cfg.strides[1:]),
        filters=list(cfg.filters),
        norm_name=cfg.norm,
        res_block=cfg.res_block,
        deep_supervision=False,
    )
