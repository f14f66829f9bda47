"""Residual deep capsule network (Gugglberger, Peer, Rodriguez-Sanchez 2021, arXiv 2104.07393).

    Conv1        C x 9x9, stride 1, ReLU                 (B, 1, 28, 28) -> (B, C, 20, 20)
    PrimaryCaps  T types x 8D, 9x9, stride 2, squash     -> (B, T*6*6, 8)
    CapsStack    depth hidden layers of 32 x 8D, skip s  -> (B, 32, 8) per hidden layer
                 + class layer 10 x 16D                  -> (B, 10, 16)
    (Decoder     FC 512 -> 1024 -> 784 sigmoid, optional)

Loss: margin loss on the class-capsule lengths (+ ``recon_weight`` x SSE when
``reconstruction=True``). Logits are the class-capsule lengths.

The authors' code (``capsule/capsule_network.py``, see :mod:`torchcaps.layers.residual`)
uses ``channels * dim`` filters in the first convolution and ``channels`` primary types
(32 x 8D, i.e. 256 filters as in CapsNet), He-normal initialised convolutions, and the same
routing (2 iterations, per-parent bias 0.1) in every capsule layer. The default here keeps the
structure but is CPU-friendly: ``conv_channels=64`` and ``primary_types=8`` (288 primary
capsules instead of 1152). With the defaults (depth 3, dynamic routing, no decoder) the model
has **1,099,872** parameters: conv1 5,248, primary 331,840, capsule layers
590,080 + 65,792 + 65,792 + 41,120 (``W`` plus the routing biases).

Reconstruction is off by default; ``recon_weight`` defaults to Sabour et al.'s 0.0005 (the
authors' ``train.py`` defaults to 1e-5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import CapsuleDecoder, Conv2d, PrimaryCaps
from ..layers.residual import CapsStack
from ..routing import list_routings, routing_options
from ._base import (
    CapsuleModel,
    ModelOutput,
    class_capsule_output,
    margin_reconstruction_loss,
    shape_error,
)
from ._registry import ModelCfg, register_model

__all__ = ["ResCapsNet", "res_capsnet"]


def _he_normal_(conv: nn.Conv2d) -> None:
    """Keras ``he_normal``: normal truncated at 2 std, std ``sqrt(2 / fan_in) / 0.8796``; bias 0."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # corrects for the truncation
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResCapsNet(CapsuleModel):
    """Conv + primary capsules + a residual :class:`CapsStack` + class capsules.

    Args:
        in_shape: input image shape ``(C, H, W)``; needs ``H, W >= 25``.
        num_classes: class capsules.
        conv_channels: filters of the first convolution (64; 256 in the authors' code).
        primary_types: primary capsule types (8; 32 in the authors' code).
        primary_dim: primary capsule dimension (8).
        depth: hidden capsule layers (3).
        hidden_caps: capsules per hidden layer (32).
        hidden_dim: hidden capsule dimension (8).
        class_dim: class capsule dimension (16).
        skip: skip distance (2); ``0``/``None`` for a plain deep capsule network.
        routing: routing name for every capsule layer ("dynamic"; "scaled_distance", "em").
        routing_iterations: iterations (2, as in the paper's code).
        routing_kwargs: other routing options, over the authors' defaults (see CapsStack).
        init_std: std of the transformation matrices (0.2, authors' code).
        shortcut: ``"output"`` (authors) or ``"stream"`` (ResNet-style), see CapsStack.
        resquash: squash after adding a shortcut.
        reconstruction: add the decoder and its loss (off: cheaper).
        recon_weight: reconstruction weight on the sum of squared errors.
        primary_restraint: ``None`` (default), ``"power"``, ``"topk"`` or ``"gate"``: restrain
            the primary capsules (see :mod:`torchcaps.layers.primary`).
        primary_restraint_kwargs: options of the restraint.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        conv_channels: int = 64,
        primary_types: int = 8,
        primary_dim: int = 8,
        depth: int = 3,
        hidden_caps: int = 32,
        hidden_dim: int = 8,
        class_dim: int = 16,
        skip: int | None = 2,
        routing: str = "dynamic",
        routing_iterations: int = 2,
        routing_kwargs: dict | None = None,
        init_std: float = 0.2,
        shortcut: str = "output",
        resquash: bool = False,
        reconstruction: bool = False,
        recon_weight: float = 0.0005,
        primary_restraint: str | None = None,
        primary_restraint_kwargs: dict | None = None,
    ) -> None:
        super().__init__(in_shape, num_classes)
        c, h, w = self.in_shape
        if h < 17 or w < 17:  # 9x9 convolution, then 9x9 stride-2 primary capsules
            raise shape_error("res_capsnet", self.in_shape,
                              f"input {h}x{w} is too small (needs at least 17x17)")
        self.conv1 = Conv2d(c, conv_channels, kernel_size=9)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, kernel_size=9,
                                   stride=2, restraint=primary_restraint,
                                   restraint_kwargs=primary_restraint_kwargs)
        _he_normal_(self.conv1)
        _he_normal_(self.primary.conv)
        n_primary = self.primary.num_capsules(h - 8, w - 8)
        # iterations only for the algorithms that iterate (cluster routing, for one, does not)
        kwargs = dict(routing_kwargs or {})
        if routing in list_routings() and "iterations" in routing_options(routing):
            kwargs.setdefault("iterations", routing_iterations)
        self.caps = CapsStack(
            n_primary, primary_dim, num_classes, class_dim, depth=depth,
            hidden_caps=hidden_caps, hidden_dim=hidden_dim, skip=skip, routing=routing,
            routing_kwargs=kwargs, init_std=init_std, shortcut=shortcut, resquash=resquash,
        )
        self.decoder = CapsuleDecoder(num_classes, class_dim, self.in_shape) if reconstruction else None
        self.recon_weight = recon_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        x = torch.relu(self.conv1(images))  # (B, C, 20, 20)
        u = self.primary(x)  # (B, T*36, 8)
        routed = self.caps(u)  # poses (B, 10, 16), couplings (B, 32, 10)
        return class_capsule_output(routed.poses, routed.couplings, self.decoder, labels,
                                    self.training)

    def loss(self, out, images, labels):
        return margin_reconstruction_loss(out, images, labels, self.recon_weight)


@register_model(default_cfg=ModelCfg(
    recipe={"lr": 1e-4},  # Gugglberger et al. train with Adam 1e-4
    paper={"mnist": "reported in the paper (figure unverified: only the abstract was read)"},
    citation="Gugglberger, Peer, Rodriguez-Sanchez 2021, Training Deep Capsule Networks with "
             "Residual Connections (ICANN)"))
def res_capsnet(**kwargs) -> ResCapsNet:
    """Residual capsule network: 1,099,872 parameters at the defaults (28x28x1, depth 3)."""
    return ResCapsNet(**kwargs)
