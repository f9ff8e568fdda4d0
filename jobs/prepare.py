"""Validate, reorient, resample and crop cases onto the preset grid; write cases.parquet + rejects.parquet.

    python jobs/prepare.py source=phantom:50 out=outputs/cases preset=demo
    python jobs/prepare.py source=dir:/data/mmwhs out=s3://lab/fcas/cases label_mapping=mmwhs \
        images='*_image.nii.gz' labels='*_label.nii.gz'
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.jobs import prepare_job_from_cfg  # noqa: E402
from fcas.pipeline.prepare import run_prepare  # noqa: E402


def run(cfg: DictConfig) -> dict:
    summary = run_prepare(prepare_job_from_cfg(cfg), ray_address=cfg.ray.address)
    print(f"prepare: {summary['written']} cases written, {summary['rejected']} rejected "
          f"(splits {summary['splits']}) in {summary['seconds']} s -> {summary['out']}")
    return summary


@hydra.main(config_path="../configs", config_name="prepare", version_base=None)
@user_errors("prepare")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
