"""The skeleton every training loop of the project shares (VAE, TCDM, CAL segmentation).

What differs between the three is the model, the batch and the loss of one step; what is the same is
here, once: finding the checkpoint to resume from and refusing it when its architecture is not this
run's, saving a step's checkpoint and pruning the older ones, the finite-loss check, the progress bar,
the per-step metrics history kept in the checkpoint, and the call that reports each step to Ray Train
(every rank reports, rank 0 saves). A loop body::

    run = TrainingRun("train_vae", out, total=tc.steps, arch=my_arch, arch_of=lambda cfg: ..., rank=rank,
                      report=report, keep=tc.keep_checkpoints, every=tc.checkpoint_every, progress=progress)
    ck = run.resume()                      # None, or the latest checkpoint (its architecture checked)
    ...build, load ck's state...
    for step in run.steps():
        loss = ...one step...
        value = run.finite(loss, step)
        run.end_step(step, {"loss": value, ...}, save=lambda uri: {...state dicts...}, config={...})
    summary = run.close()

Hand-written: Ray Train's ``report``/``Checkpoint`` and MONAI's ``CheckpointSaver`` handler each cover a
part, but neither resumes from fsspec checkpoint folders with an architecture check, and the loops
must run without Ray (tests, the reproduction) as well as inside a Ray Train worker.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch

from fcas.io import storage
from fcas.models.configs import jsonable
from fcas.models.checkpoint import (Checkpoint, checkpoint_dir, config_hash, latest_checkpoint, list_checkpoints,
                                    load_checkpoint, no_report, save_checkpoint)

__all__ = ["TrainingRun", "history_tensors", "history_lists", "AMP_DTYPES", "amp_context", "grad_scaler",
           "check_amp_dtype"]

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_amp_dtype(dtype: str) -> str:
    if dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {dtype!r}")
    return dtype


def amp_context(device: torch.device, amp: bool, dtype: str = "float16") -> ContextManager:
    """``torch.autocast`` when ``amp`` (norms and losses stay fp32 by autocast's own lists): on CUDA in
    ``dtype``; on CPU only for bfloat16 (about 1.9x faster convolutions where the CPU has AVX-512 BF16, see
    docs/benchmarks.md), since float16 norms fail there -- so ``amp`` with float16 leaves CPU training fp32."""
    kind = torch.device(device).type
    if amp and kind == "cuda":
        return torch.autocast("cuda", dtype=AMP_DTYPES[check_amp_dtype(dtype)])
    if amp and kind == "cpu" and check_amp_dtype(dtype) == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, amp: bool, dtype: str = "float16") -> torch.amp.GradScaler:
    """A loss scaler, active only for float16 autocast on CUDA (bfloat16 keeps fp32's range: none needed)."""
    return torch.amp.GradScaler("cuda", enabled=bool(amp) and torch.device(device).type == "cuda"
                                and check_amp_dtype(dtype) == "float16")


def history_tensors(history: Mapping[str, list[float]]) -> dict[str, torch.Tensor]:
    """Columns of per-step figures as float64 tensors (a checkpoint's ``history.pt``)."""
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()}


def history_lists(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """The inverse of :func:`history_tensors`."""
    return {k: [float(x) for x in v.tolist()] for k, v in tensors.items()}


class TrainingRun:
    """Resume, checkpoints, NaN check, progress, history and reporting of one training run (see the
    module docstring). ``arch`` is what a resumed checkpoint must match; ``arch_of(config)`` reads the
    same from a checkpoint's config (default: ``config["arch"]``); ``what`` names it in the error."""

    def __init__(self, name: str, out: str, total: int, *, arch: Mapping[str, Any],
                 arch_of: Callable[[Mapping[str, Any]], Any] | None = None, what: str = "architecture",
                 rank: int = 0, world_size: int = 1, report: Callable[..., None] = no_report, keep: int = 0,
                 every: int = 0, progress: bool = True):
        self.name, self.out, self.total = name, out, int(total)
        self.arch, self.arch_of, self.what = arch, arch_of or (lambda c: c.get("arch")), what
        self.rank, self.world_size, self._report = rank, world_size, report
        self.keep, self.every, self.progress = int(keep), int(every), progress
        self.start = 0
        self.history: dict[str, list[float]] = {"step": [], "loss": []}
        self.steps_run, self.last_loss = 0, float("nan")
        self._bar = None
        self._t0 = time.perf_counter()

    # ---- resume ----
    def resume(self) -> Checkpoint | None:
        """The latest complete checkpoint under ``out`` (``start`` and ``history`` taken from it), or None.
        Raises ValueError when it was trained with another architecture than ``arch``."""
        latest = latest_checkpoint(self.out)
        if latest is None:
            return None
        ck = load_checkpoint(latest)
        if config_hash({"a": jsonable(self.arch_of(ck.config))}) != config_hash({"a": jsonable(self.arch)}):
            raise ValueError(f"checkpoint {latest} was trained with a different {self.what}; "
                             f"use another out= or the same settings")
        self.start = ck.step
        if "history" in ck.files:
            self.history = history_lists(ck.state_dict("history")) or self.history
        return ck

    # ---- steps ----
    def steps(self, end: int | None = None) -> Iterator[int]:
        """``start + 1 .. end`` (default ``total``), with a progress bar on rank 0 when ``progress``."""
        end = self.total if end is None else int(end)
        if self.progress and self.rank == 0 and self.start < end:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=end, initial=self.start, desc=self.name, unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()
        return iter(range(self.start + 1, end + 1))

    def finite(self, loss: torch.Tensor | float, step: int, where: str = "") -> float:
        """``float(loss)``; FloatingPointError when it is NaN or infinite (the run stops, its checkpoints stay)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name}: loss is {value} at step {step}{f' ({where})' if where else ''}")
        self.last_loss = value
        return value

    def is_checkpoint_step(self, step: int, force: bool = False) -> bool:
        return force or step == self.total or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, config: Mapping[str, Any], state_dicts: Mapping[str, Any], uri: str | None = None,
             prune: bool = True) -> str:
        """Save a checkpoint (``history`` added as ``history.pt`` unless given) and prune to the newest ``keep``."""
        uri = uri or checkpoint_dir(self.out, step)
        states = dict(state_dicts)
        states.setdefault("history", history_tensors(self.history))
        save_checkpoint(uri, config=dict(config), state_dicts=states, step=step)
        if prune and self.keep > 0:
            for _, old in list_checkpoints(self.out)[: -self.keep]:
                storage.remove(old, recursive=True, missing_ok=True)
        return uri

    def end_step(self, step: int, metrics: Mapping[str, Any], checkpoint: Callable[[], tuple[Mapping, Mapping]] | None,
                 force_checkpoint: bool = False, postfix: Mapping[str, str] | None = None) -> str | None:
        """Record the step (history, progress), save a checkpoint when it is due (rank 0; ``checkpoint()``
        returns ``(config, state_dicts)``) and report the metrics (every rank). Returns the checkpoint URI."""
        self.steps_run += 1
        self.history["step"].append(float(step))
        self.history["loss"].append(float(metrics.get("loss", self.last_loss)))
        is_ck = self.is_checkpoint_step(step, force_checkpoint)
        uri = None
        if is_ck and self.rank == 0 and checkpoint is not None:
            uri = self.save(step, *checkpoint())
        self._report({"step": step, **metrics}, checkpoint_uri=uri, checkpoint_step=is_ck)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(postfix or {"loss": f"{self.last_loss:.4f}"})
        return uri

    def close(self, **extra: Any) -> dict:
        """Close the progress bar; the run's summary: start/final step, steps run, last loss, seconds."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return {"start_step": self.start, "final_step": max(self.start, self.total), "steps_run": self.steps_run,
                "last_loss": self.last_loss, "seconds": time.perf_counter() - self._t0, **extra}

