"""Train the TCDM on prepared cases (or phantoms) with Ray Train; resumes from the latest checkpoint in out=.

    python jobs/train_tcdm.py preset=demo model=demo data=phantom:24 out=outputs/tcdm-demo
    python jobs/train_tcdm.py data=s3://lab/fcas/cases out=s3://lab/fcas/tcdm trainer.num_workers=8 trainer.use_gpu=true
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.train_tcdm import run as _run  # noqa: E402


def run(cfg: DictConfig) -> dict:
    summary = _run(cfg)
    print(f"train_tcdm: latest checkpoint {summary['latest_checkpoint']}")
    return summary


@hydra.main(config_path="../configs", config_name="train_tcdm", version_base=None)
@user_errors("train_tcdm")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
