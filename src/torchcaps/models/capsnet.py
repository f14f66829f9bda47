"""CapsNet, the MNIST architecture of Sabour, Frosst, Hinton 2017 (arXiv 1710.09829).

    Conv1      256 x 9x9, stride 1, ReLU             (B, 1, 28, 28) -> (B, 256, 20, 20)
    PrimaryCaps 32 types x 8D, 9x9, stride 2, squash  -> (B, 1152, 8)
    DigitCaps  10 x 16D, dynamic routing (3 iters)    -> (B, 10, 16)
    Decoder    FC 512 -> 1024 -> 784 sigmoid          -> (B, 1, 28, 28)

Parameter count for MNIST: 8,215,568 with the decoder (6,804,224 without),
matching the paper's "about 8.2M / 6.8M". Loss: margin loss + 0.0005 * SSE.
"""

from __future__ import annotations

import torch

from ..layers import CapsLinear, CapsuleDecoder, Conv2d, PrimaryCaps
from ..routing import list_routings, routing_options
from ._base import (
    CapsuleModel,
    ModelOutput,
    class_capsule_output,
    margin_reconstruction_loss,
    shape_error,
)
from ._registry import ModelCfg, register_model

__all__ = ["CapsNet", "capsnet"]


class CapsNet(CapsuleModel):
    """Sabour et al. CapsNet with a pluggable routing algorithm.

    Args:
        in_shape: input image shape ``(C, H, W)``.
        num_classes: number of class capsules.
        conv_channels: channels of the first convolution (256).
        primary_types: primary capsule types (32).
        primary_dim: primary capsule dimension (8).
        class_dim: class capsule dimension (16).
        routing: routing algorithm name ("dynamic").
        routing_iterations: iterations (3).
        routing_kwargs: other routing options (``leaky``, ``detach_inner``, ``bias``).
        reconstruction: add the decoder and its loss.
        recon_weight: reconstruction loss weight on the sum of squared errors (0.0005).
        primary_restraint: ``None`` (the paper's network), ``"power"``, ``"topk"`` or
            ``"gate"``: restrain the primary capsules before they vote, this project's
            interpretation of Yang & Wang 2019 (see :mod:`torchcaps.layers.primary`).
        primary_restraint_kwargs: options of the restraint (e.g. ``{"p": 2}``, ``{"k": 4}``).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        conv_channels: int = 256,
        primary_types: int = 32,
        primary_dim: int = 8,
        class_dim: int = 16,
        routing: str = "dynamic",
        routing_iterations: int = 3,
        routing_kwargs: dict | None = None,
        reconstruction: bool = True,
        recon_weight: float = 0.0005,
        primary_restraint: str | None = None,
        primary_restraint_kwargs: dict | None = None,
    ) -> None:
        super().__init__(in_shape, num_classes)
        c, h, w = self.in_shape
        self.conv1 = Conv2d(c, conv_channels, kernel_size=9)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, kernel_size=9, stride=2,
                                   restraint=primary_restraint,
                                   restraint_kwargs=primary_restraint_kwargs)
        if h < 17 or w < 17:  # 9x9 convolution, then 9x9 stride-2 primary capsules
            raise shape_error("capsnet", self.in_shape,
                              f"input {h}x{w} is too small (needs at least 17x17)")
        n_primary = self.primary.num_capsules(h - 8, w - 8)
        # iterations only for the algorithms that iterate (cluster routing, for one, does not)
        kwargs = dict(routing_kwargs or {})
        if routing in list_routings() and "iterations" in routing_options(routing):
            kwargs.setdefault("iterations", routing_iterations)
        self.digit = CapsLinear(n_primary, primary_dim, num_classes, class_dim, routing, kwargs)
        self.decoder = CapsuleDecoder(num_classes, class_dim, self.in_shape) if reconstruction else None
        self.recon_weight = recon_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        x = torch.relu(self.conv1(images))  # (B, 256, 20, 20)
        u = self.primary(x)  # (B, 1152, 8)
        routed = self.digit(u)  # poses (B, 10, 16), couplings (B, 1152, 10)
        return class_capsule_output(routed.poses, routed.couplings, self.decoder, labels,
                                    self.training)

    def loss(self, out, images, labels):
        return margin_reconstruction_loss(out, images, labels, self.recon_weight)


@register_model(default_cfg=ModelCfg(
    # TrainConfig's defaults are this paper's: Adam 1e-3 decayed x0.96 per 2,000 steps, batch 128
    recipe={},
    paper={"mnist": "99.75% (0.25% error, Sabour et al. 2017, 3 iterations, with reconstruction)"},
    citation="Sabour, Frosst, Hinton 2017, Dynamic Routing Between Capsules (NeurIPS)"))
def capsnet(**kwargs) -> CapsNet:
    """Sabour et al. 2017 MNIST CapsNet: 8,215,568 parameters (with decoder) at 28x28x1."""
    return CapsNet(**kwargs)
