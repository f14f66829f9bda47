"""U-Net baselines for segmentation: thin wrappers around MONAI's ``UNet``.

The 2D baseline (``unet2d``) has the widths of the classic U-Net (Ronneberger et al. 2015;
64, 128, 256, 512, 1024), the CNN SegCaps is compared with (LaLonde & Bagci 2018 report
31M parameters for it; the authors' Keras U-Net has 31,030,593). MONAI's version differs
in its blocks: strided convolutions instead of max pooling, instance norm and PReLU, and with
``num_res_units=2`` two residual convolution units per level; for one input channel and two
classes it has 25,970,809 parameters (10,548,426 with ``num_res_units=0``, one convolution
per level).

The 3D baseline (``unet3d``) has small widths (16, 32, 64, 128; 1,186,765 parameters for one
channel and two classes), of the order of a 3D capsule U-Net, for a size-matched comparison.

Loss: MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True)``, soft Dice plus cross-entropy.
"""

from __future__ import annotations

import math

import torch

from ._registry import register_model
from .segmentation import SegmentationModel, SegmentationOutput

__all__ = ["UNet", "unet2d", "unet3d"]


class UNet(SegmentationModel):
    """MONAI's ``UNet`` under the :class:`SegmentationModel` contract.

    Args:
        in_channels: image channels ``C``.
        num_classes: classes ``K`` (background included).
        spatial_dims: 2 or 3.
        channels: widths of the levels, top to bottom.
        strides: downsampling factor between consecutive levels (``len(channels) - 1``).
        num_res_units: residual units per block (MONAI); 2 gives two convolutions per level.
        dropout: dropout probability in the blocks.

    Shape:
        ``(B, C, *S)`` with every size a multiple of ``prod(strides)`` -> logits ``(B, K, *S)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 2,
        channels: tuple[int, ...] = (64, 128, 256, 512, 1024),
        strides: tuple[int, ...] | None = None,
        num_res_units: int = 2,
        dropout: float = 0.0,
    ) -> None:
        from monai.losses import DiceCELoss
        from monai.networks.nets import UNet as MonaiUNet

        channels = tuple(channels)
        strides = (2,) * (len(channels) - 1) if strides is None else tuple(strides)
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(f"need at least 2 channel widths and one stride fewer than widths; got "
                             f"channels={channels}, strides={strides}")
        super().__init__(in_channels, num_classes, spatial_dims, size_multiple=math.prod(strides))
        self.net = MonaiUNet(spatial_dims=spatial_dims, in_channels=in_channels,
                             out_channels=num_classes, channels=channels, strides=strides,
                             num_res_units=num_res_units, dropout=dropout)
        self.criterion = DiceCELoss(softmax=True, to_onehot_y=True)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        self.check_input(images, labels)
        return SegmentationOutput(logits=self.net(images))  # (B, K, *S)

    def loss(self, out: SegmentationOutput, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MONAI ``DiceCELoss`` on the logits and the labels ``(B, *S)``."""
        self.check_input(images, labels)
        loss = self.criterion(out.logits, labels.unsqueeze(1).long())
        return loss, {"dice_ce": loss.detach()}


@register_model(task="segmentation")
def unet2d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> UNet:
    """2D U-Net with the classic widths (64 ... 1024); 25,970,809 parameters for 1 channel, 2 classes."""
    return UNet(in_channels=in_channels, num_classes=num_classes, spatial_dims=2, **kwargs)


@register_model(task="segmentation")
def unet3d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> UNet:
    """3D U-Net with widths (16, 32, 64, 128); 1,186,765 parameters for 1 channel, 2 classes."""
    kwargs.setdefault("channels", (16, 32, 64, 128))
    return UNet(in_channels=in_channels, num_classes=num_classes, spatial_dims=3, **kwargs)
