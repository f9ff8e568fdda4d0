"""``fcas train_tcdm``: train the TCDM on prepared cases (or phantoms) with Ray Train; resumes from out=."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.train_tcdm import run as _run

    summary = _run(cfg)
    print(f"train_tcdm: latest checkpoint {summary['latest_checkpoint']}")
    return summary


@hydra.main(config_path=str(config_dir()), config_name="train_tcdm", version_base=None)
@user_errors("train_tcdm")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-train_tcdm`` console command (= ``fcas train_tcdm``)."""
    run_job("train_tcdm")
