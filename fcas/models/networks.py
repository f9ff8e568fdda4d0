"""Network builders for TCDM: the KL autoencoder (VAE), the denoising UNet and the template ControlNet.

All three come from MONAI (``monai.networks.nets.AutoencoderKL``, ``DiffusionModelUNet`` and
``ControlNet``); this module only turns a size config into instances and adds one thing MONAI's
ControlNet lacks: computing the conditioning embedding ``E_ctrl(c_raw)`` separately, so that a sampler
can embed the condition once and reuse it at every reverse step (:class:`TemplateControlNet`).

Shapes (3D, ``spatial_dims=3``):

* image ``(B, 1, D, H, W)`` float in [0, 1] -> latent ``(B, 4, D/4, H/4, W/4)``;
* c_raw ``(B, C_cond, D, H, W)`` -> embedding ``(B, unet.channels[0], D/4, H/4, W/4)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

__all__ = [
    "VAEConfig",
    "UNetConfig",
    "ModelConfig",
    "TemplateControlNet",
    "TCDM",
    "build_vae",
    "build_unet",
    "build_controlnet",
    "build_tcdm",
    "count_parameters",
]

LATENT_DOWNSAMPLE = 4  # the seed's latent grid: 1/4 per axis


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
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, False, False)
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
    num_res_blocks: tuple[int, ...] = (1, 1)
    attention_levels: tuple[bool, ...] = (False, False)
    num_head_channels: tuple[int, ...] = (8, 8)
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
class ModelConfig:
    name: str = "tiny"
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {"name", "vae", "unet"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(
            name=str(d.get("name", "custom")),
            vae=VAEConfig(**dict(d.get("vae") or {})),
            unet=UNetConfig(**dict(d.get("unet") or {})),
        )

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def jsonable(x):
    """Dicts, lists and tuples -> plain dicts and lists (JSON-ready); other values unchanged."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# ---- builders -----------------------------------------------------------------------------------
def build_vae(cfg: VAEConfig) -> nn.Module:
    """KL autoencoder, 1 -> ``cfg.latent_channels`` channels at 1/4 resolution per axis (CPU-safe settings)."""
    if cfg.kind == "maisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            latent_channels=cfg.latent_channels,
            num_channels=cfg.channels,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=1e-6,
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
            include_fc=False,
            use_flash_attention=False,
            use_checkpointing=False,
            use_convtranspose=False,
            norm_float16=False,  # fp16 norms only make sense on GPU
            num_splits=1,
            dim_split=1,
            save_mem=False,
        )
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_flash_attention=False,
    )


def _unet_kwargs(cfg: UNetConfig) -> dict:
    return dict(
        spatial_dims=3,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        include_fc=True,
        use_flash_attention=False,
    )


def build_unet(cfg: UNetConfig, latent_channels: int = 4) -> DiffusionModelUNet:
    """Denoiser ``eps_theta(Z_t, t, residuals)``: ``(B, latent_channels, d, h, w)`` -> same shape."""
    return DiffusionModelUNet(in_channels=latent_channels, out_channels=latent_channels, **_unet_kwargs(cfg))


