"""MGM as a Ray Data batch stage: plans in, deformed masks + parameters + QC + timings out.

:class:`MGMStage` is a plain callable class (no Ray import). The pipeline wiring in
``fcas/pipeline`` uses it either as CPU tasks -- ``ds.map_batches(MGMStage(cfg), batch_format="numpy",
num_cpus=1)``: an instance is a function to Ray Data, fused with neighbouring task stages -- or as
an actor pool -- ``ds.map_batches(MGMStage, fn_constructor_kwargs={"cfg": cfg.to_dict()},
concurrency=n, num_cpus=1)`` -- where each actor keeps its template cache across batches.
Input batch columns (numpy arrays of length B):

* ``sample_id`` (int), ``template_uri`` (str: a label NIfTI on any fsspec URI), ``run_seed`` (int);
* optionally the plan's parameters as ``mgm_<field>`` columns (all of :class:`MGMParams`' fields):
  used for try 0; redraws still come from ``(run_seed, sample_id, try)``.

Output: every input column unchanged, plus

* ``mask``: ``(B, D, H, W)`` uint8 (an object array of per-row arrays if the grids differ),
  ``affine``: ``(B, 4, 4)`` float64 (the template's), ``spacing``: ``(B, 3)`` float64;
* ``mgm_<field>`` float64 per parameter of the returned mask (:meth:`MGMParams.to_flat`);
* ``qc_*`` float64 QC figures (fixed key set per config), ``qc_failures`` (str, ``"; "``-joined
  reasons of the returned mask, empty when it passed);
* ``mgm_tries``, ``mgm_fallback``, ``mgm_read_s``, ``mgm_deform_s``, ``mgm_qc_s`` float64 and
  ``mgm_config`` (str, :meth:`MGMConfig.digest`).

Templates are read with :func:`fcas.io.nifti.read_nifti` and kept (with their QC stats) in a small
LRU cache per stage instance: a template library is reused by many samples. Hand-written glue.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fcas.deform.config import MGMConfig, load_mgm_config
from fcas.deform.generate import mgm_with_qc, prepare_template
from fcas.deform.params import MGMParams
from fcas.deform.qc import MaskStats
from fcas.io.nifti import read_nifti
from fcas.labels import LabelSchema, load_schema

__all__ = ["MGMStage", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS = ("sample_id", "template_uri", "run_seed")


@dataclass(frozen=True)
class _Template:
    mask: np.ndarray
    stats: MaskStats
    affine: np.ndarray
    spacing: tuple[float, float, float]


class MGMStage:
    """``map_batches`` callable: ``__call__(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.

    Args:
        cfg: :class:`MGMConfig`, a mapping (``cfg.mgm`` of a Hydra config) or ``None`` for
            ``configs/mgm/default.yaml``.
        schema: label schema name or path (``configs/labels/<name>.yaml``).
        cache_size: templates kept in memory per instance.
    """

    def __init__(self, cfg: MGMConfig | Mapping | None = None, schema: str | LabelSchema = "cardiac",
                 cache_size: int = 8):
        if cfg is None:
            cfg = load_mgm_config("default")
        elif not isinstance(cfg, MGMConfig):
            cfg = MGMConfig.from_dict(cfg)
        self.cfg = cfg
        self.schema = schema if isinstance(schema, LabelSchema) else load_schema(schema)
        self.cfg.qc.check_schema(self.schema)
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size!r}")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, _Template] = OrderedDict()
        self.digest = cfg.digest()

    def template(self, uri: str) -> tuple[_Template, float]:
        """The template at ``uri`` (cached) and the seconds spent reading it (0 when cached)."""
        if uri in self._cache:
            self._cache.move_to_end(uri)
            return self._cache[uri], 0.0
        t0 = time.perf_counter()
        vol = read_nifti(uri)
        try:
            mask, stats = prepare_template(vol.array, self.cfg, self.schema)
        except ValueError as e:
            raise ValueError(f"template {uri}: {e}") from None
        tmpl = _Template(mask=mask, stats=stats, affine=np.asarray(vol.affine, np.float64), spacing=vol.spacing)
        self._cache[uri] = tmpl
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tmpl, time.perf_counter() - t0

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in REQUIRED_COLUMNS if c not in batch]
        if missing:
            raise ValueError(f"MGM stage: batch lacks columns {missing}; has {sorted(batch)}")
        n = len(batch["sample_id"])
        names = MGMParams.field_names()
        planned = all(f"mgm_{f}" in batch for f in names)
        masks, affines, spacings, rows, fails, errors = [], [], [], [], [], []
        for i in range(n):
            uri = str(batch["template_uri"][i])
            try:
                tmpl, read_s = self.template(uri)
                plan = MGMParams.from_flat({f: batch[f"mgm_{f}"][i] for f in names}) if planned else None
                res = mgm_with_qc(tmpl.mask, tmpl.spacing, int(batch["run_seed"][i]), int(batch["sample_id"][i]),
                                  self.cfg, schema=self.schema, params=plan, template_stats=tmpl.stats)
            except Exception as e:  # a bad template or draw must not stop the run: the sample becomes a reject
                msg = " ".join(str(e).split())
                errors.append(msg if uri in msg else f"{uri}: {msg}")
                rows.append({})
                fails.append("")
                masks.append(None)
                affines.append(np.eye(4))
                spacings.append((1.0, 1.0, 1.0))
                continue
            row = res.to_flat()
            row["mgm_read_s"] = read_s
            rows.append(row)
            fails.append("; ".join(res.qc.failures))
            errors.append("")
            masks.append(res.mask)
            affines.append(tmpl.affine)
            spacings.append(tmpl.spacing)
        good = next((m for m in masks if m is not None), None)
        masks = [m if m is not None else np.zeros(good.shape if good is not None else (1, 1, 1), np.uint8)
                 for m in masks]
        out = {k: np.asarray(v) for k, v in batch.items()}
        if n and all(m.shape == masks[0].shape for m in masks):
            out["mask"] = np.stack(masks)
        else:
            arr = np.empty(n, dtype=object)
            arr[:] = masks
            out["mask"] = arr
        out["affine"] = np.stack(affines) if n else np.zeros((0, 4, 4))
        out["spacing"] = np.asarray(spacings, dtype=np.float64).reshape(n, 3)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        for k in keys:
            out[k] = np.asarray([r.get(k, np.nan) for r in rows], dtype=np.float64)
        out["qc_failures"] = np.asarray(fails, dtype=object)
        out["mgm_error"] = np.asarray(errors, dtype=object)
        out["mgm_config"] = np.asarray([self.digest] * n, dtype=object)
        return out
