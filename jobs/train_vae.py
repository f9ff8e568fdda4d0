"""Train the VAE on prepared cases (or phantoms) with Ray Train; resumes from the latest checkpoint in out=.

    python jobs/train_vae.py preset=demo model=demo data=phantom:24 out=outputs/vae-demo
    python jobs/train_vae.py data=s3://lab/fcas/cases out=s3://lab/fcas/vae trainer.num_workers=8 trainer.use_gpu=true
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("train_vae")
