"""Matrix capsules with Variational Bayes routing (De Sousa Ribeiro, Leontidis, Kollias 2020,
"Capsule Routing via Variational Bayes", AAAI 2020, arXiv 1905.11455), the three-capsule-layer
network of the authors' official code (``src/capsnet.py``, ``CapsuleNet``; read, not copied).

    Conv1        A x 5x5, stride 2, no bias, BatchNorm, ReLU  (B, 1, 28, 28) -> (B, A, 12, 12)
    PrimaryCaps  B types, 1x1: 4x4 pose + sigmoid a           -> poses (B, B, 12, 12, 16)
    ConvCaps1    C types, 3x3, stride 2, VB (3 iters)         -> (B, C, 5, 5, 16)
    ConvCaps2    D types, 3x3, stride 1, VB (3 iters)         -> (B, D, 3, 3, 16)
    ClassCaps    one per class, W shared per type, coordinate addition, VB -> (B, E, 16)

After every routed layer, as in the official ``VariationalBayesRouting2d``: the activation
logits ``beta_a - (exp(E[ln pi_j]) H_j + beta_u)`` go through a non-affine ``BatchNorm`` over
the batch (per parent type) and then the sigmoid, and the posterior-mean poses through a
non-affine ``BatchNorm`` (per parent type, over the batch, the 16 pose elements and the grid).
:mod:`torchcaps.routing.vb` itself leaves both out, so that routing treats each sample alone;
the model adds them. In evaluation mode both use running statistics.

Also as in the official layers: the primary capsules normalise their poses and activation
logits with affine ``BatchNorm`` and use Xavier-uniform convolutions; the 4x4 transforms are
drawn with std ``sqrt(2 / (fan_in + fan_out))``, ``fan = types * K * K * 16`` (the official
``xavier`` scheme; normal here, uniform there); coordinate addition adds a hundredth of the grid
coordinates (the official code adds ``(index + 1) / (100 F)``; ours ``(index + 0.5) / (100 F)``).

Defaults are the official ``--arch 64 8 16 16`` (A=64, B=8, C=16, D=16) with 3 routing
iterations and the README priors (``alpha0=1, m0=0, kappa0=1, Psi0=I, nu0=17``). The official
convolutional routing normalises each child over the parent types of one window
(``per_window=True`` here, the default, to match); ``per_window=False`` normalises over every
parent a child reaches across overlapping windows, as :class:`~torchcaps.models.EMCapsNet` does.

Loss: cross-entropy on the class activations, as the official ``train.py``
(``F.cross_entropy(yhat, labels)`` with ``yhat`` the sigmoid outputs); ``loss="spread"`` uses
the spread loss of Hinton et al. instead (fixed margin ``spread_margin``). ``logits`` are the
class activations ``a_j`` in (0, 1).

What could not be checked: the paper's own description of this network (only its abstract is
reachable here, see :mod:`torchcaps.routing.vb`); the parameter counts the paper reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tF
from torch import nn

from .. import functional as F
from ..layers.conv2d import Conv2d
from ..layers.matrix import ClassMatCaps, ConvMatCaps, PrimaryMatCaps
from ._base import CapsuleModel, ModelOutput, shape_error
from ._registry import ModelCfg, register_model

__all__ = ["VBCapsNet", "vb_capsnet"]


def _xavier_std(in_types: int, out_types: int, kernel: int) -> float:
    return math.sqrt(2.0 / ((in_types + out_types) * kernel * kernel * 16))


class VBCapsNet(CapsuleModel):
    """Matrix capsules with Variational Bayes routing in every capsule layer.

    Args:
        in_shape: input image shape ``(C, H, W)``.
        num_classes: class capsules ``E``.
        conv_channels: ``A`` (64).
        primary_types: ``B`` (8).
        caps1_types: ``C`` (16).
        caps2_types: ``D`` (16).
        iterations: VB iterations in every routed layer (3).
        per_window: normalise couplings per window (official code, True) or over every parent
            a child reaches (False).
        coord_addition: coordinate addition in the class layer (True).
        routing_kwargs: VB priors (``alpha0``, ``kappa0``, ``psi0``, ``nu0``, ``m0``).
        loss: ``"cross_entropy"`` (official) or ``"spread"``.
        spread_margin: margin of the spread loss when ``loss="spread"`` (0.9).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        conv_channels: int = 64,
        primary_types: int = 8,
        caps1_types: int = 16,
        caps2_types: int = 16,
        iterations: int = 3,
        per_window: bool = True,
        coord_addition: bool = True,
        routing_kwargs: dict | None = None,
        loss: str = "cross_entropy",
        spread_margin: float = 0.9,
    ) -> None:
        super().__init__(in_shape, num_classes)
        if loss not in ("cross_entropy", "spread"):
            raise ValueError(f"loss must be 'cross_entropy' or 'spread', got {loss!r}")
        c, h, w = self.in_shape
        h1, w1 = (h - 5) // 2 + 1, (w - 5) // 2 + 1
        h2, w2 = (h1 - 3) // 2 + 1, (w1 - 3) // 2 + 1
        if min(h2 - 2, w2 - 2) < 1:
            raise shape_error("vb_capsnet", self.in_shape, f"input {h}x{w} is too small (the "
                              "5x5/2 convolution and two 3x3 capsule layers need at least 17x17)")
        vb = {"routing": "vb", "routing_kwargs": routing_kwargs, "logits": True,
              "per_window": per_window}
        self.conv1 = Conv2d(c, conv_channels, kernel_size=5, stride=2, bias=False)
        nn.init.kaiming_uniform_(self.conv1.weight)
        self.bn1 = nn.BatchNorm2d(conv_channels)
        self.primary = PrimaryMatCaps(conv_channels, primary_types, kernel_size=1,
                                      batch_norm=True)
        for conv in (self.primary.pose, self.primary.activation):
            nn.init.xavier_uniform_(conv.weight)
        # transforms: the official "xavier" std sqrt(2 / (fan_in + fan_out)) with
        # fan = types * K * K * 16 (drawn from a normal here, the official 'xavier_normal')
        self.caps1 = ConvMatCaps(primary_types, caps1_types, 3, 2, iterations,
                                 init_std=_xavier_std(primary_types, caps1_types, 3), **vb)
        self.caps2 = ConvMatCaps(caps1_types, caps2_types, 3, 1, iterations,
                                 init_std=_xavier_std(caps1_types, caps2_types, 3), **vb)
        # class layer: one transform per type shared over the h2 x w2 grid, whose size is the
        # official kernel; coordinates (grid centres) scaled by 1/100 like the official ones
        self.classes = ClassMatCaps(caps2_types, num_classes, iterations, coord_addition,
                                    init_std=_xavier_std(caps2_types, num_classes, h2 - 2),
                                    routing_kwargs={**(routing_kwargs or {}), "logits": True},
                                    routing="vb", coord_scale=0.01)
        # the official non-affine BatchNorms on activation logits (a) and poses (v)
        self.bn_a1 = nn.BatchNorm2d(caps1_types, affine=False)
        self.bn_v1 = nn.BatchNorm3d(caps1_types, affine=False)
        self.bn_a2 = nn.BatchNorm2d(caps2_types, affine=False)
        self.bn_v2 = nn.BatchNorm3d(caps2_types, affine=False)
        self.bn_a3 = nn.BatchNorm1d(num_classes, affine=False)
        self.bn_v3 = nn.BatchNorm1d(num_classes, affine=False)
        self.loss_name, self.spread_margin = loss, spread_margin

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        if self.training and images.shape[0] < 2:
            raise ValueError("VBCapsNet normalises the class activations over the batch "
                             "(BatchNorm) while training: use at least 2 images per batch, or "
                             "call .eval()")
        x = torch.relu(self.bn1(self.conv1(images)))  # (B, A, 12, 12)
        caps = self.primary(x)  # poses (B, B, 12, 12, 16), activations (B, B, 12, 12)
        caps = self.caps1(caps.poses, caps.activations)  # logits (B, C, 5, 5)
        poses, acts = self.bn_v1(caps.poses), torch.sigmoid(self.bn_a1(caps.activations))
        caps = self.caps2(poses, acts)  # (B, D, 3, 3, 16), logits (B, D, 3, 3)
        poses, acts = self.bn_v2(caps.poses), torch.sigmoid(self.bn_a2(caps.activations))
        out = self.classes(poses, acts)  # poses (B, E, 16), logits (B, E)
        activations = torch.sigmoid(self.bn_a3(out.activations))  # (B, E)
        return ModelOutput(activations, self.bn_v3(out.poses), None, out.couplings)

    def loss(self, out, images, labels):
        if self.loss_name == "spread":
            value = F.spread_loss(out.logits, labels, self.spread_margin)
            return value, {"spread": value.detach()}
        value = tF.cross_entropy(out.logits.float(), labels)
        return value, {"cross_entropy": value.detach()}


@register_model(default_cfg=ModelCfg(
    recipe={"batch_size": 128},  # official main.py: Adam 1e-3, batch 128
    paper={"mnist": "none verified (the paper reports smallNORB etc.; its MNIST figure was not read)"},
    citation="De Sousa Ribeiro, Leontidis, Kollias 2020, Capsule Routing via Variational Bayes "
             "(AAAI)"))
def vb_capsnet(**kwargs) -> VBCapsNet:
    """De Sousa Ribeiro et al. 2020 VB-routing capsule net, official arch A=64, B=8, C=D=16."""
    return VBCapsNet(**kwargs)
