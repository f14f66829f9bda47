"""The five-layer cluster-routing capsule network of Zhao & Cheng 2021 ("Capsule networks
with non-iterative cluster routing", Neural Networks 143; arXiv 2109.09213; official code
github.com/ZHAOZHIHAO/ClusterRouting, ``CapsuleNetwork`` in ``src/capsule_network.py``).

Five :class:`~torchcaps.layers.cluster.ClusterConvCaps` layers (3x3 convolutions, padding
1, K votes per cluster, LayerNorm), no separate convolutional stem: the first capsule
layer convolves the image itself, once per capsule channel. For MNIST (28x28x1) with the
defaults ``C=4, K=5, D=6``:

    layer  children -> parents  stride  output (B, C, D, H, W)
    caps1  image (1 ch) -> 4    1       (B, 4, 6, 28, 28)
    caps2  4 -> 4               2       (B, 4, 6, 14, 14)
    caps3  4 -> 4               1       (B, 4, 6, 14, 14)
    caps4  4 -> 4               2       (B, 4, 6, 7, 7)
    caps5  4 -> 10 classes      1       (B, 10, 6, 7, 7)
    head   one Linear(6*7*7 -> 1) shared by the 10 class channels -> logits (B, 10)
    loss   cross-entropy on the logits (no margin loss, no squash, no decoder)

Parameter counts at 28x28x1, 10 classes:

    ==================  ===========  ===========  =========  =====  ========================
    setting             total        convs        LayerNorm  head   official code's count
    ==================  ===========  ===========  =========  =====  ========================
    C=4, K=5, D=6       165,583      150,000      15,288     295    264,583
    C=4, K=8, D=24      3,759,481    3,697,152    61,152     1,177  6,259,321
    ==================  ===========  ===========  =========  =====  ========================

The official code counts more because its class layer builds ``C_out = 10``
convolutions but only ever uses ``C_in = 4`` of them (6 unused filter banks; they get no
gradient); this model does not have them. Which convention the paper's parameter counts
follow was not reachable from here (**unverified**).

Checked against the official code (the paper body was not reachable from here):

* strides 1, 2, 1, 2, 1; spatial sizes S, S/2, S/2, S/4, S/4 (here from the conv formula,
  so odd sizes work too).
* the head: the digest's "shared Linear on each class capsule" is, in the official code,
  ``nn.Linear(D * (S/4)**2, 1)`` applied to each class *channel* flattened over
  ``(D, H, W)``, i.e. shared across classes and spanning the whole grid, not a Linear over
  ``D`` at each position.
* loss ``F.cross_entropy(logits, target)``.
* training (official ``main.py``): SGD without momentum, lr 0.1, weight decay 5e-4,
  ``StepLR(step_size=100, gamma=0.1)`` per epoch, 300 epochs, batch 64; inputs normalised
  with the dataset mean/std; CIFAR-10: random crop 32 (pad 4), horizontal flip, colour
  jitter 0.2; SVHN: random crop 32 (pad 4); Fashion-MNIST: padded to 32x32, random crop
  (pad 4), colour jitter.

Settings per dataset (official README / ``main.py``): CIFAR-10 ``C=4, K=8, D=24`` (the
``main.py`` defaults, 32x32x3; README error 7.37%) and "quickly (less parameters)"
``C=4, K=5, D=6``; SVHN 3.37% and smallNORB 1.57% error are reported in the README
without their ``C, K, D``; Fashion-MNIST is padded to 32x32 by the official loader. The
paper's per-dataset table (Fashion-MNIST, SVHN, smallNORB settings and parameter counts)
was not reachable: **unverified**. The abstract names no MNIST result. The defaults here
are the official light setting ``C=4, K=5, D=6`` (forward+backward at batch 2 on CPU in a
fraction of a second); ``cluster_capsnet(cluster_size=8, dim=24)`` gives the CIFAR-10
setting (several times slower per image on CPU).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layers.cluster import ClusterConvCaps
from ._base import CapsuleModel, ModelOutput
from ._registry import ModelCfg, register_model

__all__ = ["ClusterCapsNet", "cluster_capsnet"]


class ClusterCapsNet(CapsuleModel):
    """Zhao & Cheng's cluster-routing capsule network.

    Args:
        in_shape: input image shape ``(C, H, W)``.
        num_classes: number of class capsule channels.
        channels: capsule channels ``C`` of the four hidden layers (4).
        cluster_size: votes per cluster ``K`` (5; 8 for the official CIFAR-10 setting).
        dim: capsule dimension ``D`` (6; 24 for the official CIFAR-10 setting).
        strides: strides of the five capsule layers ((1, 2, 1, 2, 1)).
        bias: convolution bias in every capsule layer (True).
        eps: variance epsilon of the routing (1e-8; 0 is the official formula).

    Shape:
        images ``(B, C, H, W)`` -> logits ``(B, num_classes)``; ``poses`` are the class
        channels flattened ``(B, num_classes, D*H'*W')``; ``couplings`` ``(B, C, num_classes)``
        are the last layer's routing weights averaged over ``(D, H', W')`` (sum to 1 over
        the ``C`` children).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        channels: int = 4,
        cluster_size: int = 5,
        dim: int = 6,
        strides: tuple[int, ...] = (1, 2, 1, 2, 1),
        bias: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(in_shape, num_classes)
        if len(strides) < 1:
            raise ValueError("strides must name at least one capsule layer")
        c_img, h, w = self.in_shape
        layers = []
        in_dim = c_img
        for n, stride in enumerate(strides):
            last = n == len(strides) - 1
            layer = ClusterConvCaps(
                in_caps=channels,
                in_dim=in_dim,
                out_caps=num_classes if last else channels,
                out_dim=dim,
                cluster_size=cluster_size,
                in_size=(h, w),
                stride=stride,
                bias=bias,
                eps=eps,
            )
            layers.append(layer)
            h, w = layer.out_size
            in_dim = dim
        self.caps = nn.ModuleList(layers)
        self.head = nn.Linear(dim * h * w, 1)  # shared by all class channels

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        u = images  # (B, C_img, H, W): the first layer's children all see the image
        for layer in self.caps[:-1]:
            u = layer(u)  # (B, C, D, H', W')
        poses, weights = self.caps[-1](u, return_weights=True)  # (B, J, D, h, w)
        poses = poses.flatten(2)  # (B, J, D*h*w)
        logits = self.head(poses).squeeze(-1)  # (B, J)
        couplings = weights.flatten(3).mean(dim=3)  # (B, C, J, D, h, w) -> (B, C, J)
        return ModelOutput(logits=logits, poses=poses, couplings=couplings)

    def loss(self, out: ModelOutput, images: torch.Tensor, labels: torch.Tensor):
        ce = F.cross_entropy(out.logits, labels)
        return ce, {"cross_entropy": ce.detach()}


@register_model(default_cfg=ModelCfg(
    # batch 64 as the official main.py; Adam 1e-3 (TrainConfig's default) in place of its SGD
    # 0.1 schedule of 300 epochs
    recipe={"batch_size": 64},
    paper={"mnist": "none on MNIST (Fashion-MNIST, CIFAR-10, SVHN, smallNORB)"},
    citation="Zhao, Cheng 2021, Capsule networks with non-iterative cluster routing "
             "(Neural Networks 143)"))
def cluster_capsnet(**kwargs) -> ClusterCapsNet:
    """Zhao & Cheng 2021 cluster-routing CapsNet: 165,583 parameters at 28x28x1 (C=4, K=5, D=6)."""
    return ClusterCapsNet(**kwargs)
