"""Scale presets (tiny / demo / paper): grid shape and spacing shared by every job.

Loaded from ``configs/preset/<name>.yaml``; the Hydra jobs compose the same files.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fcas.config_files import read_config


@dataclass(frozen=True)
class Preset:
    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    latent_shape: tuple[int, int, int]
    decode_window: tuple[int, int, int] | None = None   # latent window of the VAE decode; None = whole
    train_crop: tuple[int, int, int] | None = None      # TCDM training crop (image voxels); None = whole

    @property
    def n_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


@lru_cache(maxsize=8)
def load_preset(name: str) -> Preset:
    d = read_config("preset", name, "preset")
    return Preset(
        name=d["name"],
        shape=tuple(int(v) for v in d["shape"]),
        spacing=tuple(float(v) for v in d["spacing"]),
        latent_shape=tuple(int(v) for v in d["latent_shape"]),
        decode_window=None if d.get("decode_window") is None else tuple(int(v) for v in d["decode_window"]),
        train_crop=None if d.get("train_crop") is None else tuple(int(v) for v in d["train_crop"]),
    )
