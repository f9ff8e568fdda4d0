"""Evaluation metrics (Ray-free; numpy / torch in, floats out).

* :mod:`fcas.metrics.segmentation` -- Dice (the paper's Eq. 14) and RDice (Eq. 15) per class and mean.
* :mod:`fcas.metrics.image` -- SSIM (MONAI) and RMSE of a synthesized volume vs its target under a mask.
* :mod:`fcas.metrics.fid` -- FID on features of the project's own VAE encoder; LPIPS only with given weights.
"""
from fcas.metrics.fid import VAEEncoderFeatures, feature_stats, fid, frechet_distance, lpips, make_lpips
from fcas.metrics.image import abs_error, rmse, ssim, ssim_map
from fcas.metrics.segmentation import ball, dice_per_class, dilate_ball, mean_score, rdice_per_class

__all__ = [
    "dice_per_class", "rdice_per_class", "mean_score", "ball", "dilate_ball",
    "ssim", "ssim_map", "rmse", "abs_error",
    "fid", "frechet_distance", "feature_stats", "VAEEncoderFeatures", "make_lpips", "lpips",
]
