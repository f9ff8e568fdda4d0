"""Hydra config -> frozen job dataclasses, resolved once on the driver."""
from __future__ import annotations

from omegaconf import DictConfig

from fcas.pipeline.prepare import PrepareJob
from fcas.prepare import PrepareSettings


def prepare_job_from_cfg(cfg: DictConfig) -> PrepareJob:
    settings = PrepareSettings(
        shape=tuple(int(v) for v in cfg.preset.shape),
        spacing=tuple(float(v) for v in cfg.preset.spacing),
        max_voxels=int(cfg.limits.max_voxels),
        hu_min=float(cfg.limits.hu_min),
        hu_max=float(cfg.limits.hu_max),
        min_hu_spread=float(cfg.limits.min_hu_spread),
        label_mapping=cfg.label_mapping,
    )
    return PrepareJob(
        source=str(cfg.source),
        out=str(cfg.out),
        settings=settings,
        images=str(cfg.images),
        labels=str(cfg.labels),
        schema=str(cfg.schema),
        splits=tuple((str(k), float(v)) for k, v in cfg.splits.items()),
        seed=int(cfg.seed),
        preview=int(cfg.get("preview", 0)),
    )
