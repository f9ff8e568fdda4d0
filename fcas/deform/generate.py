"""One MGM sample with QC and bounded redraws: :func:`mgm_with_qc`.

Try ``t = 0, 1, ...`` draws :class:`MGMParams` from ``default_rng([run_seed, sample_id, t])``
(or uses the plan's parameters at ``t = 0``), deforms, and runs the topology QC against the
template; the first passing try wins. After ``max_tries`` failures the last try is kept and flagged
(``on_fail="keep_last"``) or the template itself is returned (``on_fail="identity"``). The tries and
the failure reasons of every try are recorded. Hand-written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fcas.deform.config import MGMConfig
from fcas.deform.mgm import mgm_deform, validate_mask
from fcas.deform.params import MGMParams, draw_params, param_rng
from fcas.deform.qc import MaskStats, QCResult, mask_stats, qc_compare
from fcas.labels import LabelSchema, default_schema

__all__ = ["MGMResult", "mgm_with_qc", "prepare_template"]


@dataclass(frozen=True)
class MGMResult:
    """A finished MGM sample.

    Attributes:
        mask: ``(D, H, W)`` uint8 label map on the template's grid.
        params: the parameters of the returned mask (identity for an ``identity`` fallback).
        qc: its QC result.
        tries: how many draws were made (1 = first draw passed).
        failures: per try, the QC failure reasons (empty for the passing try).
        fallback: True when ``on_fail="identity"`` replaced a failed sample by the template.
        deform_seconds / qc_seconds: wall time summed over the tries.
    """

    mask: np.ndarray
    params: MGMParams
    qc: QCResult
    tries: int
    failures: tuple[tuple[str, ...], ...]
    fallback: bool
    deform_seconds: float
    qc_seconds: float

    def to_flat(self) -> dict[str, float]:
        """Parameters (``mgm_*``), QC figures (``qc_*``), tries and timings as one flat row."""
        row = self.params.to_flat(prefix="mgm_")
        row.update(self.qc.to_flat(prefix="qc_"))
        row.update(mgm_tries=float(self.tries), mgm_fallback=float(self.fallback),
                   mgm_deform_s=self.deform_seconds, mgm_qc_s=self.qc_seconds)
        return row


def prepare_template(mask, cfg: MGMConfig, schema: LabelSchema | None = None) -> tuple[np.ndarray, MaskStats]:
    """Validate a template mask, apply ``cfg.keep`` and measure it: ``(mask uint8, stats)``."""
    schema = schema or default_schema()
    cfg.qc.check_schema(schema)
    mask, _ = validate_mask(mask, schema)
    if cfg.keep == "cardiac":
        mask = schema.cardiac_only(mask)
        mask, _ = validate_mask(mask, schema)  # empty once reduced to the cardiac classes -> ValueError
    return mask, mask_stats(mask, cfg.qc, schema)


def mgm_with_qc(
    mask,
    spacing,
    run_seed: int,
    sample_id: int,
    cfg: MGMConfig | None = None,
    max_tries: int | None = None,
    *,
    schema: LabelSchema | None = None,
    params: MGMParams | None = None,
    template_stats: MaskStats | None = None,
) -> MGMResult:
    """MGM sample ``sample_id`` of run ``run_seed``: deform, QC, redraw on failure (see module doc).

    Args:
        mask: ``(D, H, W)`` integer template label map.
        spacing: voxel size (mm) along (i, j, k).
        run_seed, sample_id: the sample's seed; try ``t`` draws from ``(run_seed, sample_id, t)``.
        cfg: :class:`MGMConfig` (default ``configs/mgm/default.yaml`` values).
        max_tries: overrides ``cfg.max_tries``.
        params: parameters for try 0 (a plan's draw); later tries draw as usual.
        template_stats: cached :func:`prepare_template` stats of ``mask`` (already reduced by
            ``cfg.keep``) -- skips validating and measuring the template again.
    """
    cfg = cfg or MGMConfig()
    schema = schema or default_schema()
    tries_max = cfg.max_tries if max_tries is None else int(max_tries)
    if tries_max < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries!r}")
    if template_stats is None:
        mask, before = prepare_template(mask, cfg, schema)
    else:
        mask, before = np.asarray(mask), template_stats
    failures: list[tuple[str, ...]] = []
    t_def = t_qc = 0.0
    out = qc = p = None
    for attempt in range(tries_max):
        p = params if (attempt == 0 and params is not None) else draw_params(cfg.ranges, param_rng(run_seed, sample_id, attempt))
        t0 = time.perf_counter()
        out = mgm_deform(mask, spacing, p, closing=cfg.closing, schema=schema,
                         closed_classes=cfg.closed_classes, num_threads=cfg.num_threads, overlap=cfg.overlap)
        t1 = time.perf_counter()
        qc = qc_compare(before, mask_stats(out, cfg.qc, schema), cfg.qc, schema)
        t_def += t1 - t0
        t_qc += time.perf_counter() - t1
        failures.append(qc.failures)
        if qc.passed:
            break
    fallback = False
    if not qc.passed and cfg.on_fail == "identity":
        out, p, fallback = mask.copy(), MGMParams(), True
        qc = qc_compare(before, before, cfg.qc, schema)
    return MGMResult(mask=out, params=p, qc=qc, tries=len(failures), failures=tuple(failures),
                     fallback=fallback, deform_seconds=t_def, qc_seconds=t_qc)
