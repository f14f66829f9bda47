"""Training: one engine for every task, checkpoints and evaluation.

* :class:`Task` (``torchcaps.train.task``): what a job learns, draws and reports.
* :class:`Trainer` (``torchcaps.train.engine``): runs any task under a :class:`TrainConfig`.
* :class:`ClassificationTask` and :func:`train`: image classification, the default job.
"""

from .checkpoint import (
    CheckpointError,
    build_model_from_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from .classification import ClassificationTask, run_task, train
from .config import TrainConfig
from .engine import (
    DistributedError,
    NonFiniteError,
    RunExistsError,
    Trainer,
    create_optimizer,
    init_distributed,
    rank_share,
    resolve_device,
)
from .evaluate import evaluate, format_confusion
from .lock import RunLock, RunLockedError
from .task import Task

__all__ = [
    "CheckpointError",
    "ClassificationTask",
    "DistributedError",
    "NonFiniteError",
    "RunExistsError",
    "RunLock",
    "RunLockedError",
    "Task",
    "TrainConfig",
    "Trainer",
    "build_model_from_checkpoint",
    "create_optimizer",
    "evaluate",
    "format_confusion",
    "init_distributed",
    "load_checkpoint",
    "load_model_weights",
    "rank_share",
    "resolve_device",
    "run_task",
    "save_checkpoint",
    "train",
]
