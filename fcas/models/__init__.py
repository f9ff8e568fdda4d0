"""TCDM networks (MONAI AutoencoderKL, DiffusionModelUNet, ControlNet), VAE helpers and checkpoints.

The network names below are re-exported lazily (PEP 562), so importing a light module of this package
(``fcas.models.configs``, ``fcas.models.checkpoint``) does not load MONAI.
"""
_NETWORKS = ("TCDM", "ModelConfig", "TemplateControlNet", "UNetConfig", "VAEConfig", "build_controlnet", "build_tcdm",
             "build_unet", "build_vae", "count_parameters")
__all__ = list(_NETWORKS)


def __getattr__(name: str):
    if name in _NETWORKS:
        from fcas.models import networks

        return getattr(networks, name)
    raise AttributeError(f"module 'fcas.models' has no attribute {name!r}")
