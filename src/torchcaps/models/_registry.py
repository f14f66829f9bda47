"""Model registry: ``@register_model``, ``create_model(name, **kwargs)``, ``list_models()``.

Each model is registered with the task it solves: ``"classification"`` (a
:class:`~torchcaps.models.CapsuleModel`, the default), ``"segmentation"`` (a
:class:`~torchcaps.models.SegmentationModel`), ``"generation"`` (a generative pair) or
``"unsupervised"`` (a representation learned without labels).
:func:`list_models` lists one task at a time so that code written for classifiers never
meets a segmentation network by surprise.
"""

from __future__ import annotations

from .._registry import Registry, UnknownNameError
from ._base import CapsuleModel

__all__ = ["register_model", "create_model", "list_models", "model_task", "UnknownNameError",
           "TASKS"]

_MODELS = Registry("model")
_TASK_OF: dict[str, str] = {}
#: the tasks a registered model can solve
TASKS = ("classification", "segmentation", "generation", "unsupervised")


def register_model(fn=None, *, task: str = "classification"):
    """Register a model builder under its function name (duplicates raise).

    Use as ``@register_model`` (a classifier) or ``@register_model(task="segmentation")``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def deco(f):
        _MODELS.register()(f)
        _TASK_OF[f.__name__] = task
        return f

    return deco if fn is None else deco(fn)


def create_model(name: str, **kwargs) -> CapsuleModel:
    """Build a registered model, e.g. ``create_model("capsnet", routing_iterations=2)``.

    Every classifier accepts ``in_shape=(C, H, W)`` and ``num_classes``; every segmentation
    model accepts ``in_channels``, ``num_classes`` and ``spatial_dims``-sized inputs.
    """
    return _MODELS.get(name)(**kwargs)


def model_task(name: str) -> str:
    """The task of a registered model (``"classification"`` or ``"segmentation"``)."""
    _MODELS.get(name)  # unknown names raise with suggestions
    return _TASK_OF[name]


def list_models(pattern: str | None = None, task: str | None = "classification") -> list[str]:
    """Names of the registered models of one task (``task=None``: every task), optionally
    filtered by a glob pattern (``"caps*"``)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    return [n for n in _MODELS.names(pattern) if task is None or _TASK_OF[n] == task]