class TemplateControlNet(ControlNetMaisi):
    """MONAI's ControlNet with the conditioning embedding exposed (``E_ctrl`` of seed Eq. 1).

    :meth:`embed_condition` maps ``c_raw (B, C_cond, D, H, W)`` to ``(B, channels[0], D/4, H/4, W/4)``;
    :meth:`forward` accepts either ``controlnet_cond`` (raw, embedded here) or a precomputed
    ``cond_embedding``, so a sampler embeds once per sample instead of once per step. Everything
    else is MONAI's ``ControlNetMaisi`` forward (which is MONAI's ``ControlNet`` split into helpers).
    """

    def embed_condition(self, c_raw: torch.Tensor) -> torch.Tensor:
        return self.controlnet_cond_embedding(c_raw)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        cond_embedding: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if cond_embedding is None:
            if controlnet_cond is None:
                raise ValueError("TemplateControlNet needs controlnet_cond (raw condition) or cond_embedding")
            cond_embedding = self.embed_condition(controlnet_cond)
        emb = self._prepare_time_and_class_embedding(x, timesteps, class_labels)
        h = self._apply_initial_convolution(x)
        if cond_embedding.shape[0] != h.shape[0] or cond_embedding.shape[2:] != h.shape[2:]:
            raise ValueError(
                f"condition embedding {tuple(cond_embedding.shape)} does not match the latent {tuple(h.shape)}: "
                f"c_raw must be {LATENT_DOWNSAMPLE}x the latent size per axis"
            )
        h = h + cond_embedding
        down_block_res_samples, h = self._apply_down_blocks(emb, context, h)
        h = self._apply_mid_block(emb, context, h)
        down_block_res_samples, mid_block_res_sample = self._apply_controlnet_blocks(h, down_block_res_samples)
        down_block_res_samples = [r * conditioning_scale for r in down_block_res_samples]
        return down_block_res_samples, mid_block_res_sample * conditioning_scale


def build_controlnet(cfg: UNetConfig, cond_in_channels: int, latent_channels: int = 4) -> TemplateControlNet:
    """Trainable ``E_ctrl`` + ControlNet encoder sized like the UNet, condition of ``cond_in_channels``."""
    if cond_in_channels < 1:
        raise ValueError(f"cond_in_channels must be >= 1, got {cond_in_channels}")
    kwargs = _unet_kwargs(cfg)
    kwargs["num_channels"] = kwargs.pop("channels")  # ControlNetMaisi's spelling
    return TemplateControlNet(
        in_channels=latent_channels,
        conditioning_embedding_in_channels=cond_in_channels,
        conditioning_embedding_num_channels=cfg.cond_embedding_channels,
        use_checkpointing=False,
        **kwargs,
    )


class TCDM(nn.Module):
    """Denoiser of TCDM: UNet + template ControlNet, predicting the noise (or velocity) of ``Z_t``.

    forward(z_t (B, 4, d, h, w), t (B,), c_raw (B, C, 4d, 4h, 4w) | cond_embedding) -> (B, 4, d, h, w)
    """

    def __init__(self, unet: DiffusionModelUNet, controlnet: TemplateControlNet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def embed_condition(self, c_raw: torch.Tensor) -> torch.Tensor:
        return self.controlnet.embed_condition(c_raw)

    def forward(
        self,
        z_t: torch.Tensor,
        timesteps: torch.Tensor,
        c_raw: torch.Tensor | None = None,
        cond_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        down, mid = self.controlnet(z_t, timesteps, controlnet_cond=c_raw, cond_embedding=cond_embedding)
        return self.unet(z_t, timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def build_tcdm(cfg: ModelConfig, cond_in_channels: int, init_controlnet_from_unet: bool = True) -> TCDM:
    """UNet + ControlNet; the ControlNet's shared layers start as a copy of the UNet's (ControlNet practice)."""
    unet = build_unet(cfg.unet, cfg.vae.latent_channels)
    controlnet = build_controlnet(cfg.unet, cond_in_channels, cfg.vae.latent_channels)
    if init_controlnet_from_unet:
        controlnet.load_state_dict(unet.state_dict(), strict=False)
    return TCDM(unet, controlnet)


def set_flash_attention(module: nn.Module, enabled: bool) -> int:
    """Switch every MONAI attention block under ``module`` to PyTorch's fused ``scaled_dot_product_attention``
    (``enabled``) or to the explicit softmax(QK^T)V path; returns how many blocks were switched.

    Networks are built with the explicit path (it runs everywhere, and MONAI's CPU diffusion tests use
    it); the fused path holds no (tokens x tokens) matrix, which matters on GPUs at the paper preset.
    Parameters are the same either way, so checkpoints load into both."""
    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "use_flash_attention", None), bool):
            if enabled and (getattr(m, "save_attn", False) or getattr(m, "rel_positional_embedding", None) is not None):
                continue  # MONAI refuses these combinations with the fused path
            m.use_flash_attention = bool(enabled)
            n += 1
    return n


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
