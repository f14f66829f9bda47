"""torchcaps: capsule networks for PyTorch.

Public surface::

    import torchcaps
    model = torchcaps.create_model("capsnet")
    torchcaps.list_models(), torchcaps.list_routings()
    routing = torchcaps.create_routing("dynamic", iterations=3)

The subpackages and names below are imported on first use (PEP 562), so that importing
``torchcaps`` (as the ``torchcaps`` command does before it parses its arguments) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_SUBMODULES = ("data", "functional", "layers", "models", "routing")

#: public name -> the submodule that defines it
_EXPORTS = {
    "capsule_length": "functional",
    "margin_loss": "functional",
    "reconstruction_loss": "functional",
    "squash": "functional",
    "squash_exp": "functional",
    "CapsuleModel": "models",
    "ModelOutput": "models",
    "create_model": "models",
    "list_models": "models",
    "register_model": "models",
    "RoutingOutput": "routing",
    "create_routing": "routing",
    "list_routings": "routing",
    "register_routing": "routing",
}

__all__ = [
    "CapsuleModel",
    "ModelOutput",
    "RoutingOutput",
    "capsule_length",
    "create_model",
    "create_routing",
    "data",
    "functional",
    "layers",
    "list_models",
    "list_routings",
    "margin_loss",
    "models",
    "reconstruction_loss",
    "register_model",
    "register_routing",
    "routing",
    "squash",
    "squash_exp",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from . import data, functional, layers, models, routing
    from .functional import capsule_length, margin_loss, reconstruction_loss, squash, squash_exp
    from .models import CapsuleModel, ModelOutput, create_model, list_models, register_model
    from .routing import RoutingOutput, create_routing, list_routings, register_routing


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
