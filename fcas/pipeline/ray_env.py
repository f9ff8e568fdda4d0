"""Start or join Ray: a cluster when an address is given (or ``RAY_ADDRESS`` is set), else local."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


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
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
