"""Image classification as a task on the engine, and :func:`train`, the job it runs."""

from __future__ import annotations

import torch

from ..data import DatasetSplits, Split, augment_batch, load_dataset
from ..models import CapsuleModel, create_model
from ..runtime import configure_process
from .config import TrainConfig
from .engine import DistributedError, Trainer, init_distributed
from .evaluate import evaluate
from .task import Task

__all__ = ["ClassificationTask", "train"]


class ClassificationTask(Task):
    """Train a registered model (or a given one) on labelled images; select on validation.

    Args:
        data: the splits to use (default: ``load_dataset(cfg.dataset, ...)``).
        model: a model instance to train instead of building ``cfg.model`` from the
            registry (its checkpoints then record ``cfg.model`` and the model's own
            ``in_shape``/``num_classes``).
    """

    monitor, mode = "val_accuracy", "max"

    def __init__(self, data: DatasetSplits | None = None, model: CapsuleModel | None = None):
        self.data, self.model = data, model
        self._order: tuple[int, torch.Tensor] | None = None

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        if self.data is None:
            self.data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed)
        _, h, w = self.data.in_shape
        if cfg.augment == "shift" and 2 * cfg.max_shift >= min(h, w):
            raise ValueError(f"max_shift={cfg.max_shift} would move {h}x{w} images off the "
                             f"canvas; use at most {(min(h, w) - 1) // 2} pixels")
        declared = cfg.model_kwargs.get("num_classes")
        if declared is not None and declared != self.data.num_classes:
            raise ValueError(f"model_kwargs sets num_classes={declared!r} but {self.data.name} "
                             f"has {self.data.num_classes} classes")
        self.model_kwargs = {"in_shape": list(self.data.in_shape),
                             "num_classes": self.data.num_classes, **cfg.model_kwargs}
        if self.model is None:
            torch.manual_seed(cfg.seed)
            self.model = create_model(cfg.model, **self.model_kwargs)
        else:
            self.model_kwargs.update(in_shape=list(self.model.in_shape),
                                     num_classes=self.model.num_classes)
        self.module = self.model

    def spec(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs}

    def num_batches(self) -> int:
        return -(-len(self.data.train) // self.cfg.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training split for ``epoch`` (seeded by seed and epoch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data.train), generator=g))
        return self._order[1]

    def batch(self, epoch: int, pos: int, generator: torch.Generator):
        b = self.cfg.batch_size
        train = self.data.train
        x, y = train.raw(self.order(epoch)[pos * b:(pos + 1) * b])  # stored size, in [0, 1]
        x = augment_batch(self.cfg.augment, x, train.shape[1:], generator, self.cfg.max_shift)
        return train.finish(x), y  # the split's normalisation, if any

    def step(self, batch):
        x, y = batch
        out = self.forward(x, y)
        loss, _ = self.model.loss(out, x, y)
        yield "model", loss, {"correct": int((out.logits.argmax(1) == y).sum())}

    def train_metrics(self, sums: dict) -> dict:
        return {"train_accuracy": sums.get("correct", 0) / max(sums.get("seen", 0), 1)}

    def split(self, name: str) -> Split:
        return getattr(self.data, name)

    def evaluate(self, split: str, module=None) -> dict:
        return evaluate(module or self.model, self.split(split), self.cfg.eval_batch_size)

    def summary(self, trainer: Trainer) -> dict:
        """Test metrics of the best checkpoint (chosen on validation)."""
        test = self.evaluate("test", trainer.best_module().to(trainer.device))
        return {"dataset": self.cfg.dataset, "test_accuracy": test["accuracy"],
                "test_loss": test["loss"], "test_correct": test["correct"],
                "test_total": test["total"],
                "checkpoint": str(trainer.out / "best.json") if trainer.out else None}


def run_task(task: Task, config: TrainConfig, resume: bool = False,
             changes: dict | None = None) -> tuple[Trainer, dict]:
    """Apply the config's process settings, join ``torchrun``'s group, train; returns both."""
    configure_process(config.threads, config.deterministic)
    joined = init_distributed(config.device)
    try:
        trainer = Trainer(task, config)
        if resume:
            trainer.resume(changes=changes)
        return trainer, trainer.fit()
    except RuntimeError as e:  # gloo/nccl: another rank died or hung up
        if not (joined and (isinstance(e, torch.distributed.DistError)
                            or "Connection closed" in str(e))):
            raise
        last = f"{config.out}/last.json" if config.out else "none (no run directory)"
        raise DistributedError(
            f"rank {torch.distributed.get_rank()} lost contact with the other ranks "
            f"({str(e).splitlines()[0]}); the last checkpoint is {last}: restart the job with "
            "--resume (with any number of processes)") from None
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(config: TrainConfig, resume: bool = False, changes: dict | None = None) -> dict:
    """Train (or resume) a classifier and return the summary (``test_accuracy`` etc.).

    Applies ``config.threads`` and ``config.deterministic`` to the process. Under
    ``torchrun`` it trains with DistributedDataParallel (see :mod:`torchcaps.train.engine`).
    ``changes`` records settings changed on resume (setting -> ``[old, new]``).
    """
    return run_task(ClassificationTask(), config, resume, changes)[1]
