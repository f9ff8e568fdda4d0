"""``fcas cache_latents``: encode every case once with the frozen VAE, for ``train_tcdm train.latent_cache=``."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.cache_latents import cache_job_from_cfg, run_cache_latents

    s = run_cache_latents(cache_job_from_cfg(cfg), progress=bool(cfg.get("progress", True)))
    print(f"cache_latents: {s['encoded']} cases encoded, {s['kept']} kept from an earlier run, {s['cases']} in "
          f"{s['shards']} shards in {s['seconds']} s -> {s['out']}")
    return s


@hydra.main(config_path=str(config_dir()), config_name="cache_latents", version_base=None)
@user_errors("cache_latents")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-cache_latents`` console command (= ``fcas cache_latents``)."""
    run_job("cache_latents")
