"""Model registry: ``@register_model``, ``create_model(name, **kwargs)``, ``list_models()``.

Each model is registered with the task it solves: ``"classification"`` (a
:class:`~torchcaps.models.CapsuleModel`, the default), ``"segmentation"`` (a
:class:`~torchcaps.models.SegmentationModel`), ``"generation"`` (a generative pair) or
``"unsupervised"`` (a representation learned without labels).
:func:`list_models` lists one task at a time so that code written for classifiers never
meets a segmentation network by surprise.

A model may also carry a :class:`ModelCfg` (timm's ``default_cfg``): its default training
recipe and the figures its paper reports, kept beside the builder so that the command line,
the benchmarks and the tables read one source (:func:`get_model_cfg`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._registry import Registry, UnknownNameError
from ._base import CapsuleModel

__all__ = ["register_model", "create_model", "list_models", "model_task", "get_model_cfg",
           "ModelCfg", "UnknownNameError", "TASKS"]

_MODELS = Registry("model")
_TASK_OF: dict[str, str] = {}
_CFG_OF: dict[str, ModelCfg] = {}
#: the tasks a registered model can solve
TASKS = ("classification", "segmentation", "generation", "unsupervised")


def _frozen(value):
    """A read-only copy: mappings become ``MappingProxyType``, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return copy.deepcopy(value)


def _thawed(value):
    """A plain, independent copy of a :func:`_frozen` value (mappings become dicts)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_thawed(v) for v in value)
    return copy.deepcopy(value)


@dataclass(frozen=True)
class ModelCfg:
    """What a registered model carries besides its builder (read-only once registered).

    Example::

        @register_model(default_cfg=ModelCfg(
            recipe={"lr": 5e-4, "batch_size": 16},  # where each value comes from
            paper={"mnist": "99.74% mean (Mazzia et al. 2021)"},
            citation="Mazzia, Salvetti, Chiaberge 2021, Efficient-CapsNet"))
        def my_model(**kwargs): ...
    """

    # the TrainConfig fields the model's default training changes (the rest keep
    # TrainConfig's defaults); `torchcaps train --model NAME` applies them unless a flag is given
    recipe: Mapping[str, Any] = field(default_factory=dict)
    # what the paper reports, by dataset name (e.g. {"mnist": "99.75% (0.25% error)"})
    paper: Mapping[str, str] = field(default_factory=dict)
    citation: str = ""  # the paper (authors, year, title)

    def __post_init__(self) -> None:
        for name in ("recipe", "paper"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"ModelCfg.{name} must be a mapping with string keys, got {value!r}")
            object.__setattr__(self, name, _frozen(value))

    def recipe_kwargs(self) -> dict[str, Any]:
        """The recipe as plain ``TrainConfig`` keyword arguments (a fresh copy to change)."""
        return _thawed(self.recipe)


def register_model(fn=None, *, task: str = "classification", default_cfg: ModelCfg | None = None):
    """Register a model builder under its function name (duplicates raise).

    Use as ``@register_model`` (a classifier), ``@register_model(task="segmentation")``, or
    ``@register_model(default_cfg=ModelCfg(recipe={...}, paper={...}))`` to record the
    model's training recipe and the paper's figures (:func:`get_model_cfg` reads them).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if default_cfg is not None and not isinstance(default_cfg, ModelCfg):
        raise TypeError(f"default_cfg must be a ModelCfg, got {type(default_cfg).__name__}")

    def deco(f):
        _MODELS.register()(f)
        _TASK_OF[f.__name__] = task
        _CFG_OF[f.__name__] = default_cfg or ModelCfg()
        return f

    return deco if fn is None else deco(fn)


def get_model_cfg(name: str) -> ModelCfg:
    """The :class:`ModelCfg` of a registered model (an empty one where none was registered).

    ``get_model_cfg("efficient_capsnet").recipe["batch_size"]`` is 16; use
    ``TrainConfig.from_recipe(name, ...)`` to build a training config from it.
    """
    _MODELS.get(name)  # unknown names raise with suggestions
    return _CFG_OF[name]


def create_model(name: str, pretrained: bool | str | os.PathLike = False, **kwargs) -> CapsuleModel:
    """Build a registered model, e.g. ``create_model("capsnet", routing_iterations=2)``.

    Every classifier accepts ``in_shape=(C, H, W)`` and ``num_classes``; every segmentation
    model accepts ``in_channels``, ``num_classes`` and ``spatial_dims``-sized inputs.

    ``pretrained=True`` loads the model's published weights (shipped, or downloaded once
    into the cache and verified), ``pretrained="NAME"`` a named set of weights and
    ``pretrained="FILE.safetensors"`` a local copy of the published file; see
    :mod:`torchcaps.models.pretrained` (``cache_dir=``, ``mirror=`` go there too).
    """
    if pretrained is not False:
        from .pretrained import load_pretrained

        return load_pretrained(name, pretrained, **kwargs)
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
