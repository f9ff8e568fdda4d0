"""Evaluation reports: segmentation (Dice / RDice) and synthesis image quality (SSIM / RMSE / FID /
confidence vs error). Ray-free; the Hydra entry point is ``jobs/evaluate.py``.

Each mode writes, under ``out`` (any fsspec URI, every file atomically):

* ``metrics.json`` -- every figure of the report (NaN written as ``null``);
* ``report.md`` -- markdown tables and the plots below, with the feature network of the FID named;
* PNG plots -- ``dice_per_class.png`` (segmentation), ``cm_vs_error.png`` (synthesis),
  ``learning_curve.png`` when a training metrics file is given (``learning_curve``).

Modules: :mod:`.report` (settings, tables, plots, learning curves, writing), :mod:`.segmentation`
(Dice / RDice of predictions against ground truth), :mod:`.synthesis` (a synthesis run against its
targets). The metrics themselves are in :mod:`fcas.metrics`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fcas.evaluation.report import EvaluateSettings, read_learning_curve, settings_from_dict, write_report
from fcas.evaluation.segmentation import (evaluate_segmentation, match_predictions, run_segmentation,
                                          segmentation_summary)
from fcas.evaluation.synthesis import evaluate_pairs, evaluate_synthesis

__all__ = [
    "EvaluateSettings", "settings_from_dict", "run_evaluation",
    "evaluate_segmentation", "segmentation_summary", "match_predictions", "run_segmentation",
    "evaluate_synthesis", "evaluate_pairs", "read_learning_curve", "write_report",
]


def run_evaluation(s: EvaluateSettings, predictor: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Run the configured mode; returns what ``metrics.json`` holds."""
    if s.mode == "segmentation":
        return run_segmentation(s, predictor)
    return evaluate_synthesis(s)
