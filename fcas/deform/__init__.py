"""MGM -- the training-free Mask Generation Module (the paper's §3.1.3, Eq. 5-6).

* :mod:`fcas.deform.params` -- :class:`MGMRanges`, :class:`MGMParams`, :func:`draw_params`.
* :mod:`fcas.deform.field` -- the composed affine + smooth non-rigid pull-back field (mm).
* :mod:`fcas.deform.mgm` -- :func:`mgm_deform`: one warp for all classes, per-class 2x2x2 closing
  on bit codes, union by priority.
* :mod:`fcas.deform.qc` -- topology QC (components, volumes, coronary tree, adjacency).
* :mod:`fcas.deform.generate` -- :func:`mgm_with_qc`: deform + QC + bounded seeded redraws.
* :mod:`fcas.deform.config` -- :class:`MGMConfig` from ``configs/mgm/*.yaml``.
* :mod:`fcas.deform.stage` -- :class:`MGMStage`, the Ray Data ``map_batches`` callable (no Ray import).
"""
from fcas.deform.config import MGMConfig, load_mgm_config
from fcas.deform.generate import MGMResult, mgm_with_qc, prepare_template
from fcas.deform.mgm import CLOSINGS, mgm_deform, validate_mask, warp_labels
from fcas.deform.params import MGMParams, MGMRanges, draw_params, param_rng
from fcas.deform.qc import MaskStats, QCResult, QCThresholds, mask_stats, qc_compare

__all__ = [
    "CLOSINGS", "MGMConfig", "MGMParams", "MGMRanges", "MGMResult", "MaskStats", "QCResult",
    "QCThresholds", "draw_params", "load_mgm_config", "mask_stats", "mgm_deform", "mgm_with_qc",
    "param_rng", "prepare_template", "qc_compare", "validate_mask", "warp_labels",
]
