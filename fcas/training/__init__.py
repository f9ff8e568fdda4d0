"""Training: the loop skeleton shared by the VAE, TCDM and CAL training loops (:mod:`fcas.training.loop`)."""
from fcas.training.loop import (AMP_DTYPES, TrainingRun, amp_context, check_amp_dtype, grad_scaler, history_lists,
                                history_tensors)

__all__ = ["TrainingRun", "history_lists", "history_tensors", "AMP_DTYPES", "amp_context", "grad_scaler",
           "check_amp_dtype"]
