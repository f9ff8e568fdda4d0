"""Encode every prepared case (or phantom) once with the frozen VAE, for ``jobs/train_tcdm.py train.latent_cache=<out>``.

    python jobs/cache_latents.py preset=demo model=demo data=phantom:8 vae=checkpoints/demo out=outputs/latents-demo
    python jobs/cache_latents.py data=s3://lab/fcas/cases vae=s3://lab/fcas/vae out=s3://lab/fcas/latents \
        resources.actors=[1,8] resources.gpus_per_actor=1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("cache_latents")
