"""``fcas synthesize``: synthesize cardiac CTA volumes + label maps + confidence maps with Ray Data (the main job)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.jobs import synthesis_job_from_cfg
    from fcas.pipeline.synthesize import run_synthesis

    job = synthesis_job_from_cfg(cfg)
    s = run_synthesis(job, ray_address=cfg.ray.address, progress=bool(cfg.progress))
    print(f"synthesize: {s['n_written']}/{s['n_requested']} samples in the manifest "
          f"({s['n_written_this_run']} new, {s['n_rejected']} rejected) in {s['seconds']} s "
          f"[{s['samples_per_s']} samples/s] -> {s['out']}")
    return s


@hydra.main(config_path=str(config_dir()), config_name="synthesize", version_base=None)
@user_errors("synthesize")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-synthesize`` console command (= ``fcas synthesize``)."""
    run_job("synthesize")
