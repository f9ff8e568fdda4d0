"""Synthesize cardiac CTA volumes + label maps + confidence maps with Ray Data (the main job).

    python jobs/synthesize.py                                  # 8 demo samples -> outputs/<timestamp>/
    python jobs/synthesize.py preset=tiny n=12 out=/tmp/run
    ray job submit --working-dir . -- python jobs/synthesize.py n=100000 out=s3://bucket/run \
        resources.sampler_gpus=1 'resources.sampler_actors=[1,64]'
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.jobs import synthesis_job_from_cfg  # noqa: E402
from fcas.pipeline.synthesize import run_synthesis  # noqa: E402


def run(cfg: DictConfig) -> dict:
    job = synthesis_job_from_cfg(cfg)
    s = run_synthesis(job, ray_address=cfg.ray.address, progress=bool(cfg.progress))
    print(f"synthesize: {s['n_written']}/{s['n_requested']} samples in the manifest "
          f"({s['n_written_this_run']} new, {s['n_rejected']} rejected) in {s['seconds']} s "
          f"[{s['samples_per_s']} samples/s] -> {s['out']}")
    return s


@hydra.main(config_path="../configs", config_name="synthesize", version_base=None)
@user_errors("synthesize")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
