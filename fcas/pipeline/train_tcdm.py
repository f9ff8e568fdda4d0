"""Ray Train wiring of TCDM (and VAE) training: ``TorchTrainer`` with DDP over CPU or GPU workers.
Ray Train and the training loop are imported where they run, so a job's input checks answer before they load.

The loop itself is :func:`fcas.training.tcdm.train_tcdm_loop` (plain PyTorch); this module adds
the Ray lines: ``prepare_model`` (DDP + device), ``get_context`` (rank, world size) and ``report``
(metrics at checkpoint steps and every ``REPORT_EVERY`` steps). Checkpoints are the loop's own folders on any fsspec URI (``out=``), so a
restarted run -- by Ray's ``FailureConfig`` or by the user rerunning the command -- resumes from the
latest complete one.

Data: the training cases are streamed, never held whole in one process. The driver reads only the
cases manifest (:func:`fcas.diffusion.data.case_rows`) and hands a Ray Data pipeline ``rows ->
map_batches(load_case_batch)`` (one case per block, block order reshuffled every epoch) to the
``TorchTrainer`` as ``datasets={"train": ...}``; each worker reads its shard with
``get_dataset_shard("train")`` into a buffer of ``train.buffer_cases`` cases (capped at the cases of
one shard), the pattern of :mod:`fcas.pipeline.pretrain_cal`. Pairs and resume: :mod:`fcas.diffusion.data`
and :mod:`fcas.training.tcdm`. CPU budget: workers ask for ``trainer.cpus_per_worker`` (0.5) and
each loading task for ``trainer.data_cpus`` (0.25), so a 2-CPU machine keeps a CPU for the stream.

With ``train.latent_cache=<uri>`` the driver first checks the cache against the run's VAE digest, the
training cases and the grid (:func:`fcas.diffusion.latent_cache.check_latent_cache`; a stale cache is one
line, exit 2, before Ray starts), then streams the cache's shards instead (:func:`cached_cases_dataset`:
the same rows -> one case per block -> reshuffled, each case now with its ``latent`` column).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Mapping

import ray
from omegaconf import DictConfig

from fcas.diffusion.data import case_rows, load_case_batch
from fcas.diffusion.latent_cache import check_latent_cache, load_cached_batch
from fcas.training.tcdm_settings import TCDMSettings
from fcas.pipeline.jobs import plain_config
from fcas.pipeline.ray_env import check_training_cpus, ensure_ray

if TYPE_CHECKING:   # annotations only
    import torch

log = logging.getLogger(__name__)

__all__ = ["tcdm_settings_from_cfg", "run", "fit", "worker_hooks", "cases_dataset", "cached_cases_dataset",
           "shard_cases", "buffer_size", "stream_plan", "REPORT_EVERY"]

REPORT_EVERY = 20  # steps between metric reports to Ray Train (checkpoint steps always report)


def tcdm_settings_from_cfg(cfg: DictConfig | Mapping[str, Any]) -> TCDMSettings:
    """Hydra config (``configs/train_tcdm.yaml``) -> frozen :class:`TCDMSettings`."""
    from fcas.pipeline.jobs import check_job_config

    check_job_config(cfg, "train_tcdm")
    c = plain_config(cfg)
    preset = c["preset"]
    train = dict(c.get("train") or {})
    if train.get("crop") is None and preset.get("train_crop") is not None:
        train["crop"] = preset["train_crop"]
    return TCDMSettings.from_dict(
        {
            "data": c["data"],
            "out": c["out"],
            "shape": preset["shape"],
            "spacing": preset["spacing"],
            "preset": preset.get("name", "custom"),
            "vae": c.get("vae"),
            "init": c.get("init"),
            "model": c["model"],
            "condition": c.get("condition"),
            "scheduler": c.get("scheduler"),
            "train": train,
        }
    )


def worker_hooks(threads: int | None = None) -> tuple[int, int, torch.device, Callable, Callable]:
    """Inside a Ray Train worker: ``(rank, world_size, device, wrap_model, report)``. On CPU, torch runs
    ``threads`` threads (:func:`fit` passes ``ceil(cpus_per_worker)``: Ray's OMP_NUM_THREADS is the floor, so
    a worker of 1.75 CPUs, which leaves a quarter for the data tasks, would otherwise run one)."""
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(threads or os.environ.get("OMP_NUM_THREADS", "1"))))

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if ctx.get_world_size() == 1:
            return module.to(device)
        return ray.train.torch.prepare_model(module, move_to_device=device)

    def report(metrics: dict, checkpoint_uri: str | None = None, checkpoint_step: bool = False) -> None:
        # ray.train.report is a collective (every rank must call it at the same steps) and costs about
        # 1.6 s on a 2-CPU node (measured: 2.0 s a step against 0.4 s of VAE compute), so it is sent
        # at checkpoint steps and every REPORT_EVERY steps only; the loops' progress bars, histories
        # and metrics files still see every step.
        step = int(metrics.get("step", 0))
        if not (checkpoint_step or checkpoint_uri or step % REPORT_EVERY == 0 or "steps_run" in metrics):
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if checkpoint_uri:
            clean["checkpoint_uri"] = checkpoint_uri
        ray.train.report(clean)

    return ctx.get_world_rank(), ctx.get_world_size(), device, wrap, report


def cases_dataset(rows: list[dict], shape, spacing, cpus: float = 0.25, seed: int = 0) -> "ray.data.Dataset":
    """Ray Data stream of the training cases ``rows`` (:func:`fcas.diffusion.data.case_rows`): ``case_id``,
    ``image (1, D, H, W)``, ``label (D, H, W)`` per row.

    Only the manifest rows reach the driver; each loading task reads one case (one block). The block
    order is reshuffled every epoch, reproducibly from ``seed``.
    """
    import ray.data

    if cpus <= 0:
        raise ValueError(f"need trainer.data_cpus > 0, got {cpus}")
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=int(seed), reseed_after_execution=True))
    return ds.map_batches(load_case_batch, fn_kwargs={"shape": list(shape), "spacing": list(spacing)},
                          batch_size=1, num_cpus=cpus)


def cached_cases_dataset(rows: list[dict], cpus: float = 0.25, seed: int = 0) -> "ray.data.Dataset":
    """Ray Data stream of cached training cases ``rows`` (:func:`fcas.diffusion.latent_cache.check_latent_cache`,
    shard URIs absolute): ``case_id``, ``image (1, D, H, W)``, ``label (D, H, W)``, ``latent (C, d, h, w)`` per
    row, one case per block, the block order reshuffled every epoch (as :func:`cases_dataset`)."""
    import ray.data

    if cpus <= 0:
        raise ValueError(f"need trainer.data_cpus > 0, got {cpus}")
    items = [{"case_id": r["case_id"], "uri": r["uri"]} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=int(seed), reseed_after_execution=True))
    return ds.map_batches(load_cached_batch, batch_size=1, num_cpus=cpus)


def shard_cases():
    """Inside a worker: an endless iterator of single cases from its ``train`` shard (epoch after epoch)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_batches(batch_size=1, batch_format="numpy"):
            n += 1
            case = {"case_id": str(b["case_id"][0]), "image": b["image"][0], "label": b["label"][0]}
            if "site" in b:   # the pairs of a step are drawn within a site (fcas.diffusion.pairs)
                case["site"] = str(b["site"][0])
            if "latent" in b:   # a latent cache (train.latent_cache)
                case["latent"] = b["latent"][0]
            yield case
        if n == 0:
            raise ValueError(f"the training data shard gave no case in epoch {epoch} (fewer cases than workers?)")
        epoch += 1


