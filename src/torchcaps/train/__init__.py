"""Training: one engine for every task, checkpoints and evaluation.

* :class:`Task` (``torchcaps.train.task``): what a job learns, draws and reports.
* :class:`Trainer` (``torchcaps.train.engine``): runs any task under a :class:`TrainConfig`.
* :class:`ClassificationTask` and :func:`train`: image classification, the default job;
  :func:`train_seeds`: the same job over several seeds, with mean and standard deviation.
* :class:`SegmentationTask` and :func:`train_segmentation`: 2D and 3D segmentation.
* :class:`GANTask` and :func:`train_gan`: generative adversarial training (two optimisers).
* :class:`SparseCapsuleTask` and :func:`train_sparse_capsules`: sparse unsupervised capsules
  (reconstruction only; a linear probe selects).
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
from .gan import GANSettings, GANTask, train_gan
from .lock import RunLock, RunLockedError
from .seeds import train_seeds
from .segmentation import SegmentationSettings, SegmentationTask, train_segmentation
from .task import Task
from .unsupervised import SparseCapsuleSettings, SparseCapsuleTask, train_sparse_capsules

__all__ = [
    "CheckpointError",
    "ClassificationTask",
    "DistributedError",
    "GANSettings",
    "GANTask",
    "NonFiniteError",
    "RunExistsError",
    "RunLock",
    "RunLockedError",
    "SegmentationSettings",
    "SparseCapsuleSettings",
    "SparseCapsuleTask",
    "SegmentationTask",
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
    "train_gan",
    "train_seeds",
    "train_segmentation",
    "train_sparse_capsules",
]
