"""Training: the loop skeleton shared by the VAE, TCDM and CAL training loops (:mod:`fcas.training.loop`)."""
from fcas.training.loop import TrainingRun, history_lists, history_tensors

__all__ = ["TrainingRun", "history_lists", "history_tensors"]
