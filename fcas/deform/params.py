"""MGM parameters (the paper's §3.1.3, Eq. 5): ranges from ``configs/mgm/``, one frozen draw per sample.

* :class:`MGMRanges` -- the sampling ranges, built from the Hydra ``mgm.ranges`` dict with
  :meth:`MGMRanges.from_dict`; an invalid range raises ``ValueError`` naming the field.
* :class:`MGMParams` -- one sample's transform: rotation φ (degrees, per axis), isotropic and
  per-axis scale γ, shear ϕ, translation δ (mm), non-rigid magnitude α (mm, RMS displacement) and
  smoothness ζ (mm, Gaussian correlation length), plus the integer seed of the non-rigid noise.
  :meth:`MGMParams.to_flat` gives a flat ``dict[str, float]`` for a Parquet manifest row and
  :meth:`MGMParams.from_flat` reads it back exactly.
* :func:`draw_params` -- every random number of sample ``sample_id``, try ``attempt`` comes from
  ``numpy.random.default_rng([run_seed, sample_id, attempt])`` in a fixed order, so a plan made on
  the driver and a redraw made on a worker agree bit for bit.

Axis ``a`` of every per-axis parameter is array axis ``a`` (NIfTI i, j, k). Hand-written here:
the parameter bookkeeping is specific to this project.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np

from fcas.settings import build

__all__ = ["MGMRanges", "MGMParams", "draw_params", "param_rng"]

Range = tuple[float, float]


def _range(name: str, value, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> Range:
    """Validate a ``[low, high]`` pair; ``lo``/``hi`` bound both ends (``lo_open``: strictly above)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"mgm.ranges.{name} must be a [low, high] pair, got {value!r}")
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError(f"mgm.ranges.{name} must hold two numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"mgm.ranges.{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"mgm.ranges.{name}: low {low} > high {high}")
    if lo is not None and (low <= lo if lo_open else low < lo):
        raise ValueError(f"mgm.ranges.{name}: low {low} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and high > hi:
        raise ValueError(f"mgm.ranges.{name}: high {high} must be <= {hi}")
    return (low, high)


@dataclass(frozen=True)
class MGMRanges:
    """Uniform sampling ranges ``(low, high)`` of the MGM transform (defaults: configs/mgm/default.yaml).

    Attributes:
        rotation_deg: rotation about each array axis, degrees (drawn independently per axis).
        scale_iso: isotropic scale γ (> 0); multiplied by ``scale_axis`` per axis.
        scale_axis: per-axis scale factor (> 0), drawn independently per axis.
        shear: the three shear factors ϕ (upper triangle of the shear matrix), in (-1, 1).
        translation_mm: translation δ per axis, mm.
        alpha_mm: non-rigid magnitude α, the RMS displacement of the smooth field, mm (>= 0).
        zeta_mm: non-rigid smoothness ζ, the Gaussian correlation length of the field, mm (> 0).
    """

    rotation_deg: Range = (-12.0, 12.0)
    scale_iso: Range = (0.92, 1.08)
    scale_axis: Range = (0.96, 1.04)
    shear: Range = (-0.04, 0.04)
    translation_mm: Range = (-4.0, 4.0)
    alpha_mm: Range = (0.0, 3.0)
    zeta_mm: Range = (12.0, 20.0)

    def __post_init__(self) -> None:
        checks = {
            "rotation_deg": dict(lo=-180.0, hi=180.0),
            "scale_iso": dict(lo=0.0, lo_open=True),
            "scale_axis": dict(lo=0.0, lo_open=True),
            "shear": dict(lo=-0.99, hi=0.99),
            "translation_mm": {},
            "alpha_mm": dict(lo=0.0),
            "zeta_mm": dict(lo=0.0, lo_open=True),
        }
        for name, kw in checks.items():
            object.__setattr__(self, name, _range(name, getattr(self, name), **kw))

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "MGMRanges":
        """Build from a plain dict / OmegaConf mapping; unknown keys raise ``ValueError``."""
        return build(cls, d, where="mgm.ranges")

    def to_dict(self) -> dict[str, list[float]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class MGMParams:
    """One sample's MGM transform (Eq. 5). All fields are floats (``field_seed`` an exact integer).

    The affine part maps a template point ``p`` (mm, about the grid centre) to
    ``R @ H @ S @ p + t`` with ``R = R_2 R_1 R_0`` (rotations about array axes 0, 1, 2),
    ``H`` the unit upper-triangular shear matrix ``[[1, s01, s02], [0, 1, s12], [0, 0, 1]]``,
    ``S = diag(scale_iso * scale_a)``, ``t = translation``; the non-rigid field (α, ζ) is then
    applied in the output space (see :mod:`fcas.deform.field`).
    """

    rotation_deg_0: float = 0.0
    rotation_deg_1: float = 0.0
    rotation_deg_2: float = 0.0
    scale_iso: float = 1.0
    scale_0: float = 1.0
    scale_1: float = 1.0
    scale_2: float = 1.0
    shear_01: float = 0.0
    shear_02: float = 0.0
    shear_12: float = 0.0
    translation_mm_0: float = 0.0
    translation_mm_1: float = 0.0
    translation_mm_2: float = 0.0
    alpha_mm: float = 0.0
    zeta_mm: float = 16.0
    field_seed: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"MGMParams.{f.name} must be a number, got {v!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"MGMParams.{f.name} must be finite, got {v}")
            object.__setattr__(self, f.name, v)
        for name in ("scale_iso", "scale_0", "scale_1", "scale_2", "zeta_mm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MGMParams.{name} must be > 0, got {getattr(self, name)}")
        if self.alpha_mm < 0:
            raise ValueError(f"MGMParams.alpha_mm must be >= 0, got {self.alpha_mm}")
        if self.field_seed != int(self.field_seed) or not 0 <= self.field_seed < 2**53:
            raise ValueError(f"MGMParams.field_seed must be an integer in [0, 2**53), got {self.field_seed}")

    # ---- views ------------------------------------------------------------------------------
    @property
    def rotation_deg(self) -> tuple[float, float, float]:
        return (self.rotation_deg_0, self.rotation_deg_1, self.rotation_deg_2)

    @property
    def scale(self) -> tuple[float, float, float]:
        """Total scale per axis: ``scale_iso * scale_a``."""
        return (self.scale_iso * self.scale_0, self.scale_iso * self.scale_1, self.scale_iso * self.scale_2)

    @property
    def shear(self) -> tuple[float, float, float]:
        return (self.shear_01, self.shear_02, self.shear_12)

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        return (self.translation_mm_0, self.translation_mm_1, self.translation_mm_2)

    @property
    def is_identity(self) -> bool:
        """True when the transform is exactly the identity (no rotation/shear/shift, unit scale, α = 0)."""
        return (self.rotation_deg == (0.0, 0.0, 0.0) and self.scale == (1.0, 1.0, 1.0)
                and self.shear == (0.0, 0.0, 0.0) and self.translation_mm == (0.0, 0.0, 0.0)
                and self.alpha_mm == 0.0)

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_flat(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + name: float}`` (e.g. one manifest row); inverse :meth:`from_flat`."""
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_flat(cls, d: Mapping[str, float], prefix: str = "") -> "MGMParams":
        """Read the fields named ``prefix + name`` from ``d`` (other keys are ignored)."""
        missing = [prefix + f.name for f in fields(cls) if prefix + f.name not in d]
        if missing:
            raise ValueError(f"MGM parameters missing from row: {missing}")
        return cls(**{f.name: float(d[prefix + f.name]) for f in fields(cls)})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def param_rng(run_seed: int, sample_id: int, attempt: int = 0) -> np.random.Generator:
    """The generator of sample ``sample_id``, try ``attempt``: ``default_rng([run_seed, sample_id, attempt])``."""
    for name, v in (("run_seed", run_seed), ("sample_id", sample_id), ("attempt", attempt)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return np.random.default_rng([int(run_seed), int(sample_id), int(attempt)])


def draw_params(ranges: MGMRanges, rng: np.random.Generator) -> MGMParams:
    """Draw one :class:`MGMParams` uniformly within ``ranges`` (fixed draw order, see module doc)."""
    u = rng.uniform
    rot = [u(*ranges.rotation_deg) for _ in range(3)]
    iso = u(*ranges.scale_iso)
    sc = [u(*ranges.scale_axis) for _ in range(3)]
    sh = [u(*ranges.shear) for _ in range(3)]
    tr = [u(*ranges.translation_mm) for _ in range(3)]
    alpha = u(*ranges.alpha_mm)
    zeta = u(*ranges.zeta_mm)
    seed = int(rng.integers(0, 2**31))
    return MGMParams(
        rotation_deg_0=rot[0], rotation_deg_1=rot[1], rotation_deg_2=rot[2],
        scale_iso=iso, scale_0=sc[0], scale_1=sc[1], scale_2=sc[2],
        shear_01=sh[0], shear_02=sh[1], shear_12=sh[2],
        translation_mm_0=tr[0], translation_mm_1=tr[1], translation_mm_2=tr[2],
        alpha_mm=alpha, zeta_mm=zeta, field_seed=float(seed),
    )
