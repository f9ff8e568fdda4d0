"""``fcas export_nnunet``: export a synthesis run and/or prepared cases as an nnU-Net v2 raw dataset."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.export.nnunet import export_nnunet, settings_from_dict

    s = export_nnunet(settings_from_dict(OmegaConf.to_container(cfg, resolve=True)))
    print(f"export_nnunet: {s['numTraining']} training + {s['numTest']} test cases, {s['rejected']} rejected, "
          f"{s['skipped']} kept from an earlier run, {s['folds']} folds in {s['seconds']} s -> {s['dataset']}")
    return s


@hydra.main(config_path=str(config_dir()), config_name="export_nnunet", version_base=None)
@user_errors("export_nnunet")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-export_nnunet`` console command (= ``fcas export_nnunet``)."""
    run_job("export_nnunet")
