"""Evaluate segmentations (Dice / RDice) or a synthesis run (SSIM / RMSE / FID / confidence vs error).

    python jobs/evaluate.py mode=segmentation data=outputs/prepare/cases.parquet splits=[test] \
        pred=outputs/predictions out=outputs/eval-seg
    python jobs/evaluate.py mode=synthesis run=outputs/syn-001 out=outputs/eval-syn
    python jobs/evaluate.py mode=synthesis run=s3://lab/fcas/syn-001 target=reference \
        learning_curve=checkpoints/demo/history.pt out=s3://lab/fcas/eval-001
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("evaluate")
