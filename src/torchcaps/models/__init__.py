"""Model architectures and the model registry."""

from ._base import CapsuleModel, ModelOutput
from ._registry import ModelCfg, create_model, get_model_cfg, list_models, model_task, register_model
from .capsnet import CapsNet
from .cluster_capsnet import ClusterCapsNet
from .cnn_baseline import CNNBaseline
from .efficient_capsnet import EfficientCapsNet
from .em_capsnet import EMCapsNet
from .gan import GANPair
from .inverted_attention import InvertedAttentionCapsNet
from .res_capsnet import ResCapsNet
from .segcaps import SegCaps
from .segmentation import SegmentationModel, SegmentationOutput
from .sparse_capsnet import SparseCapsNet
from .subspace_capsnet import SubspaceCapsNet
from .ucaps import UCaps3D
from .unet import UNet
from .vb_capsnet import VBCapsNet

__all__ = [
    "CapsuleModel",
    "ModelOutput",
    "ModelCfg",
    "create_model",
    "get_model_cfg",
    "list_models",
    "model_task",
    "SegmentationModel",
    "SegmentationOutput",
    "SegCaps",
    "UNet",
    "register_model",
    "CapsNet",
    "ClusterCapsNet",
    "CNNBaseline",
    "EfficientCapsNet",
    "EMCapsNet",
    "GANPair",
    "InvertedAttentionCapsNet",
    "ResCapsNet",
    "SparseCapsNet",
    "SubspaceCapsNet",
    "UCaps3D",
    "VBCapsNet",
]
