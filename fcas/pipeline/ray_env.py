"""Start or join Ray: a cluster when an address is given (or ``RAY_ADDRESS`` is set), else local."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray Train's placement-group cleaner asks the State API about the controller once a second and,
# on a local Ray started without the dashboard (which serves that API), warns every time: a
# 30-minute training printed 1568 such lines. Those warnings say nothing about the run.
_QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_loggers() -> None:
    """Worker-process setup hook of a local Ray: silence Ray's own pointless warnings (above)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto`` for the cluster this process runs on) or start a local Ray.

    Does nothing when Ray is already initialised in this process (tests share one instance).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "fcas.pipeline.ray_env.quiet_ray_loggers"})
        log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def check_training_cpus(num_workers: int, cpus_per_worker: float, data_cpus: float,
                        address: str | None = None) -> None:
    """On a local Ray (no ``address``, no ``RAY_ADDRESS``; an autoscaling cluster may still grow): refuse a
    trainer whose workers hold every CPU, since its Ray Data loading tasks (``data_cpus`` each) could then
    never be scheduled and the training would wait forever for its first case."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    total = float(ray.cluster_resources().get("CPU", 0))
    held = num_workers * cpus_per_worker
    if held + data_cpus > total + 1e-9:
        raise ValueError(f"trainer.num_workers={num_workers} x trainer.cpus_per_worker={cpus_per_worker:g} hold "
                         f"{held:g} of this local Ray's {total:g} CPUs, leaving none for the data tasks "
                         f"({data_cpus:g} CPU each): use trainer.cpus_per_worker<={(total - data_cpus) / num_workers:g}")
