"""``fcas train_vae``: train the VAE on prepared cases (or phantoms) with Ray Train; resumes from out=."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.train_vae import run as _run

    summary = _run(cfg)
    print(f"train_vae: latest checkpoint {summary['latest_checkpoint']}")
    return summary


@hydra.main(config_path=str(config_dir()), config_name="train_vae", version_base=None)
@user_errors("train_vae")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-train_vae`` console command (= ``fcas train_vae``)."""
    run_job("train_vae")
