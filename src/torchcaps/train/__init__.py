"""Training, checkpoints and evaluation."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import evaluate, format_confusion
from .lock import RunLock, RunLockedError
from .trainer import NonFiniteError, TrainConfig, Trainer, build_model_from_checkpoint, train

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "RunLock",
    "RunLockedError",
    "TrainConfig",
    "Trainer",
    "build_model_from_checkpoint",
    "evaluate",
    "format_confusion",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
