"""Model architectures and the model registry."""

from ._base import CapsuleModel, ModelOutput
from ._registry import create_model, list_models, register_model
from .capsnet import CapsNet
from .cluster_capsnet import ClusterCapsNet
from .cnn_baseline import CNNBaseline
from .efficient_capsnet import EfficientCapsNet
from .em_capsnet import EMCapsNet
from .inverted_attention import InvertedAttentionCapsNet
from .res_capsnet import ResCapsNet
from .subspace_capsnet import SubspaceCapsNet
from .vb_capsnet import VBCapsNet

__all__ = [
    "CapsuleModel",
    "ModelOutput",
    "create_model",
    "list_models",
    "register_model",
    "CapsNet",
    "ClusterCapsNet",
    "CNNBaseline",
    "EfficientCapsNet",
    "EMCapsNet",
    "InvertedAttentionCapsNet",
    "ResCapsNet",
    "SubspaceCapsNet",
    "VBCapsNet",
]
