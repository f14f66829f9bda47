"""The contract between a training task and the engine.

A :class:`Task` says *what* is learned: which batches it draws, how its losses are computed
(one optimiser, or several in a fixed order, e.g. discriminator then generator), which
metrics it reports and which one selects the checkpoint. The engine
(:class:`torchcaps.train.Trainer`) owns everything else for every task: optimisers and
schedule, precision, ``torch.compile``, distributed data parallelism, non-finite detection,
validation-based selection, early stopping, exact resume, atomic checkpoints, the run lock,
metrics files and progress display.

Writing a task::

    class MyTask(Task):
        monitor, mode = "val_score", "max"

        def setup(self, cfg, device):            # build data and modules
            self.module = ...                    # trained, checkpointed, wrapped by DDP
        def spec(self):                          # how to rebuild self.module
            return {"model": ..., "model_kwargs": {...}}
        def num_batches(self): ...               # batches per epoch
        def batch(self, epoch, pos, generator):  # the global batch, a tuple of tensors
            ...
        def step(self, batch):                   # yields (optimizer, loss, counts)
            out = self.forward(x)                # self.forward: the wrapped module
            yield "model", loss, {"correct": int(...)}
        def evaluate(self, split, module=None):  # "val" or "test" -> {metric: value}
            ...

``batch`` must be a pure function of ``(epoch, pos)`` and the generator's state, so that a
resumed run replays exactly the batches it would have seen. In a distributed run every rank
draws the same global batch and the engine keeps its own slice of dimension 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["Task"]


class Task:
    """Base class of training tasks; see the module docstring."""

    monitor: str = "val_accuracy"  # the evaluation metric that selects the best checkpoint
    mode: str = "max"  # "max" or "min": which direction of `monitor` is better
    optimizers: tuple[str, ...] = ("model",)  # names, in the order step() yields them
    module: nn.Module  # set by setup(): everything trained and checkpointed
    forward: nn.Module  # set by the engine: module, compiled and/or DDP-wrapped

    def setup(self, cfg, device: torch.device) -> None:
        raise NotImplementedError

    def spec(self) -> dict:
        """``{"model": name, "model_kwargs": {...}}``: enough to rebuild ``module``."""
        raise NotImplementedError

    def parameters(self, optimizer: str) -> Iterator[nn.Parameter]:
        """The parameters optimiser ``optimizer`` updates (default: all of ``module``)."""
        return self.module.parameters()

    def num_batches(self) -> int:
        raise NotImplementedError

    def batch(self, epoch: int, pos: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def step(self, batch: tuple[torch.Tensor, ...]) -> Iterator[tuple[str, torch.Tensor, dict]]:
        """Yield ``(optimizer name, loss, counts)`` once per optimiser update.

        The engine back-propagates each loss and steps that optimiser before asking for the
        next one. ``counts`` are numbers summed over the epoch's non-skipped steps (e.g.
        ``{"correct": 12}``) and turned into metrics by :meth:`train_metrics`.
        """
        raise NotImplementedError

    def train_metrics(self, sums: dict) -> dict:
        """Epoch training metrics from summed counts (``sums["seen"]`` examples)."""
        return {}

    def evaluate(self, split: str, module: nn.Module | None = None) -> dict:
        """Metrics of ``module`` (default: the one being trained) on ``"val"`` or ``"test"``."""
        raise NotImplementedError

    def validate(self) -> dict:
        """The metrics recorded after each epoch (default: :meth:`evaluate` on ``"val"``,
        its float results prefixed ``val_``); ``monitor`` must be one of them."""
        res = self.evaluate("val")
        return {f"val_{k}": v for k, v in res.items() if isinstance(v, float)}

    def should_stop(self, record: dict) -> bool:
        """A task-specific stopping rule, asked after every evaluation (e.g. a target)."""
        return False

    def state(self) -> dict:
        """Task state kept in the checkpoint manifest (JSON); restored by load_state."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def check_resume(self, manifest: dict) -> None:
        """Refuse (``CheckpointError``) a checkpoint whose settings this task cannot continue.

        The engine has already checked the model and the settings it owns.
        """

    def summary(self, trainer) -> dict:
        """The job's final report (the engine adds steps, timings and the best record)."""
        return {}
