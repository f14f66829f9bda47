"""torchcaps: capsule networks for PyTorch.

Public surface::

    import torchcaps
    model = torchcaps.create_model("capsnet")
    torchcaps.list_models(), torchcaps.list_routings()
    routing = torchcaps.create_routing("dynamic", iterations=3)
"""

from . import data, functional, layers, models, routing
from .functional import capsule_length, margin_loss, reconstruction_loss, squash, squash_exp
from .models import CapsuleModel, ModelOutput, create_model, list_models, register_model
from .routing import RoutingOutput, create_routing, list_routings, register_routing

__version__ = "0.1.0"

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
