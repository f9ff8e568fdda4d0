"""Ray wiring of CAL pretraining + fine-tuning: Ray Data streams the synthetic samples, Ray Train runs DDP.

The driver reads only the synthesis run's manifest (URIs, a few bytes per sample) and builds a Ray
Data pipeline ``manifest rows -> map_batches(load_synthetic_batch)`` that loads the NIfTI files in
small CPU tasks; it is handed to a ``TorchTrainer`` as ``datasets={"train": ds}`` and each worker
consumes its shard with ``get_dataset_shard("train").iter_torch_batches`` (epoch after epoch), so
the synthetic set is never held whole anywhere. The fine-tune set is small and loaded by each worker.
The loop is :func:`fcas.training.cal.train_cal_loop`; the Ray lines (``prepare_model``, context,
``report``) come from :func:`fcas.pipeline.train_tcdm.worker_hooks`.

CPU budget: each train worker asks for ``trainer.cpus_per_worker`` (default 0.5) and each loading
task for ``data.cpus`` (0.25), so on a 2-CPU machine two workers leave a CPU for the data tasks
(with whole CPUs per worker the stream would starve).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import ray
import ray.train
from omegaconf import DictConfig

from fcas.cal.data import load_synthetic_batch, synthetic_rows
from fcas.training.cal import CALSettings, train_cal_loop
from fcas.pipeline.ray_env import ensure_ray
from fcas.pipeline.jobs import plain_config
from fcas.pipeline.train_tcdm import fit, inject_failure, worker_hooks

log = logging.getLogger(__name__)

__all__ = ["cal_settings_from_cfg", "synthetic_dataset", "fit_cal", "run"]


def cal_settings_from_cfg(cfg: DictConfig | Mapping[str, Any]) -> CALSettings:
    """Hydra config (``configs/pretrain_cal.yaml``) -> frozen :class:`CALSettings`."""
    from fcas.pipeline.jobs import check_job_config

    check_job_config(cfg, "pretrain_cal")
    c = plain_config(cfg)
    preset = c["preset"]
    net = {k: v for k, v in (c.get("segnet") or {}).items() if k != "name"}
    net["name"] = (c.get("segnet") or {}).get("name", preset.get("name", "custom"))
    return CALSettings.from_dict({
        "syn": c.get("syn"), "real": c.get("real"), "real_split": c.get("real_split", "train"),
        "out": c["out"], "shape": preset["shape"], "spacing": preset["spacing"],
        "preset": preset.get("name", "custom"), "schema": c.get("schema", "cardiac"), "net": net,
        "augment": c.get("augment"), "train": c.get("train"),
    })


def synthetic_dataset(run: str, schema: str = "cardiac", cpus: float = 0.25, rows_per_block: int = 4,
                      seed: int | None = 0) -> "ray.data.Dataset":
    """Ray Data stream of a synthesis run: ``sample_id``, ``image``/``label``/``cm`` ``(1, D, H, W)`` per row.

    Only the manifest's URI columns reach the driver; each loading task reads ``rows_per_block``
    samples' NIfTI files. ``seed``: block order shuffled once (None: manifest order).
    """
    if cpus <= 0 or rows_per_block < 1:
        raise ValueError(f"need data cpus > 0 and rows_per_block >= 1, got {cpus}, {rows_per_block}")
    rows = synthetic_rows(run)
    n_blocks = max(1, -(-rows.num_rows // rows_per_block))
    # from the driver (no read tasks: each would need a whole CPU that the train workers may hold)
    ds = ray.data.from_items(rows.to_pylist(), override_num_blocks=n_blocks)
    if seed is not None:
        ds = ds.randomize_block_order(seed=seed)
    return ds.map_batches(load_synthetic_batch, fn_kwargs={"schema": schema}, batch_size=rows_per_block,
                          num_cpus=cpus)


def _shard_batches(batch_size: int):
    shard = ray.train.get_dataset_shard("train")

    def batches(start_step: int):
        epoch = 0
        while True:
            n = 0
            for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
                n += 1
                yield b
            if n == 0:
                raise ValueError(f"the synthetic data shard gave no batch of {batch_size} in epoch {epoch} "
                                 f"(too few samples for the workers and batch size)")
            epoch += 1

    return batches


def _cal_worker(config: dict) -> None:
    settings = CALSettings.from_dict(config["settings"])
    rank, world, device, wrap, report = worker_hooks(config.get("threads"))
    report = inject_failure(report, settings.out, config.get("fail_at_step"), rank)
    stream = _shard_batches(settings.train.batch_size) if config.get("stream") else None
    summary = train_cal_loop(settings, rank=rank, world_size=world, device=device, wrap_model=wrap, report=report,
                             synthetic_batches=stream, progress=config.get("progress", True))
    if summary["steps_run"] == 0:
        report({"step": summary["final_step"], "steps_run": 0})


def fit_cal(settings: CALSettings, *, num_workers: int = 2, use_gpu: bool = False, cpus_per_worker: float = 0.5,
            data_cpus: float = 0.25, rows_per_block: int = 4, address: str | None = None,
            storage_path: str | None = None, max_failures: int = 0, progress: bool = True,
            fail_at_step: int | None = None) -> ray.train.Result:
    """Run :func:`train_cal_loop` on a ``TorchTrainer`` (DDP; gloo on CPU, nccl on GPU) with the synthetic
    stream as ``datasets={"train": ...}`` (when there is pretraining left to do)."""
    if num_workers < 1 or cpus_per_worker <= 0:
        raise ValueError(f"need num_workers >= 1 and cpus_per_worker > 0, got {num_workers}, {cpus_per_worker}")
    from fcas.models.checkpoint import latest_checkpoint, load_checkpoint

    ensure_ray(address)
    latest = latest_checkpoint(settings.out)
    done = load_checkpoint(latest).step if latest else 0
    stream = settings.train.pretrain_steps > done
    datasets = {"train": synthetic_dataset(settings.syn, settings.schema, data_cpus, rows_per_block,
                                           seed=settings.train.seed)} if stream else None
    return fit(_cal_worker, {"settings": settings.to_dict(), "stream": stream, "progress": progress,
                             "fail_at_step": fail_at_step},
               name=f"cal-{settings.preset}", num_workers=num_workers, use_gpu=use_gpu, address=address,
               storage_path=storage_path, max_failures=max_failures, cpus_per_worker=cpus_per_worker,
               datasets=datasets, data_cpus=data_cpus)


def run(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Pretrain (CAL or plain) then fine-tune as configured; returns a summary with the latest checkpoint."""
    from fcas.training.cal import read_metrics
    from fcas.models.checkpoint import latest_checkpoint, load_checkpoint

    from dataclasses import replace

    from fcas.io.storage import absolute

    settings = cal_settings_from_cfg(cfg)
    # Ray Train workers run in their own directory: resolve relative paths here, on the driver
    settings = replace(settings, syn=absolute(settings.syn), real=absolute(settings.real),
                       out=absolute(settings.out), train=replace(settings.train, val=absolute(settings.train.val)))
    c = plain_config(cfg)
    tr, dc = c.get("trainer") or {}, c.get("data") or {}
    fit_cal(
        settings,
        num_workers=int(tr.get("num_workers", 2)),
        use_gpu=bool(tr.get("use_gpu", False)),
        cpus_per_worker=float(tr.get("cpus_per_worker", 0.5)),
        data_cpus=float(dc.get("cpus", 0.25)),
        rows_per_block=int(dc.get("rows_per_block", 4)),
        address=tr.get("address"),
        storage_path=tr.get("storage_path"),
        max_failures=int(tr.get("max_failures", 0)),
        progress=bool(tr.get("progress", True)),
        fail_at_step=tr.get("fail_at_step"),
    )
    latest = latest_checkpoint(settings.out)
    metrics = read_metrics(settings.out)
    summary = {"latest_checkpoint": latest,
               "step": load_checkpoint(latest).step if latest else 0, "out": settings.out,
               "last_loss": {s: next((r["loss"] for r in reversed(metrics) if r["stage"] == s), None)
                             for s in ("pretrain", "finetune")}}
    log.debug("pretrain_cal: %s", summary)   # the job prints its own one-line summary
    return summary
