"""Training: the SFT loop, loss, schedules, optimizers, checkpoints and metrics."""

from loratune.train.loop import RunFolderError, TrainResult, train

__all__ = ["RunFolderError", "TrainResult", "train"]
