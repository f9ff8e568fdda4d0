"""Training: the loop skeleton the three trainings share (:mod:`fcas.training.loop`: resume, checkpoints, NaN
check, progress, history, Ray report) and their specifics: the VAE (:mod:`fcas.training.vae`), the TCDM
(:mod:`fcas.training.tcdm`) and CAL pretraining + fine-tuning (:mod:`fcas.training.cal`). Ray-free; the Ray Train
jobs are in :mod:`fcas.pipeline`."""
from fcas.training.loop import (AMP_DTYPES, TrainingRun, amp_context, check_amp_dtype, grad_scaler, history_lists,
                                history_tensors)

__all__ = ["TrainingRun", "history_lists", "history_tensors", "AMP_DTYPES", "amp_context", "grad_scaler",
           "check_amp_dtype"]
