"""CAL pretraining + fine-tuning loop (plain PyTorch; Ray Train wiring in :mod:`fcas.pipeline.pretrain_cal`).

Two stages on one step counter, ``1 .. pretrain_steps + finetune_steps``:

* ``pretrain``: batches of synthetic ``(image, mask, CM)`` samples (a stream handed in by the caller,
  e.g. a Ray Data shard, or :func:`fcas.cal.data.local_synthetic_batches`), loss ``cal`` (Eq. 9,
  CM-weighted) or ``plain`` (Eq. 8) by config;
* ``finetune``: batches drawn from the small labelled set (real cases or prepared phantoms) with
  the plain loss and a fresh AdamW at ``finetune_lr``.

Augmentation (MONAI dict transforms) is seeded by ``(seed, step, rank, j)``. Rank 0 writes a
checkpoint folder (:func:`fcas.models.checkpoint.save_checkpoint`: ``net.pt``, ``optimizer.pt``,
``config.json``, ``checkpoint.json`` last) every ``checkpoint_every`` steps and at the end of each
stage, after rewriting ``out/metrics.jsonl`` (one line per step: step, stage, loss, ce, dice). A
restart resumes from the latest complete checkpoint with its step, weights and optimizer state; the
metrics log is cut back to that step. With the Ray-free synthetic reader and the fine-tune stage every
draw is keyed by the step, so a resumed run follows the uninterrupted trajectory; a Ray Data stream
restarts at the beginning of an epoch instead (same step and optimizer state, other samples).
Hand-written training glue.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from fcas.cal.data import (AugmentConfig, FinetuneSet, augment_batch, build_augment, load_finetune_set,
                           local_synthetic_batches, num_classes, synthetic_rows)
from fcas.cal.loss import cal_loss
from fcas.cal.net import SegNetConfig, build_segnet
from fcas.io import storage
from fcas.training.loop import TrainingRun, amp_context, check_amp_dtype, grad_scaler
from fcas.models.checkpoint import config_hash, latest_checkpoint, load_into, no_report
from fcas.settings import build

log = logging.getLogger(__name__)

__all__ = ["CALTrainConfig", "CALSettings", "train_cal_loop", "validation_dice", "ARCH_KEYS", "METRICS_FILE",
           "VAL_FILE", "BEST", "read_metrics"]

ARCH_KEYS = ("net", "schema")
METRICS_FILE = "metrics.jsonl"
VAL_FILE = "val.jsonl"
BEST = "best"
STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class CALTrainConfig:
    pretrain_steps: int = 20
    finetune_steps: int = 10
    batch_size: int = 2            # per worker and step
    lr: float = 1e-3               # pretraining (AdamW)
    finetune_lr: float = 5e-4      # fine-tuning: a fresh AdamW at this rate
    weight_decay: float = 1e-5
    loss: str = "cal"              # pretraining loss: 'cal' (Eq. 9) | 'plain' (Eq. 8)
    lambda_ce: float = 1.0
    lambda_dice: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 3      # 0 keeps all
    grad_clip: float = 12.0        # nnU-Net's clip; 0 = off
    crop: tuple[int, int, int] | None = None   # random training window in voxels (None: whole volumes)
    amp: bool = True               # autocast in amp_dtype: float16 on CUDA only; bfloat16 on CUDA and CPU
    amp_dtype: str = "float16"     # bfloat16 on CPU: a DynUNet step 0.45x its fp32 time (configs/reproduce.yaml)
    val: str | None = None         # labelled validation cases (phantom:N@OFFSET | cases.parquet 'val' rows)
    val_every: int = 0             # fine-tuning steps between validations (0: no validation)
    patience: int = 0              # stop fine-tuning after this many validations without a better
                                   # mean Dice (0: run every step); the best one is kept in out/best

    def __post_init__(self) -> None:
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        check_amp_dtype(self.amp_dtype)
        if self.loss not in ("cal", "plain"):
            raise ValueError(f"unknown loss {self.loss!r}; use 'cal' or 'plain'")
        if self.val_every < 0 or self.patience < 0:
            raise ValueError(f"val_every and patience must be >= 0, got {self.val_every}, {self.patience}")
        if self.val_every and not self.val:
            raise ValueError("val_every > 0 needs val=<phantom:N@OFFSET | cases.parquet>")
        if self.pretrain_steps < 0 or self.finetune_steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(
                f"need pretrain_steps, finetune_steps >= 0, batch_size, checkpoint_every >= 1; got "
                f"{self.pretrain_steps}, {self.finetune_steps}, {self.batch_size}, {self.checkpoint_every}")

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.finetune_steps

@dataclass(frozen=True)
class CALSettings:
    """Resolved configuration of one CAL run (built once on the driver)."""

    syn: str | None                 # synthesis run folder (its manifest); None: no pretraining
    real: str | None                # fine-tune set: prepared cases.parquet or phantom:N[@OFFSET]; None: none
    out: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    preset: str = "tiny"
    real_split: str | None = "train"
    schema: str = "cardiac"
    net: SegNetConfig = field(default_factory=SegNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: CALTrainConfig = field(default_factory=CALTrainConfig)

    def __post_init__(self) -> None:
        if self.train.pretrain_steps > 0 and not self.syn:
            raise ValueError(f"pretrain_steps={self.train.pretrain_steps} needs syn=<synthesis run>")
        if self.train.finetune_steps > 0 and not self.real:
            raise ValueError(f"finetune_steps={self.train.finetune_steps} needs real=<cases.parquet | phantom:N>")
        if any(s % self.net.divisor for s in self.window):
            raise ValueError(f"training window {self.window} must be a multiple of {self.net.divisor} (the net's strides)")
        want = num_classes(self.schema)
        if self.net.out_channels != want:
            raise ValueError(f"net.out_channels={self.net.out_channels}, schema {self.schema!r} needs {want}")

    @classmethod
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: no preset is ``custom``, an empty or missing ``syn`` / ``real``
        is None, and the net's classes default to the schema's."""
        net = dict(d.get("net") or {})
        net.setdefault("out_channels", num_classes(d.get("schema", "cardiac")))
        return {"preset": "custom", **d, "syn": d.get("syn") or None, "real": d.get("real") or None, "net": net}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CALSettings":
        return build(cls, d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = self.net.to_dict()
        d["shape"], d["spacing"] = list(self.shape), list(self.spacing)
        return d

    def arch(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in ARCH_KEYS}

    @property
    def window(self) -> tuple[int, int, int]:
        """The net's input size in training (the crop, else the whole grid); also the inference window."""
        return tuple(self.train.crop) if self.train.crop is not None else tuple(self.shape)

    def stage_of(self, step: int) -> str:
        """Stage of step ``step`` (1-based)."""
        return "pretrain" if step <= self.train.pretrain_steps else "finetune"


def _read_jsonl(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def read_metrics(out: str, name: str = METRICS_FILE) -> list[dict]:
    """Rows of ``out/metrics.jsonl`` (or ``out/val.jsonl`` with ``name=VAL_FILE``); empty if absent."""
    return _read_jsonl(storage.join(out, name))


@torch.no_grad()
def validation_dice(net: torch.nn.Module, val: FinetuneSet, window, device, n_classes: int) -> dict[str, Any]:
    """Mean Dice over the cardiac classes (and per class) of ``net`` on ``val`` (sliding window, MONAI
    ``compute_dice``; a class absent from both prediction and label is skipped)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from fcas.cal.predict import predict_classes

    was_training = net.training
    net.eval()
    per = []
    for i in range(len(val)):
        pred = predict_classes(net, val.image[i:i + 1].to(device), window).cpu()
        d = compute_dice(one_hot(pred, n_classes), one_hot(val.label[i:i + 1].long(), n_classes), include_background=False,
                         ignore_empty=True)
        per.append(d[0])
    net.train(was_training)
    per_class = torch.nanmean(torch.stack(per), dim=0)
    return {"val_dice": float(torch.nanmean(per_class)), "val_dice_per_class": [float(v) for v in per_class]}


def crop_batch(batch: Mapping[str, Any], crop, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One random window of size ``crop`` per sample of ``{"image", "label", "cm"}`` ``(B, 1, D, H, W)``."""
    from fcas.diffusion.data import crop_slices

    out: dict[str, list] = {"image": [], "label": [], "cm": []}
    shape = tuple(batch["image"].shape[2:])
    for j in range(batch["image"].shape[0]):
        sl = (slice(None), *crop_slices(shape, crop, rng))
        for k in out:
            out[k].append(torch.as_tensor(batch[k][j])[sl])
    return {k: torch.stack(v) for k, v in out.items()}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def train_cal_loop(
    settings: CALSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    report: Callable[..., None] = no_report,
    synthetic_batches: Callable[[int], Iterator[Mapping[str, Any]]] | None = None,
    finetune: FinetuneSet | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) pretraining then fine-tuning up to ``pretrain_steps + finetune_steps``.

    Args:
        synthetic_batches: ``start_step -> iterator`` of batches ``{"image" (B, 1, D, H, W) float in
            [0, 1], "label" (B, 1, D, H, W) int net classes, "cm" (B, 1, D, H, W) in [0, 1]}`` (numpy
            or torch); called once, when pretraining starts. Default: the Ray-free reader of
            ``settings.syn``'s manifest.
        finetune: the labelled set; default: loaded from ``settings.real`` when fine-tuning starts.
        report: ``report(metrics, checkpoint_uri=None, checkpoint_step=False)``, called every step on every rank.

    Returns:
        summary dict: ``start_step``, ``final_step``, ``steps_run``, ``last_loss``, ``seconds``,
        ``latest_checkpoint`` (rank 0).
    """
    tc = settings.train
    device = torch.device(device)
    total = tc.total_steps

    torch.manual_seed(tc.seed)
    net = build_segnet(settings.net).to(device)

    run = TrainingRun("pretrain_cal", settings.out, total, arch=settings.arch(),
                      arch_of=lambda c: {k: c.get(k) for k in ARCH_KEYS}, what="net/schema", rank=rank,
                      world_size=world_size, report=report, keep=tc.keep_checkpoints, every=tc.checkpoint_every,
                      progress=progress)
    opt_state = stage_at_ckpt = None
    ck = run.resume()
    if ck is not None:
        load_into(net, ck.state_dict("net"), storage.join(ck.uri, "net.pt"))
        opt_state, stage_at_ckpt = ck.state_dict("optimizer"), ck.config.get("stage")
        if rank == 0:
            log.info("pretrain_cal: resuming from %s at step %d (%s)", ck.uri, ck.step, stage_at_ckpt)
    start_step = run.start

    history = [r for r in read_metrics(settings.out) if int(r["step"]) <= start_step] if rank == 0 else []
    scaler = grad_scaler(device, tc.amp, tc.amp_dtype)
    autocast = lambda: amp_context(device, tc.amp, tc.amp_dtype)  # noqa: E731  (CUDA: float16/bfloat16; CPU: bfloat16 only)
    transform = build_augment(settings.augment) if settings.augment.enabled else None
    state: dict[str, Any] = {"stage": None, "module": None, "opt": None, "batches": None, "finetune": finetune}

    def enter_stage(stage: str, opt_sd=None) -> None:
        lr = tc.lr if stage == "pretrain" else tc.finetune_lr
        module = state["module"] if state["module"] is not None else wrap_model(net)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=tc.weight_decay)
        if opt_sd is not None:
            opt.load_state_dict(opt_sd)
        state.update(stage=stage, module=module, opt=opt)

    def checkpoint() -> tuple[dict, dict]:
        """(config, state dicts) of the current step; the per-step metrics file is written first."""
        if history:
            blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode()
            storage.atomic_write_bytes(storage.join(settings.out, METRICS_FILE), blob)
        config = {**settings.to_dict(), "stage": state["stage"], "window": list(settings.window),
                  "config_hash": config_hash(settings.to_dict())}
        return config, {"net": _unwrap(state["module"]).state_dict(), "optimizer": state["opt"].state_dict()}

    def next_batch(step: int, stage: str) -> Mapping[str, Any]:
        if stage == "pretrain":
            if state["batches"] is None:
                make = synthetic_batches or (lambda s: local_synthetic_batches(
                    synthetic_rows(settings.syn), tc.batch_size, tc.seed, s, rank, world_size, settings.schema))
                state["batches"] = iter(make(step - 1))
            return next(state["batches"])
        if state["finetune"] is None:
            state["finetune"] = load_finetune_set(settings.real, settings.shape, settings.spacing,
                                                  settings.real_split, settings.schema)
            if len(state["finetune"]) == 0:
                raise ValueError(f"fine-tune set {settings.real!r} is empty")
        return state["finetune"].batch(tc.batch_size, np.random.default_rng([tc.seed, step, rank, 1]))

    # validation / early stopping (fine-tuning stage; rank 0 validates, every rank learns the decision). The criterion
    # is early stopping: fine-tuning ends after `patience` validations without a better mean Dice.
    val_rows = [r for r in _read_jsonl(storage.join(settings.out, VAL_FILE)) if int(r["step"]) <= start_step]
    val_state = {"set": None}

    def patience_used() -> int:
        since = 0
        for r in reversed(val_rows):
            if r["best"]:
                break
            since += 1
        return since

    def validate(step: int) -> bool:
        """Validate at ``step``; True when fine-tuning should stop (patience exhausted)."""
        stop = False
        if rank == 0:
            if val_state["set"] is None:
                val_state["set"] = load_finetune_set(tc.val, settings.shape, settings.spacing, "val", settings.schema)
            with autocast():
                scores = validation_dice(_unwrap(state["module"]), val_state["set"], settings.window, device,
                                         settings.net.out_channels)
            best = max((r["val_dice"] for r in val_rows), default=-1.0)
            improved = scores["val_dice"] > best
            val_rows.append({"step": step, **scores, "best": improved})
            blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in val_rows).encode()
            if improved:
                run.save(step, *checkpoint(), uri=storage.join(settings.out, BEST), prune=False)
            storage.atomic_write_bytes(storage.join(settings.out, VAL_FILE), blob)
            stop = bool(tc.patience) and patience_used() >= tc.patience
            log.info("pretrain_cal step %d: validation mean Dice %.4f (best %.4f)%s", step, scores["val_dice"],
                     max(best, scores["val_dice"]), " -> converged, stopping" if stop else "")
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    stopped_at = None
    end = total
    if tc.val_every and tc.patience and val_rows and patience_used() >= tc.patience:
        stopped_at = end = start_step  # this run already converged: nothing left to train
    for step in run.steps(end):
        stage = settings.stage_of(step)
        if stage != state["stage"]:
            resume_opt = opt_state if (state["stage"] is None and stage_at_ckpt == stage) else None
            enter_stage(stage, resume_opt)
        t0 = time.perf_counter()
        raw = next_batch(step, stage)
        if tuple(raw["image"].shape[2:]) != tuple(settings.shape):
            raise ValueError(f"{stage} batch has grid {tuple(raw['image'].shape[2:])}, the run expects {settings.shape}")
        if tc.crop is not None:
            raw = crop_batch(raw, tc.crop, np.random.default_rng([tc.seed, step, rank, 2]))
        batch = augment_batch(raw, transform, (tc.seed, step, rank))
        image, label = batch["image"].to(device), batch["label"].to(device)
        cm = batch["cm"].to(device) if (stage == "pretrain" and tc.loss == "cal") else None
        with autocast():
            logits = state["module"](image)
        loss, parts = cal_loss(logits.float(), label, cm, lambda_ce=tc.lambda_ce, lambda_dice=tc.lambda_dice,
                               return_parts=True)
        opt = state["opt"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        scaler.step(opt)
        scaler.update()
        dt = time.perf_counter() - t0
        last_loss = run.finite(loss, step, stage)
        row = {"step": step, "stage": stage, "loss": last_loss, **parts, "step_time_s": dt,
               "cm_mean": float(batch["cm"].mean()) if cm is not None else 1.0}
        if rank == 0:
            history.append(row)
        ft_step = step - tc.pretrain_steps
        stop = False
        if stage == "finetune" and tc.val_every and (ft_step % tc.val_every == 0 or step == total):
            stop = validate(step)
        run.end_step(step, {**row, "samples_per_s": tc.batch_size * world_size / dt}, checkpoint=checkpoint,
                     force_checkpoint=step == tc.pretrain_steps or stop,
                     postfix={"stage": stage, "loss": f"{last_loss:.4f}"})
        if stop:
            stopped_at = step
            break
    summary = run.close()
    return {
        **summary,
        "final_step": stopped_at if stopped_at is not None else summary["final_step"],
        "latest_checkpoint": latest_checkpoint(settings.out) if rank == 0 else None,
        "best_checkpoint": (storage.join(settings.out, BEST) if rank == 0 and tc.val_every
                            and storage.exists(storage.join(settings.out, BEST, "checkpoint.json")) else None),
        "stopped_at": stopped_at,
        "validation": val_rows,
    }
