"""Pretrain a segmentation net on a synthesis run with the confidence-aware loss, then fine-tune (Ray Train).

    python jobs/pretrain_cal.py syn=outputs/syn-tiny real=phantom:6 out=outputs/cal-tiny preset=tiny
    python jobs/pretrain_cal.py syn=s3://lab/fcas/syn-001 real=s3://lab/fcas/asoca/cases.parquet \
        out=s3://lab/fcas/cal preset=paper 'train.crop=[128,128,128]' trainer.num_workers=8 trainer.use_gpu=true
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.pretrain_cal import run as _run  # noqa: E402


def run(cfg: DictConfig) -> dict:
    s = _run(cfg)
    print(f"pretrain_cal: step {s['step']}, last loss {s['last_loss']}, checkpoint {s['latest_checkpoint']}")
    return s


@hydra.main(config_path="../configs", config_name="pretrain_cal", version_base=None)
@user_errors("pretrain_cal")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
