"""Training: the plain loop (:mod:`.trainer`) and the Hugging Face Trainer bridge (:mod:`.hf`, imported on use so
that ``peftkit.train`` does not pull in ``transformers.Trainer``)."""

from .density import DensityLoss, activation_density
from .trainer import TrainResult, accuracy, default_loss, linear_schedule, predict, train

__all__ = ["DensityLoss", "TrainResult", "accuracy", "activation_density", "default_loss", "linear_schedule", "predict",
           "train"]
