"""CAL: segmentation pretraining on synthetic data with the confidence-aware loss (the paper's Eq. 9), then
fine-tuning on real (or phantom) cases: the net, the loss, the data and the predictor. The training loop is
:mod:`fcas.training.cal`; the Ray Train job :mod:`fcas.pipeline.pretrain_cal`.

Names are imported lazily, so the Ray Data loading tasks that import :mod:`fcas.cal.data` do not
pay for MONAI's networks.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "cal_loss": "fcas.cal.loss",
    "plain_loss": "fcas.cal.loss",
    "CALLoss": "fcas.cal.loss",
    "SegNetConfig": "fcas.cal.net",
    "build_segnet": "fcas.cal.net",
    "load_predictor": "fcas.cal.predict",
    "load_segnet": "fcas.cal.predict",
    "predict_classes": "fcas.cal.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fcas.cal' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
