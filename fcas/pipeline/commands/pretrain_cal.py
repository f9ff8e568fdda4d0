"""``fcas pretrain_cal``: pretrain a segmentation net on a synthesis run (confidence-aware loss), then fine-tune."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.pretrain_cal import run as _run

    s = _run(cfg)
    print(f"pretrain_cal: step {s['step']}, last loss {s['last_loss']}, checkpoint {s['latest_checkpoint']}")
    return s


@hydra.main(config_path=str(config_dir()), config_name="pretrain_cal", version_base=None)
@user_errors("pretrain_cal")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-pretrain_cal`` console command (= ``fcas pretrain_cal``)."""
    run_job("pretrain_cal")
