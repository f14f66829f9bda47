"""Model registry: ``@register_model``, ``create_model(name, **kwargs)``, ``list_models()``."""

from __future__ import annotations

from .._registry import Registry, UnknownNameError
from ._base import CapsuleModel

__all__ = ["register_model", "create_model", "list_models", "UnknownNameError"]

_MODELS = Registry("model")


def register_model(fn):
    """Register a model builder under its function name (duplicates raise)."""
    return _MODELS.register()(fn)


def create_model(name: str, **kwargs) -> CapsuleModel:
    """Build a registered model, e.g. ``create_model("capsnet", routing_iterations=2)``.

    Every builder accepts ``in_shape=(C, H, W)`` and ``num_classes``.
    """
    return _MODELS.get(name)(**kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models, optionally filtered by a glob pattern (``"caps*"``)."""
    return _MODELS.names(pattern)
