"""TCDM networks (MONAI AutoencoderKL, DiffusionModelUNet, ControlNet), VAE helpers and checkpoints."""
from fcas.models.networks import (  # noqa: F401
    TCDM,
    ModelConfig,
    TemplateControlNet,
    UNetConfig,
    VAEConfig,
    build_controlnet,
    build_tcdm,
    build_unet,
    build_vae,
    count_parameters,
)
