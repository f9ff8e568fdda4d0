"""Pretrain a segmentation net on a synthesis run with the confidence-aware loss, then fine-tune (Ray Train).

    python jobs/pretrain_cal.py syn=outputs/syn-tiny real=phantom:6 out=outputs/cal-tiny preset=tiny
    python jobs/pretrain_cal.py syn=s3://lab/fcas/syn-001 real=s3://lab/fcas/asoca/cases.parquet \
        out=s3://lab/fcas/cal preset=paper 'train.crop=[128,128,128]' trainer.num_workers=8 trainer.use_gpu=true
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("pretrain_cal")
