"""``fcas prepare``: validate, reorient, resample and crop cases onto the preset grid -> cases.parquet."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.jobs import prepare_job_from_cfg
    from fcas.pipeline.prepare import run_prepare

    summary = run_prepare(prepare_job_from_cfg(cfg), ray_address=cfg.ray.address)
    print(f"prepare: {summary['written']} cases written, {summary['rejected']} rejected "
          f"(splits {summary['splits']}) in {summary['seconds']} s -> {summary['out']}")
    return summary


@hydra.main(config_path=str(config_dir()), config_name="prepare", version_base=None)
@user_errors("prepare")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-prepare`` console command (= ``fcas prepare``)."""
    run_job("prepare")