def buffer_size(requested: int, n_cases: int, num_workers: int, minimum: int) -> int:
    """Slots of each worker's case buffer: ``requested``, at most the cases of one shard, at least ``minimum``."""
    return max(minimum, min(int(requested), n_cases // max(1, num_workers)))


def stream_plan(train, n_cases: int, num_workers: int, minimum: int):
    """``train`` settings with the buffer sized by :func:`buffer_size`, and refills turned off
    (``refill_every=0``) when a single worker's buffer holds every case: each refill pulls a case through
    Ray Data, which costs more than a training step on a small machine, and would bring nothing new."""
    from dataclasses import replace

    k = buffer_size(train.buffer_cases, n_cases, num_workers, minimum)
    refill = 0 if num_workers == 1 and k >= n_cases else train.refill_every
    if refill != train.refill_every:
        log.info("the case buffer holds all %d training cases: no refills from the stream", n_cases)
    return replace(train, buffer_cases=k, refill_every=refill)


def inject_failure(report: Callable, out: str, fail_at_step: int | None, rank: int) -> Callable:
    """Fault injection for restart tests (``trainer.fail_at_step``): every rank raises once, after
    reporting that step; a marker in ``out`` keeps the restarted attempt from failing again."""
    if not fail_at_step:
        return report
    from fcas.io import storage

    marker = storage.join(out, "_injected_failure")
    armed = not storage.exists(marker)  # decided before training, identically on every rank

    def wrapped(metrics: dict, checkpoint_uri: str | None = None, checkpoint_step: bool = False) -> None:
        report(metrics, checkpoint_uri, checkpoint_step)
        if armed and metrics.get("step") == fail_at_step:
            if rank == 0:
                storage.atomic_write_bytes(marker, str(fail_at_step).encode())
            raise RuntimeError(f"injected failure at step {fail_at_step} (trainer.fail_at_step)")

    return wrapped


def _tcdm_worker(config: dict) -> None:
    from fcas.training.tcdm import train_tcdm_loop

    settings = TCDMSettings.from_dict(config["settings"])
    rank, world, device, wrap, report = worker_hooks(config.get("threads"))
    report = inject_failure(report, settings.out, config.get("fail_at_step"), rank)
    summary = train_tcdm_loop(settings, rank=rank, world_size=world, device=device, wrap_model=wrap,
                              report=report, progress=config.get("progress", True), case_stream=shard_cases)
    if summary["steps_run"] == 0:  # nothing left to train: still tell Ray where things stand
        report({"step": summary["final_step"], "steps_run": 0})


def fit(
    worker: Callable[[dict], None],
    loop_config: dict,
    *,
    name: str,
    num_workers: int = 2,
    use_gpu: bool = False,
    address: str | None = None,
    storage_path: str | None = None,
    max_failures: int = 0,
    cpus_per_worker: float = 0.5,
    datasets: dict | None = None,
    data_cpus: float = 0.25,
) -> ray.train.Result:
    """Run ``worker`` on a Ray Train ``TorchTrainer`` (DDP, gloo on CPU / nccl on GPU), ``datasets`` sharded."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    import ray.train.torch

    ensure_ray(address)
    if datasets:
        check_training_cpus(num_workers, cpus_per_worker, data_cpus, address)
    storage_path = storage_path or os.path.join(tempfile.gettempdir(), "fcas_ray_train")
    trainer = ray.train.torch.TorchTrainer(
        worker,
        train_loop_config={**loop_config, "threads": math.ceil(cpus_per_worker)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def run(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Train (or resume) TCDM as configured; returns a summary with the latest checkpoint URI."""
    from fcas.models.bundle import vae_digest
    from fcas.models.checkpoint import latest_checkpoint, load_checkpoint

    from dataclasses import replace

    from fcas.io.storage import absolute
    from fcas.models.maisi import absolute_init

    settings = tcdm_settings_from_cfg(cfg)
    # Ray Train workers run in their own directory: resolve relative paths here, on the driver
    tc = replace(settings.train, latent_cache=absolute(settings.train.latent_cache))
    settings = replace(settings, data=absolute(settings.data), out=absolute(settings.out),
                       vae=absolute(settings.vae), init=absolute_init(settings.init), train=tc)
    c = plain_config(cfg)
    tr = c.get("trainer") or {}
    workers = int(tr.get("num_workers", 2))
    rows = case_rows(settings.data, "train")
    cached = None
    if tc.latent_cache:   # a stale cache is refused here, before Ray and any training work
        cached = check_latent_cache(tc.latent_cache, vae_digest(settings.vae, tc.seed), [r["case_id"] for r in rows],
                                    settings.shape if tc.crop is None else None, settings.spacing)
    ensure_ray(tr.get("address"))
    data_cpus = float(tr.get("data_cpus", 0.25))
    if cached:
        ds = cached_cases_dataset(cached, data_cpus, tc.seed)
    else:
        ds = cases_dataset(rows, settings.shape, settings.spacing, data_cpus, tc.seed)
    settings = replace(settings, train=stream_plan(settings.train, len(rows), workers, 2))
    result = fit(
        _tcdm_worker,
        {"settings": settings.to_dict(), "progress": bool(tr.get("progress", True)),
         "fail_at_step": tr.get("fail_at_step")},
        name=f"tcdm-{settings.preset}",
        num_workers=workers,
        use_gpu=bool(tr.get("use_gpu", False)),
        address=tr.get("address"),
        storage_path=tr.get("storage_path"),
        max_failures=int(tr.get("max_failures", 0)),
        cpus_per_worker=float(tr.get("cpus_per_worker", 0.5)),
        datasets={"train": ds},
        data_cpus=data_cpus,
    )
    latest = latest_checkpoint(settings.out)
    summary = {"metrics": dict(result.metrics or {}), "latest_checkpoint": latest,
               "step": load_checkpoint(latest).step if latest else 0, "out": settings.out}
    log.debug("train_tcdm: %s", summary)   # the job prints its own one-line summary
    return summary
