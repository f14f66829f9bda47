"""Model architectures and the model registry."""

from ._base import CapsuleModel, ModelOutput
from ._registry import create_model, list_models, register_model
from .capsnet import CapsNet
from .cluster_capsnet import ClusterCapsNet
from .efficient_capsnet import EfficientCapsNet
from .em_capsnet import EMCapsNet
from .inverted_attention import InvertedAttentionCapsNet

__all__ = [
    "CapsuleModel",
    "ModelOutput",
    "create_model",
    "list_models",
    "register_model",
    "CapsNet",
    "ClusterCapsNet",
    "EfficientCapsNet",
    "EMCapsNet",
    "InvertedAttentionCapsNet",
]
