"""Synthesize cardiac CTA volumes + label maps + confidence maps with Ray Data (the main job).

    python jobs/synthesize.py                                  # 8 demo samples -> outputs/<timestamp>/
    python jobs/synthesize.py preset=tiny n=12 out=/tmp/run
    ray job submit --working-dir . -- python jobs/synthesize.py n=100000 out=s3://bucket/run \
        resources.sampler_gpus=1 'resources.sampler_actors=[1,64]'
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("synthesize")
