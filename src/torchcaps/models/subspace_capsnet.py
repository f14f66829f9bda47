"""A small subspace capsule classifier (Edraki, Rahnavard, Shah, AAAI 2020, "Subspace Capsule
Network", arXiv 2002.02924); layers in :mod:`torchcaps.layers.subspace`.

The paper's classification network (the semi-supervised SVHN discriminator, as described in
the caption of its Figure 2: "features are extracted using 6 convolutional layers, followed by
3 subspace capsule convolution (SC-conv) layers each with 64 subspace capsule types, one
subspace capsule mean pool (SC-mean pool) layer and final subspace capsule fully connected
(SC-FC) layer with 10 capsule types") is followed in spirit at a CPU-friendly size:

    Conv 3x3  32, s1, BN, ReLU          (B, 1, 28, 28) -> (B, 32, 28, 28)
    Conv 3x3  32, s2, BN, ReLU                         -> (B, 32, 14, 14)
    Conv 3x3  64, s1, BN, ReLU                         -> (B, 64, 14, 14)
    Conv 3x3  64, s2, BN, ReLU                         -> (B, 64,  7,  7)
    SC-conv 3x3, 16 types x 8D, Eq. (4)                -> (B, 16, 8, 7, 7)
    SC-conv 3x3, 16 types x 8D, Eq. (4)                -> (B, 16, 8, 7, 7)
    SC-mean pool (mean of each capsule over positions) -> (B, 16, 8) -> (B, 128)
    SC-FC 10 types x 16D, no activation                -> (B, 10, 16); logits = |u_k|

Each SC-conv output ``(B, J, C, H, W)`` is read as ``J*C`` channels by the next layer. The
class scores are the class-capsule lengths ``|u_k| = |P_k x|`` (Eq. 3), the lengths of the
projections of the pooled feature onto the ten class subspaces; the official code
(``MarziEd/SubSpace-Capsule-Network``, ``dense_caps``) also scores with
``sqrt(x^T W (W^T W)^-1 W^T x + eps)`` and no activation on that layer.

Our choices, not taken from the paper (whose body text could not be retrieved here): the
backbone widths and depth (4 convolutions instead of 6), 2 SC-conv layers of 16 types x 8D
instead of 3 of 64 types (the capsule dimension of that discriminator is not in the
caption), a 16D class subspace, SC-mean pool read as the spatial mean of each capsule
vector, and the loss. The default loss is the margin loss of Sabour et al. (m+ 0.9, m- 0.1,
lambda 0.5) on the class-capsule lengths; ``loss="cross_entropy"`` uses softmax cross-entropy
on the lengths instead, as CapProNet (Zhang, Edraki, Qi 2018), the predecessor of this
paper, does with its capsule-projection lengths. Which of the two the paper's supervised
experiments used is unverified.

Parameter count at 28x28x1, 10 classes (all trainable; BN running statistics are buffers):

    ===================  ==============================  =======
    conv1 + bn1          9*1*32 + 32 + 2*32              384
    conv2 + bn2          9*32*32 + 32 + 2*32             9,312
    conv3 + bn3          9*32*64 + 64 + 2*64             18,624
    conv4 + bn4          9*64*64 + 64 + 2*64             37,056
    SC-conv 1            16 * (64*9) * 8 + 16 (b)        73,744
    SC-conv 2            16 * (128*9) * 8 + 16 (b)       147,472
    SC-FC                10 * 128 * 16                   20,480
    total                                                307,072
    ===================  ==============================  =======

At inference (``eval()``) each subspace layer uses its cached folded weight
``M_j = (W_j^T W_j)^(-1/2) W_j^T``, so the network costs what the same plain CNN costs;
:meth:`SubspaceCapsNet.fold` returns a copy whose subspace layers are plain convolutions
and a plain linear layer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import margin_loss
from ..layers.subspace import SubspaceCaps, SubspaceConvCaps
from ._base import CapsuleModel, ModelOutput, class_capsule_output
from ._registry import ModelCfg, register_model

__all__ = ["SubspaceCapsNet", "subspace_capsnet"]

_LOSSES = ("margin", "cross_entropy")


class SubspaceCapsNet(CapsuleModel):
    """Conv backbone -> SC-conv layers -> SC-mean pool -> SC-FC class capsules.

    Args:
        in_shape: input image shape ``(C, H, W)``.
        num_classes: class capsule types ``K``.
        channels: widths of the backbone convolutions (3x3, padding 1); odd-numbered ones
            (the 2nd, 4th, ...) have stride 2.
        sc_types: capsule types of each SC-conv layer (one entry per layer).
        sc_dim: subspace dimension of the SC-conv capsules.
        class_dim: subspace dimension of the class capsules (at most ``sc_types[-1]*sc_dim``).
        threshold_init: initial ``b`` of the capsule activation, Eq. (4) (0.3).
        loss: ``"margin"`` (default) or ``"cross_entropy"`` on the class-capsule lengths.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 32, 64, 64),
        sc_types: tuple[int, ...] = (16, 16),
        sc_dim: int = 8,
        class_dim: int = 16,
        threshold_init: float = 0.3,
        loss: str = "margin",
    ) -> None:
        super().__init__(in_shape, num_classes)
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        if len(channels) < 1 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be positive widths, got {channels!r}")
        if len(sc_types) < 1 or any(int(t) < 1 for t in sc_types):
            raise ValueError(f"sc_types must be positive counts, got {sc_types!r}")
        self.loss_type = loss
        c, h, w = self.in_shape
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            stride = 2 if i % 2 else 1
            layers += [nn.Conv2d(c, width, 3, stride, 1), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            c, h, w = width, (h - 1) // stride + 1, (w - 1) // stride + 1
        self.backbone = nn.Sequential(*layers)
        self.sc_conv = nn.ModuleList()
        for types in sc_types:
            self.sc_conv.append(SubspaceConvCaps(c, types, sc_dim, kernel_size=3, padding=1,
                                                 threshold_init=threshold_init))
            c = types * sc_dim  # next layer reads (J, C) as J*C channels
        self.sc_fc = SubspaceCaps(c, num_classes, class_dim, activation=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        x = self.backbone(images)  # (B, 64, 7, 7)
        for layer in self.sc_conv:
            v = layer(x)  # (B, J, C, 7, 7)
            x = v.flatten(1, 2)  # (B, J*C, 7, 7)
        pooled = v.mean(dim=(3, 4)).flatten(1)  # SC-mean pool: (B, J, C) -> (B, J*C)
        poses = self.sc_fc(pooled)  # (B, K, class_dim)
        return class_capsule_output(poses, None, None, labels, self.training)

    def loss(self, out, images, labels):
        if self.loss_type == "margin":
            value = margin_loss(out.logits, labels)
        else:
            value = F.cross_entropy(out.logits, labels)
        return value, {self.loss_type: value.detach()}

    def fold(self) -> SubspaceCapsNet:
        """An eval-mode copy whose subspace layers are plain ``nn.Conv2d`` / ``nn.Linear``."""
        model = copy.deepcopy(self).eval()
        model.sc_conv = nn.ModuleList(layer.fold() for layer in model.sc_conv)
        model.sc_fc = model.sc_fc.fold()
        return model


@register_model(default_cfg=ModelCfg(
    recipe={"batch_size": 64},  # the paper gives no MNIST recipe; TrainConfig's defaults otherwise
    paper={"mnist": "none on MNIST verified here"},
    citation="Edraki, Rahnavard, Shah 2020, Subspace Capsule Network (AAAI)"))
def subspace_capsnet(**kwargs) -> SubspaceCapsNet:
    """Subspace capsule classifier (Edraki et al. 2020), 307,072 parameters at 28x28x1."""
    return SubspaceCapsNet(**kwargs)
