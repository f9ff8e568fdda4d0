"""``fcas evaluate``: evaluate segmentations (Dice / RDice) or a synthesis run (SSIM / RMSE / FID / confidence)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.evaluation import run_evaluation, settings_from_dict

    s = settings_from_dict(OmegaConf.to_container(cfg, resolve=True))
    m = run_evaluation(s)
    if m["mode"] == "segmentation":
        print(f"evaluate: {m['n_cases']} cases, mean Dice {m['mean_dice']}, mean RDice {m['mean_rdice']} "
              f"-> {s.out}/report.md")
    else:
        print(f"evaluate: {m['n_samples']} samples, SSIM {m['ssim_mean']}, RMSE {m['rmse_mean']}, "
              f"FID {m['fid']['value']} -> {s.out}/report.md")
    return m


@hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base=None)
@user_errors("evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-evaluate`` console command (= ``fcas evaluate``)."""
    run_job("evaluate")
