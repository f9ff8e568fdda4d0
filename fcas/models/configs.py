"""The size configs of the TCDM's networks (:class:`VAEConfig`, :class:`UNetConfig`, :class:`MaisiConfig`, and
:class:`ModelConfig` holding them): frozen dataclasses read from ``configs/model/<name>.yaml`` or a checkpoint's
``config.json`` through :func:`fcas.settings.build`, written back by ``to_dict`` (the form a checkpoint's
config hash is taken over). The builders are :mod:`fcas.models.networks`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fcas.settings import build

__all__ = ["VAEConfig", "UNetConfig", "MaisiConfig", "ModelConfig", "jsonable", "LATENT_DOWNSAMPLE"]

LATENT_DOWNSAMPLE = 4  # the paper's latent grid: 1/4 per axis


def _tuple(v, n: int | None = None, typ=int) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(typ(x) for x in v)
    if n is None:
        raise ValueError(f"expected a sequence, got {v!r}")
    return tuple(typ(v) for _ in range(n))


@dataclass(frozen=True)
class VAEConfig:
    """Size of the KL autoencoder. ``kind='monai'`` builds ``AutoencoderKL``, ``'maisi'`` ``AutoencoderKlMaisi``."""

    channels: tuple[int, ...] = (8, 16, 16)
    num_res_blocks: tuple[int, ...] | int = (1, 1, 1)             # an int: the same for every level
    attention_levels: tuple[bool, ...] | bool = (False, False, False)
    latent_channels: int = 4
    norm_num_groups: int = 8
    kind: str = "monai"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", _tuple(self.channels))
        object.__setattr__(self, "num_res_blocks", _tuple(self.num_res_blocks, len(self.channels)))
        object.__setattr__(self, "attention_levels", _tuple(self.attention_levels, len(self.channels), bool))
        if 2 ** (len(self.channels) - 1) != LATENT_DOWNSAMPLE:
            raise ValueError(
                f"VAE channels {self.channels} give a downsampling of {2 ** (len(self.channels) - 1)}; "
                f"TCDM needs {LATENT_DOWNSAMPLE} (three levels)"
            )
        if self.kind not in ("monai", "maisi"):
            raise ValueError(f"unknown VAE kind {self.kind!r}; use 'monai' or 'maisi'")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")


@dataclass(frozen=True)
class UNetConfig:
    """Size of the denoising UNet; the ControlNet copies it (its encoder half) plus a condition encoder."""

    channels: tuple[int, ...] = (16, 32)
    num_res_blocks: tuple[int, ...] | int = (1, 1)             # an int: the same for every level
    attention_levels: tuple[bool, ...] | bool = (False, False)
    num_head_channels: tuple[int, ...] | int = (8, 8)
    norm_num_groups: int = 8
    cond_embedding_channels: tuple[int, ...] = (8, 16, 16)

    def __post_init__(self) -> None:
        n = len(self.channels)
        object.__setattr__(self, "channels", _tuple(self.channels))
        object.__setattr__(self, "num_res_blocks", _tuple(self.num_res_blocks, n))
        object.__setattr__(self, "attention_levels", _tuple(self.attention_levels, n, bool))
        object.__setattr__(self, "num_head_channels", _tuple(self.num_head_channels, n))
        object.__setattr__(self, "cond_embedding_channels", _tuple(self.cond_embedding_channels))
        if 2 ** (len(self.cond_embedding_channels) - 1) != LATENT_DOWNSAMPLE:
            raise ValueError(
                f"cond_embedding_channels {self.cond_embedding_channels}: MONAI's ControlNetConditioningEmbedding "
                f"downsamples by 2 per entry after the first, so {LATENT_DOWNSAMPLE}x needs exactly 3 entries"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"UNet channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")


@dataclass(frozen=True)
class MaisiConfig:
    """What MAISI's networks need beyond :class:`UNetConfig` (``ModelConfig.kind='maisi'`` only).

    The defaults are MAISI's ddpm release (maisi3d-ddpm); ``configs/model/maisi*.yaml`` cite the released
    configs. ``spacing`` is always an input (both releases set ``include_spacing_input``).

    * ``include_body_region``: top/bottom body-region inputs (ddpm: yes, rflow: no); we always feed
      ``body_region`` (MAISI's region 1 = thorax, ``scripts/utils.py:get_body_region_index_from_mask``);
    * ``num_class_embeds``: rflow's modality embedding (128); we always feed ``modality`` (1 = "ct" in
      MAISI's ``configs/modality_mapping.json``, the value its ``train_controlnet.py`` trains with);
    * ``resblock_updown`` / ``include_fc``: MAISI's block options (rflow: both on; ddpm: both off).
    """

    include_body_region: bool = True
    num_class_embeds: int | None = None
    resblock_updown: bool = False
    include_fc: bool = False
    body_region: int = 1
    modality: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.body_region < 4:
            raise ValueError(f"body_region must be one of MAISI's 4 regions (0..3), got {self.body_region}")
        if self.num_class_embeds is not None and not 0 <= self.modality < self.num_class_embeds:
            raise ValueError(f"modality {self.modality} is not below num_class_embeds={self.num_class_embeds}")


@dataclass(frozen=True)
class ModelConfig:
    """``kind``: 'monai' (MONAI ``DiffusionModelUNet`` + ``ControlNet``) or 'maisi' (MAISI's networks, ``maisi``)."""

    name: str = "tiny"
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    kind: str = "monai"
    maisi: MaisiConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("monai", "maisi"):
            raise ValueError(f"unknown model kind {self.kind!r}; use 'monai' or 'maisi'")
        if self.kind == "maisi" and self.maisi is None:
            object.__setattr__(self, "maisi", MaisiConfig())
        if self.kind == "monai" and self.maisi is not None:
            raise ValueError("model.maisi is only for kind: maisi")

    @classmethod
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: a config that names no model is ``custom``."""
        return {"name": "custom", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return build(cls, d, where="model")

    def to_dict(self) -> dict:
        d = jsonable(asdict(self))
        if self.kind == "monai":  # written as before 'kind' existed: old checkpoints keep their config hash
            del d["kind"], d["maisi"]
        return d


def jsonable(x):
    """Dicts, lists and tuples -> plain dicts and lists (JSON-ready); other values unchanged."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
