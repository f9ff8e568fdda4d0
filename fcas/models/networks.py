"""Network builders for TCDM: the KL autoencoder (VAE), the denoising UNet and the template ControlNet.

All three come from MONAI (``monai.networks.nets.AutoencoderKL``, ``DiffusionModelUNet`` and
``ControlNet``); this module only turns a size config into instances and adds one thing MONAI's
ControlNet lacks: computing the conditioning embedding ``E_ctrl(c_raw)`` separately, so that a sampler
can embed the condition once and reuse it at every reverse step (:class:`TemplateControlNet`).
``ModelConfig.kind='maisi'`` builds MAISI's own networks instead (``DiffusionModelUNetMaisi`` +
``ControlNetMaisi``, whose released weights :mod:`fcas.models.maisi` loads); they take extra inputs
(voxel spacing, body region, modality) that :func:`maisi_inputs` makes.

Shapes (3D, ``spatial_dims=3``):

* image ``(B, 1, D, H, W)`` float in [0, 1] -> latent ``(B, 4, D/4, H/4, W/4)``;
* c_raw ``(B, C_cond, D, H, W)`` -> embedding ``(B, unet.channels[0], D/4, H/4, W/4)``.

The size configs live in :mod:`fcas.models.configs` (re-exported here).
"""
from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from fcas.models.configs import LATENT_DOWNSAMPLE, MaisiConfig, ModelConfig, UNetConfig, VAEConfig, jsonable

__all__ = [
    "VAEConfig",
    "UNetConfig",
    "MaisiConfig",
    "ModelConfig",
    "TemplateControlNet",
    "TCDM",
    "build_vae",
    "build_unet",
    "build_controlnet",
    "build_tcdm",
    "maisi_inputs",
    "count_parameters",
    "jsonable",
    "LATENT_DOWNSAMPLE",
]

# ---- builders -----------------------------------------------------------------------------------
def build_vae(cfg: VAEConfig) -> nn.Module:
    """KL autoencoder, 1 -> ``cfg.latent_channels`` channels at 1/4 resolution per axis (CPU-safe settings)."""
    common = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=cfg.latent_channels,
                  num_res_blocks=cfg.num_res_blocks, attention_levels=cfg.attention_levels,
                  norm_num_groups=cfg.norm_num_groups, with_encoder_nonlocal_attn=False,
                  with_decoder_nonlocal_attn=False, use_flash_attention=False)
    if cfg.kind == "maisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(num_channels=cfg.channels, norm_eps=1e-6, include_fc=False, use_checkpointing=False,
                                  use_convtranspose=False, norm_float16=False,  # fp16 norms only make sense on GPU
                                  num_splits=1, dim_split=1, save_mem=False, **common)
    return AutoencoderKL(channels=cfg.channels, **common)


def _unet_kwargs(cfg: UNetConfig, maisi: MaisiConfig | None = None) -> dict:
    kwargs = dict(
        spatial_dims=3,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        include_fc=True,
        use_flash_attention=False,
    )
    if maisi is not None:
        kwargs["num_channels"] = kwargs.pop("channels")  # MAISI's spelling
        kwargs.update(include_fc=maisi.include_fc, resblock_updown=maisi.resblock_updown,
                      num_class_embeds=maisi.num_class_embeds)
    return kwargs


def build_unet(cfg: UNetConfig, latent_channels: int = 4, maisi: MaisiConfig | None = None) -> nn.Module:
    """Denoiser ``eps_theta(Z_t, t, residuals)``: ``(B, latent_channels, d, h, w)`` -> same shape.

    ``maisi`` given: MAISI's ``DiffusionModelUNetMaisi`` (spacing input, and the body-region inputs when
    ``maisi.include_body_region``), else MONAI's ``DiffusionModelUNet``."""
    if maisi is None:
        return DiffusionModelUNet(in_channels=latent_channels, out_channels=latent_channels, **_unet_kwargs(cfg))
    return MaisiUNet(
        in_channels=latent_channels,
        out_channels=latent_channels,
        include_top_region_index_input=maisi.include_body_region,
        include_bottom_region_index_input=maisi.include_body_region,
        include_spacing_input=True,
        **_unet_kwargs(cfg, maisi),
    )


