"""Model architectures and the model registry."""

from ._base import CapsuleModel, ModelOutput
from ._registry import create_model, list_models, register_model
from .capsnet import CapsNet

__all__ = ["CapsuleModel", "ModelOutput", "create_model", "list_models", "register_model", "CapsNet"]
