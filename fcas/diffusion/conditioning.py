"""TCDM condition (the paper's §3.1.1, Eq. 1): ``c_raw = M'_A ⊕ M'_B ⊕ I_B`` at full resolution.

``M'_A`` is the channel-wise binarization (MAISI's bit planes, or one-hot by config) of the reference
mask filtered to the eight cardiac classes, ``M'_B`` that of the whole template mask, ``I_B`` the
template image scaled to [0, 1]. The ``mask_only`` ablation (the paper's Table 4) keeps ``M'_A`` alone.
The ControlNet's condition encoder (``E_ctrl``) then maps ``c_raw`` to the latent grid.

Intensities: HU clipped to [-1000, 1000] and scaled to [0, 1] (:func:`hu_to_unit`), the inverse
:func:`unit_to_hu` writes back HU. Hand-written: a few tensor ops over :mod:`fcas.labels`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fcas.labels import LabelSchema, encode, encoded_channels, load_schema

__all__ = [
    "HU_MIN",
    "HU_MAX",
    "ConditionConfig",
    "hu_to_unit",
    "unit_to_hu",
    "condition_channels",
    "build_c_raw",
]

HU_MIN, HU_MAX = -1000.0, 1000.0


@dataclass(frozen=True)
class ConditionConfig:
    """How c_raw is built: ``encoding`` 'bits' | 'onehot'; ``mask_only`` drops M_B and I_B."""

    encoding: str = "bits"
    mask_only: bool = False
    schema: str = "cardiac"

    def __post_init__(self) -> None:
        if self.encoding not in ("bits", "onehot"):
            raise ValueError(f"unknown mask encoding {self.encoding!r}; use 'bits' or 'onehot'")

    @property
    def label_schema(self) -> LabelSchema:
        return load_schema(self.schema)

    @property
    def channels(self) -> int:
        return condition_channels(self.label_schema, self.encoding, self.mask_only)


def hu_to_unit(hu: torch.Tensor | np.ndarray) -> torch.Tensor:
    """HU -> float32 in [0, 1]: clip to [-1000, 1000], then ``(hu + 1000) / 2000``."""
    t = torch.as_tensor(np.asarray(hu) if isinstance(hu, np.ndarray) else hu).to(torch.float32)
    return (t.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


def unit_to_hu(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> HU (float32); values outside [0, 1] are clipped first."""
    return x.to(torch.float32).clamp(0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN


def condition_channels(schema: LabelSchema, encoding: str = "bits", mask_only: bool = False) -> int:
    """C of c_raw: ``n`` for mask_only, else ``2 n + 1`` (n = channels of one encoded mask)."""
    n = encoded_channels(schema, encoding)
    return n if mask_only else 2 * n + 1


def build_c_raw(
    mask_ref: torch.Tensor,
    mask_tmpl: torch.Tensor | None,
    image_tmpl: torch.Tensor | None,
    schema: LabelSchema,
    encoding: str = "bits",
    mask_only: bool = False,
) -> torch.Tensor:
    """Raw TCDM condition for direction tmpl@ref (the template pair B guides the synthesis of A).

    Args:
        mask_ref: reference mask M_A, integer ids ``(B, D, H, W)``; filtered to cardiac classes here.
        mask_tmpl: template mask M_B, integer ids ``(B, D, H, W)`` (kept whole); ignored if ``mask_only``.
        image_tmpl: template image I_B, ``(B, 1, D, H, W)`` float in [0, 1]; ignored if ``mask_only``.
        schema: label schema (cardiac ids, bit count).
        encoding: 'bits' (MAISI bit planes) or 'onehot'.
        mask_only: the ablation without template: c_raw = M'_A only.

    Returns:
        ``(B, C, D, H, W)`` float32, ``C = condition_channels(schema, encoding, mask_only)``;
        channel order M'_A, M'_B, I_B.
    """
    if mask_ref.ndim != 4:
        raise ValueError(f"mask_ref must be (B, D, H, W), got shape {tuple(mask_ref.shape)}")
    parts = [encode(schema.cardiac_only(mask_ref), schema, encoding, channel_dim=1)]
    if not mask_only:
        if mask_tmpl is None or image_tmpl is None:
            raise ValueError("the template condition needs mask_tmpl and image_tmpl (or set mask_only=True)")
        if tuple(mask_tmpl.shape) != tuple(mask_ref.shape):
            raise ValueError(f"mask_tmpl shape {tuple(mask_tmpl.shape)} != mask_ref shape {tuple(mask_ref.shape)}")
        if image_tmpl.ndim != 5 or image_tmpl.shape[1] != 1 or tuple(image_tmpl.shape[2:]) != tuple(mask_ref.shape[1:]):
            raise ValueError(
                f"image_tmpl must be (B, 1, D, H, W) matching the masks {tuple(mask_ref.shape)}, "
                f"got {tuple(image_tmpl.shape)}"
            )
        parts.append(encode(mask_tmpl, schema, encoding, channel_dim=1).to(parts[0].device))
        parts.append(image_tmpl.to(device=parts[0].device, dtype=torch.float32))
    return torch.cat(parts, dim=1)