class MaisiUNet(DiffusionModelUNetMaisi):
    """MAISI's ``DiffusionModelUNetMaisi`` with the ControlNet residuals added out of place.

    MAISI adds them in place (``+=``), which autograd refuses once the UNet itself trains (MAISI trains
    only its ControlNet, against a frozen UNet). Same parameters and the same values: in MAISI the last
    down-block residual is the very tensor the middle block reads, so it sees that residual added; kept.
    """

    def _apply_down_blocks(self, h, emb, context, down_block_additional_residuals):
        h, res = super()._apply_down_blocks(h, emb, context, None)
        if down_block_additional_residuals is None:
            return h, res
        aliased = res[-1] is h
        res = [r + extra for r, extra in zip(res, down_block_additional_residuals)]
        return (res[-1] if aliased else h), res

    def forward(self, x, timesteps, context=None, class_labels=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, top_region_index_tensor=None, bottom_region_index_tensor=None,
                spacing_tensor=None):
        emb = self._get_time_and_class_embedding(x, timesteps, class_labels)
        emb = self._get_input_embeddings(emb, top_region_index_tensor, bottom_region_index_tensor, spacing_tensor)
        h, res = self._apply_down_blocks(self.conv_in(x), emb, context, down_block_additional_residuals)
        h = self.middle_block(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        return self.out(self._apply_up_blocks(h, emb, context, res))


class TemplateControlNet(ControlNetMaisi):
    """MONAI's ControlNet with the conditioning embedding exposed (``E_ctrl`` of the paper's Eq. 1).

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


def build_controlnet(cfg: UNetConfig, cond_in_channels: int, latent_channels: int = 4,
                     maisi: MaisiConfig | None = None) -> TemplateControlNet:
    """Trainable ``E_ctrl`` + ControlNet encoder sized like the UNet, condition of ``cond_in_channels``."""
    if cond_in_channels < 1:
        raise ValueError(f"cond_in_channels must be >= 1, got {cond_in_channels}")
    kwargs = _unet_kwargs(cfg, maisi)
    if maisi is None:
        kwargs["num_channels"] = kwargs.pop("channels")  # ControlNetMaisi's spelling
    return TemplateControlNet(
        in_channels=latent_channels,
        conditioning_embedding_in_channels=cond_in_channels,
        conditioning_embedding_num_channels=cfg.cond_embedding_channels,
        use_checkpointing=False,
        **kwargs,
    )


def maisi_inputs(cfg: MaisiConfig, z_t: torch.Tensor, spacing) -> tuple[dict, dict]:
    """The extra inputs of MAISI's UNet and ControlNet for a batch ``z_t``: ``(unet kwargs, controlnet kwargs)``.

    ``spacing``: voxel spacing in mm (3 values, NIfTI axis order like MAISI's, or ``(B, 3)``). Scaled as
    MAISI's ``scripts/sample.py`` feeds them: spacing x 1e2, one-hot body region x 1e2; the modality as
    ``class_labels`` of both networks (``num_class_embeds`` set, the rflow release)."""
    if spacing is None:
        raise ValueError("MAISI's diffusion UNet needs the voxel spacing (mm): pass spacing=")
    n, dev = z_t.shape[0], z_t.device
    mm = torch.as_tensor(spacing, dtype=z_t.dtype, device=dev).reshape(-1, 3).expand(n, 3)
    unet: dict = {"spacing_tensor": mm * 1e2}
    if cfg.include_body_region:
        region = torch.zeros(n, 4, dtype=z_t.dtype, device=dev)
        region[:, cfg.body_region] = 1e2
        unet.update(top_region_index_tensor=region, bottom_region_index_tensor=region)
    control: dict = {}
    if cfg.num_class_embeds is not None:
        control["class_labels"] = unet["class_labels"] = torch.full((n,), cfg.modality, dtype=torch.long, device=dev)
    return unet, control


class TCDM(nn.Module):
    """Denoiser of TCDM: UNet + template ControlNet, predicting the noise (or velocity) of ``Z_t``.

    forward(z_t (B, 4, d, h, w), t (B,), c_raw (B, C, 4d, 4h, 4w) | cond_embedding, spacing) -> (B, 4, d, h, w);
    ``spacing`` (mm) is read only by MAISI's networks (``maisi`` set), which need it.
    """

    def __init__(self, unet: nn.Module, controlnet: TemplateControlNet, maisi: MaisiConfig | None = None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.maisi = maisi

    def embed_condition(self, c_raw: torch.Tensor) -> torch.Tensor:
        return self.controlnet.embed_condition(c_raw)

    def extra_inputs(self, z_t: torch.Tensor, spacing=None) -> tuple[dict, dict]:
        """``(unet kwargs, controlnet kwargs)`` beyond ``(z_t, t)``: none for MONAI's networks."""
        return ({}, {}) if self.maisi is None else maisi_inputs(self.maisi, z_t, spacing)

    def forward(
        self,
        z_t: torch.Tensor,
        timesteps: torch.Tensor,
        c_raw: torch.Tensor | None = None,
        cond_embedding: torch.Tensor | None = None,
        spacing=None,
    ) -> torch.Tensor:
        unet_kw, control_kw = self.extra_inputs(z_t, spacing)
        down, mid = self.controlnet(z_t, timesteps, controlnet_cond=c_raw, cond_embedding=cond_embedding, **control_kw)
        return self.unet(z_t, timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         **unet_kw)


def build_tcdm(cfg: ModelConfig, cond_in_channels: int, init_controlnet_from_unet: bool = True) -> TCDM:
    """UNet + ControlNet; the ControlNet's shared layers start as a copy of the UNet's (ControlNet practice).

    MAISI's ControlNet has no spacing/region inputs, so its time-embedding projections are narrower than
    the UNet's: those are left as built (MAISI's ``train_controlnet.py`` copies the same way)."""
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, cfg.maisi)
    controlnet = build_controlnet(cfg.unet, cond_in_channels, cfg.vae.latent_channels, cfg.maisi)
    if init_controlnet_from_unet:
        sd = unet.state_dict()
        if cfg.maisi is not None:
            own = controlnet.state_dict()
            sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        controlnet.load_state_dict(sd, strict=False)
    return TCDM(unet, controlnet, cfg.maisi)


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


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) of every down, middle and up block
    of the diffusion UNets / ControlNets under ``module``, and MONAI's own ``use_checkpoint`` of an
    ``AutoencoderKL``: a block keeps only its inputs for backward and recomputes the rest, trading about a
    third more step time for its activation memory. Parameters and state-dict keys are unchanged; only
    forwards with gradients are checkpointed. Returns how many blocks (or autoencoders) were switched.

    MONAI's ``DiffusionModelUNet`` / ``ControlNet`` have no such option, hence this (hand-written)."""
    from torch.utils.checkpoint import checkpoint

    def switch(block: nn.Module) -> int:
        if enabled:
            plain = type(block).forward.__get__(block)

            def forward(*args, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(plain, *args, use_reentrant=False, **kwargs)
                return plain(*args, **kwargs)

            block.forward = forward
        else:
            block.__dict__.pop("forward", None)
        return 1

    n = 0
    for m in list(module.modules()):
        if isinstance(getattr(m, "use_checkpoint", None), bool) and hasattr(m, "encoder") and hasattr(m, "decoder"):
            m.use_checkpoint = bool(enabled)   # MONAI AutoencoderKL
            n += 1
        for name in ("down_blocks", "up_blocks"):
            blocks = getattr(m, name, None)
            if isinstance(blocks, nn.ModuleList):
                n += sum(switch(b) for b in blocks)
        mid = getattr(m, "middle_block", None)
        if isinstance(mid, nn.Module):
            n += switch(mid)
    return n


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
