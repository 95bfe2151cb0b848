"""Training: the SFT recipe, loss, schedules, optimizers, checkpoints and metrics."""

from loratune.train.loop import TrainResult, train
from loratune.train.run_folder import RunFolderError

__all__ = ["RunFolderError", "TrainResult", "train"]
