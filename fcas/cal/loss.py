"""Confidence-aware loss (the paper's Eq. 9): CM-weighted cross-entropy + soft Dice. Hand-written.

``L_CAL = CM · L(F(Ĩ), M)``: the per-voxel terms of the segmentation loss are multiplied by the
confidence map before they are reduced, for cross-entropy and soft Dice alike:

* cross-entropy: ``mean_v( CM_v · CE_v )`` (the mean over every voxel of the batch, as
  ``torch.nn.CrossEntropyLoss(reduction="mean")``);
* soft Dice per (sample, class): ``1 - (2 Σ CM·p·g + smooth_nr) / (Σ CM·p + Σ CM·g + smooth_dr)``,
  averaged over samples and classes.

With ``CM = 1`` everywhere this is the plain loss of Eq. 8, which is MONAI's
``DiceCELoss(softmax=True, to_onehot_y=True)`` with its default smoothing and reduction (a test
checks the equality numerically). A voxel with ``CM = 0`` contributes nothing to either term, so the
loss does not depend on the prediction there (zero gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cal_loss", "plain_loss", "CALLoss"]


def _check(logits: torch.Tensor, target: torch.Tensor, cm: torch.Tensor | None) -> None:
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    want = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} (class ids, one channel), got {tuple(target.shape)}")
    if cm is not None and tuple(cm.shape) != want:
        raise ValueError(f"cm must have shape {want}, got {tuple(cm.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"need >= 2 classes (softmax), got {logits.shape[1]} channels")


def cal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    cm: torch.Tensor | None = None,
    *,
    lambda_ce: float = 1.0,
    lambda_dice: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    include_background: bool = True,
    return_parts: bool = False,
):
    """Confidence-aware Dice + CE loss (Eq. 9); ``cm=None`` is Eq. 8.

    Args:
        logits: ``(B, C, D, H, W)`` float, unnormalised network outputs (softmax inside).
        target: ``(B, 1, D, H, W)`` integer class ids in ``[0, C)``.
        cm: ``(B, 1, D, H, W)`` confidence in [0, 1] (None: all ones).
        include_background: include class 0 in the Dice term (MONAI's default: True).

    Returns:
        scalar loss, or ``(loss, {"ce": float, "dice": float})`` with ``return_parts``.
    """
    _check(logits, target, cm)
    target = target.long()
    n_cls = logits.shape[1]
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= n_cls:
        raise ValueError(f"target ids must lie in [0, {n_cls}), got range [{lo}, {hi}]")
    w = None if cm is None else cm.to(logits.dtype)
    # cross-entropy per voxel, weighted, then the mean over all voxels
    ce_v = F.cross_entropy(logits, target[:, 0], reduction="none")  # (B, D, H, W)
    ce = (ce_v * w[:, 0]).mean() if w is not None else ce_v.mean()
    # weighted soft Dice per (sample, class)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target[:, 0], n_cls).movedim(-1, 1).to(prob.dtype)  # (B, C, D, H, W)
    if not include_background:
        prob, onehot = prob[:, 1:], onehot[:, 1:]
    if w is not None:
        pw, gw = prob * w, onehot * w
    else:
        pw, gw = prob, onehot
    dims = tuple(range(2, logits.dim()))
    inter = (pw * onehot).sum(dims)
    denom = pw.sum(dims) + gw.sum(dims)
    dice = (1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)).mean()
    loss = lambda_ce * ce + lambda_dice * dice
    if return_parts:
        return loss, {"ce": float(ce.detach()), "dice": float(dice.detach())}
    return loss


def plain_loss(logits: torch.Tensor, target: torch.Tensor, **kw):
    """Eq. 8: :func:`cal_loss` with ``CM = 1``."""
    return cal_loss(logits, target, None, **kw)


class CALLoss(torch.nn.Module):
    """Module form: ``CALLoss()(logits, target, cm=None)``; same arguments as :func:`cal_loss`."""

    def __init__(self, lambda_ce: float = 1.0, lambda_dice: float = 1.0, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, include_background: bool = True):
        super().__init__()
        self.kw = dict(lambda_ce=lambda_ce, lambda_dice=lambda_dice, smooth_nr=smooth_nr,
                       smooth_dr=smooth_dr, include_background=include_background)

    def forward(self, logits, target, cm=None):
        return cal_loss(logits, target, cm, **self.kw)
