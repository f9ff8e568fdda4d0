"""FID between two sets of 3D volumes on features of the project's own VAE encoder; LPIPS gate.

No downloadable feature weights are used (nothing can be downloaded at run time):
the feature network is the **encoder of the project's KL autoencoder** (MONAI ``AutoencoderKL``),
loaded from a TCDM or VAE checkpoint folder, by default the bundled ``checkpoints/demo``.
The feature vector of a volume ``(1, X, Y, Z)`` in [0, 1] is the global average pool of the output
of the last residual block of every resolution level of the encoder, concatenated (the demo VAE:
16 + 32 + 32 = 80 features); :attr:`VAEEncoderFeatures.description` names the checkpoint digest and
the blocks, and every report quotes it. FIDs computed with different feature networks are not
comparable with each other, nor with the paper's Table 1 (Inception / its own network).

Fréchet distance (the paper's Eq. 12): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.
Hand-written: MONAI's ``get_fid_score`` calls ``scipy.linalg.sqrtm(..., disp=False)`` (``disp`` is
deprecated in SciPy 1.17 and removed in 1.18), prints to stdout, and fails on the singular
covariances of sets smaller than the feature dimension. Here the trace term uses the identity
``tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``, whose argument is symmetric positive
semi-definite, so it is the sum of the square roots of its (clipped non-negative) eigenvalues
(:func:`scipy.linalg.eigh`); no complex round-off, exact for singular covariances. A test checks
it against the ``scipy.linalg.sqrtm`` formula on well-conditioned data. Covariances are unbiased
(``N - 1``); a set needs at least 2 volumes. With fewer volumes than features the estimate is
biased upwards (as every FID); compare FIDs at equal set sizes only.

Sub-volume FID (:meth:`VAEEncoderFeatures.patches`): ten volumes give ten feature vectors, so a set's
covariance has rank 9 in 160 dimensions and the volume FID swings with the initial noise alone. As MAISI
scores FID over the 2D slices of its volumes rather than over whole volumes, :meth:`patches` pools each
block's output over a ``g x g x g`` grid of sub-volumes instead of globally (``g = 4``: 64 rows of the same
features per volume, each one region of 16^3 voxels at 64^3): 640 rows for ten volumes, more rows than
features. Both FIDs are reported; they measure different things (whole volumes vs regions).

LPIPS needs a pretrained backbone; nothing is downloaded. :func:`make_lpips` returns ``None``
(the report says "not computed") unless a weights path is given, and then builds MONAI's
``PerceptualLoss(network_type="resnet50", is_fake_3d=True, pretrained_path=...)`` (needs torchvision).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import nn

__all__ = ["feature_stats", "frechet_distance", "fid", "VAEEncoderFeatures", "make_lpips", "lpips"]


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(N, F)`` features -> mean ``(F,)`` and unbiased covariance ``(F, F)`` (float64); ``N >= 2``."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 volumes per set, got {f.shape[0]}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (the paper's Eq. 12); see the module docstring."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sa, sb = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sa.shape != sb.shape or sa.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"shapes do not match: mu {mu_a.shape} / {mu_b.shape}, sigma {sa.shape} / {sb.shape}")
    ha = _psd_sqrt(sa)
    m = ha @ sb @ ha
    ev = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    d = mu_a - mu_b
    return float(max(d @ d + np.trace(sa) + np.trace(sb) - 2 * tr_covmean, 0.0))


def fid(features_a, features_b) -> float:
    """FID between two feature sets ``(N_a, F)`` and ``(N_b, F)``."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def _is_resblock(m: nn.Module) -> bool:
    return type(m).__name__.endswith("ResBlock")


