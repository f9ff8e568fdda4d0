"""Evaluate segmentations (Dice / RDice) or a synthesis run (SSIM / RMSE / FID / confidence vs error).

    python jobs/evaluate.py mode=segmentation data=outputs/prepare/cases.parquet splits=[test] \
        pred=outputs/predictions out=outputs/eval-seg
    python jobs/evaluate.py mode=synthesis run=outputs/syn-001 out=outputs/eval-syn
    python jobs/evaluate.py mode=synthesis run=s3://lab/fcas/syn-001 target=reference \
        learning_curve=checkpoints/demo/history.pt out=s3://lab/fcas/eval-001
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.evaluation import run_evaluation, settings_from_dict  # noqa: E402


def run(cfg: DictConfig) -> dict:
    s = settings_from_dict(OmegaConf.to_container(cfg, resolve=True))
    m = run_evaluation(s)
    if m["mode"] == "segmentation":
        print(f"evaluate: {m['n_cases']} cases, mean Dice {m['mean_dice']}, mean RDice {m['mean_rdice']} "
              f"-> {s.out}/report.md")
    else:
        print(f"evaluate: {m['n_samples']} samples, SSIM {m['ssim_mean']}, RMSE {m['rmse_mean']}, "
              f"FID {m['fid']['value']} -> {s.out}/report.md")
    return m


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
@user_errors("evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