class VAEEncoderFeatures:
    """FID features from the encoder of the project's VAE (MONAI ``AutoencoderKL``).

    Args:
        vae: an autoencoder with ``encoder.blocks`` (MONAI ``AutoencoderKL`` / MAISI's).
        layers: indices into ``encoder.blocks`` whose outputs are pooled; ``None``: the last
            residual block of every resolution level.
        name: what the report calls the network (checkpoint URI and digest).
        resize: resample every volume to this ``(X, Y, Z)`` first (trilinear), or ``None``.
        device: where the encoder runs; features come back on the CPU.
    """

    def __init__(self, vae: nn.Module, layers: Sequence[int] | None = None, name: str = "vae",
                 resize: Sequence[int] | None = None, device: str | torch.device = "cpu") -> None:
        blocks = getattr(getattr(vae, "encoder", None), "blocks", None)
        if blocks is None:
            raise ValueError(f"{type(vae).__name__} has no encoder.blocks: not a MONAI AutoencoderKL")
        self.blocks = list(blocks)
        if layers is None:
            layers = [i for i, b in enumerate(self.blocks)
                      if _is_resblock(b) and (i + 1 == len(self.blocks) or not _is_resblock(self.blocks[i + 1]))]
        layers = sorted(int(i) for i in layers)
        if not layers or layers[0] < 0 or layers[-1] >= len(self.blocks):
            raise ValueError(f"feature layers must index encoder.blocks (0..{len(self.blocks) - 1}), got {layers}")
        self.layers = tuple(layers)
        self.name = name
        self.resize = None if resize is None else tuple(int(s) for s in resize)
        self.device = torch.device(device)
        self.vae = vae.eval().requires_grad_(False).to(self.device)
        self._dim: int | None = None

    @classmethod
    def from_checkpoint(cls, spec: str, layers: Sequence[int] | None = None,
                        resize: Sequence[int] | None = None, device: str | torch.device = "cpu") -> "VAEEncoderFeatures":
        """From a TCDM or VAE checkpoint folder (or a training output root), e.g. ``checkpoints/demo``."""
        from fcas.models.bundle import load_vae
        from fcas.models.networks import VAEConfig

        if spec in (None, "", "random", "none"):
            raise ValueError("FID features need a trained VAE checkpoint; an untrained one measures nothing")
        vae, _, _, digest = load_vae(str(spec), VAEConfig())
        return cls(vae, layers, name=f"{spec} (digest {digest[:12]})", resize=resize, device=device)

    @property
    def description(self) -> str:
        names = ", ".join(f"{i}:{type(self.blocks[i]).__name__}" for i in self.layers)
        rs = f", volumes resampled to {self.resize}" if self.resize else ""
        return (f"encoder of the project's VAE {self.name} ({type(self.vae).__name__}); global average pool "
                f"of encoder blocks [{names}] concatenated ({self.dim} features){rs}; no external weights")

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self(torch.zeros(1, 1, 8, 8, 8)).shape[1])
        return self._dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` float in [0, 1] -> features ``(B, F)`` float64."""
        return self._pooled(images, None)

    @torch.no_grad()
    def patches(self, images: torch.Tensor, grid: int = 4) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` -> ``(B * grid^3, F)``: the same features pooled over each sub-volume of a
        ``grid^3`` partition (module docstring), volume by volume, sub-volumes in C order."""
        if int(grid) < 1:
            raise ValueError(f"the sub-volume grid must be >= 1, got {grid}")
        return self._pooled(images, int(grid))

    def _pooled(self, images, grid: int | None) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, X, Y, Z), got {tuple(x.shape)}")
        if self.resize and tuple(x.shape[2:]) != self.resize:
            x = nn.functional.interpolate(x, size=self.resize, mode="trilinear", align_corners=False)
        pooled = []
        for i, block in enumerate(self.blocks[: self.layers[-1] + 1]):
            x = block(x)
            if i in self.layers:
                if grid is None:
                    pooled.append(x.mean(dim=tuple(range(2, x.ndim))))
                else:   # (B, C, g, g, g) -> (B * g^3, C)
                    p = nn.functional.adaptive_avg_pool3d(x, grid)
                    pooled.append(p.flatten(2).transpose(1, 2).reshape(-1, p.shape[1]))
        return torch.cat(pooled, dim=1).to("cpu", torch.float64)


def make_lpips(weights: str | None):
    """MONAI perceptual (LPIPS-style) network from user-given backbone weights, or ``None`` without them.

    Nothing is downloaded: ``weights`` must be a local ResNet-50 state dict (torchvision layout);
    the network is MONAI's ``PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True)``.
    """
    if weights in (None, "", "none"):
        return None
    from fcas.io import storage

    if not storage.exists(str(weights)):
        raise ValueError(f"LPIPS backbone weights {weights!r} do not exist")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ValueError("LPIPS with backbone weights needs torchvision (MONAI's resnet50 perceptual network); "
                         "install it or set lpips_weights=null") from None
    from monai.losses import PerceptualLoss

    return PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True, pretrained=True,
                          pretrained_path=str(weights)).eval()


@torch.no_grad()
def lpips(net, image, target) -> float:
    """Perceptual distance of two ``(X, Y, Z)`` volumes in [0, 1] with a network from :func:`make_lpips`."""
    a = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None, None]
    b = torch.as_tensor(np.asarray(target), dtype=torch.float32)[None, None]
    return float(net(a, b))
