"""SegCaps, the capsule U-Net of LaLonde & Bagci 2018 ("Capsules for Object Segmentation",
arXiv 1804.04241), as the authors' ``CapsNetR3`` (3 routing iterations).

Layers (``'same'`` padding throughout, TensorFlow's rule; caps = types x pose dimension; all
capsule layers are :class:`~torchcaps.layers.LocalConvCaps` / ``LocalDeconvCaps`` with one
kernel shared by the child types and a 0.1-initialised per-parent routing bias):

    ==============  ===========================  ==========  =====================
    layer           kernel / stride, routing     caps out    grid
    ==============  ===========================  ==========  =====================
    conv1           5x5 conv, 16 ch, ReLU        1 x 16      H x W
    primary_caps    5x5 / 2, 1 iteration         2 x 16      H/2
    conv_cap_2_1    5x5 / 1, 3                   4 x 16      H/2
    conv_cap_2_2    5x5 / 2, 3                   4 x 32      H/4
    conv_cap_3_1    5x5 / 1, 3                   8 x 32      H/4
    conv_cap_3_2    5x5 / 2, 3                   8 x 64      H/8
    conv_cap_4_1    5x5 / 1, 3                   8 x 32      H/8
    deconv_cap_1_1  4x4 / 2 transposed, 3        8 x 32      H/4, concat conv_cap_3_1 (16 types)
    deconv_cap_1_2  5x5 / 1, 3                   4 x 32      H/4
    deconv_cap_2_1  4x4 / 2 transposed, 3        4 x 16      H/2, concat conv_cap_2_1 (8 types)
    deconv_cap_2_2  5x5 / 1, 3                   4 x 16      H/2
    deconv_cap_3_1  4x4 / 2 transposed, 3        2 x 16      H, concat conv1 (3 types)
    seg_caps        1x1 / 1, 3                   1 x 16      H  (K x 16 for K > 2 classes)
    decoder         1x1 convs 64, 128 ReLU, C sigmoid, on seg_caps masked by the label
    ==============  ===========================  ==========  =====================

Output (paper Sec. 3): the length ``p = |v|`` of the segmentation capsule at each pixel is
the foreground probability. To meet the :class:`SegmentationModel` contract the binary model
returns the logits ``[log(1 - p), log(p)]`` with ``p`` clamped to ``[1e-7, 1 - 1e-7]`` (the
clip of the official loss), so that ``softmax`` gives back ``[1 - p, p]`` and ``argmax`` is
``p > 0.5``.

Loss, as the official training script for SegCaps (``--loss w_bce``, ``--recon_wei 0.1``):

    L = wBCE(p, y) + 0.1 * MSE(decoder(v * y), x * y)

``wBCE`` is ``-(w y log p + (1 - y) log(1 - p))`` averaged over pixels with ``w`` the
negative-to-positive pixel ratio (the official code computes it once over the training
slices that contain foreground; ``pos_weight=None`` here estimates it on each batch, a float
fixes it). The reconstruction (paper Sec. 3.3) decodes the segmentation capsules masked by
the ground truth and is compared with the image masked by the same label.

Parameter count for one input channel and two classes: 1,425,649 (1,416,112 without the
decoder), the paper's "1.4M", derived layer by layer from the official code: each capsule
layer has ``K*K*D_in*C*D_out`` kernel weights (independent of the child types, since the kernel
is shared) plus the ``C*D_out`` routing bias; conv1 416, capsule layers 12,832 + 25,664 +
51,328 + 205,056 + 410,112 + 409,856 + 131,328 + 102,528 + 32,832 + 25,664 + 8,224 + 272,
decoder 1,088 + 8,320 + 129.

This project's extensions, not in the paper: ``num_classes > 2`` uses one segmentation
capsule per class (background included), logits ``log(|v_k|)`` (the softmax normalises the
lengths, the argmax is the longest capsule) and a per-pixel margin loss (Sabour et al. 2017,
Eq. 4: ``m+ = 0.9, m- = 0.1, lambda = 0.5``, summed over classes, averaged over pixels; the
official ``margin_loss`` has the same margins and an extra factor 1/2); the decoder then
sees the capsule of the labelled class, the background capsule masked out.

Deviations: the squash and the length use ``sqrt(|v|^2 + 1e-8)`` (finite gradients at zero);
without labels the binary decoder sees the unmasked capsule, as the official eval model
(its ``Mask`` passes 5-D capsule tensors through unchanged), and the multi-class decoder the
capsule of the predicted class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import capsule_length, margin_loss
from ..layers import LocalConvCaps, LocalDeconvCaps
from ._registry import register_model
from .segmentation import SegmentationModel, SegmentationOutput

__all__ = ["SegCaps", "segcaps"]

#: clamp of the capsule length before logs (the official loss clips to [1e-7, 1 - 1e-7])
_EPS = 1e-7


def _he_normal_(conv: nn.Conv2d) -> None:
    """Keras ``he_normal``: normal truncated at 2 std, ``std = sqrt(2 / fan_in)``; zero bias."""
    std = math.sqrt(2.0 / (conv.in_channels * math.prod(conv.kernel_size)))
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)


class SegCaps(SegmentationModel):
    """SegCaps R3 (see the module docstring for the layer table, loss and checks).

    Args:
        in_channels: image channels ``C``.
        num_classes: ``K``; 2 is the paper's binary model (one foreground capsule).
        routing_iterations: iterations of every capsule layer but the primary one (3).
        primary_iterations: iterations of the primary capsules (1).
        share_weight: one kernel per layer shared by all child types (the paper); False:
            one per child type.
        reconstruction: add the masked reconstruction decoder and its loss.
        recon_weight: weight of the reconstruction MSE (0.1).
        pos_weight: weight of the foreground pixels in the binary cross-entropy; None:
            the batch's background-to-foreground pixel ratio (1 without foreground).

    Shape:
        images ``(B, C, H, W)`` with ``H, W`` multiples of 8 -> :class:`SegmentationOutput`
        with logits ``(B, K, H, W)``, reconstruction ``(B, C, H, W)`` and ``aux``
        ``{"lengths": (B, K', H, W), "poses": (B, K', H, W, 16)}`` (``K' = 1`` when ``K = 2``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        routing_iterations: int = 3,
        primary_iterations: int = 1,
        share_weight: bool = True,
        reconstruction: bool = True,
        recon_weight: float = 0.1,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, spatial_dims=2, size_multiple=8)
        if pos_weight is not None and not pos_weight > 0:
            raise ValueError(f"pos_weight must be positive or None, got {pos_weight!r}")
        self.recon_weight, self.pos_weight = float(recon_weight), pos_weight
        self.seg_types = 1 if num_classes == 2 else num_classes
        r, kw = routing_iterations, dict(share_weight=share_weight)
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)
        nn.init.xavier_uniform_(self.conv1.weight)  # Keras' default glorot_uniform, zero bias
        nn.init.zeros_(self.conv1.bias)
        self.primary_caps = LocalConvCaps(1, 16, 2, 16, 5, stride=2, routing_iterations=primary_iterations,
                                          **kw)
        self.conv_cap_2_1 = LocalConvCaps(2, 16, 4, 16, 5, routing_iterations=r, **kw)
        self.conv_cap_2_2 = LocalConvCaps(4, 16, 4, 32, 5, stride=2, routing_iterations=r, **kw)
        self.conv_cap_3_1 = LocalConvCaps(4, 32, 8, 32, 5, routing_iterations=r, **kw)
        self.conv_cap_3_2 = LocalConvCaps(8, 32, 8, 64, 5, stride=2, routing_iterations=r, **kw)
        self.conv_cap_4_1 = LocalConvCaps(8, 64, 8, 32, 5, routing_iterations=r, **kw)
        self.deconv_cap_1_1 = LocalDeconvCaps(8, 32, 8, 32, 4, stride=2, routing_iterations=r, **kw)
        self.deconv_cap_1_2 = LocalConvCaps(16, 32, 4, 32, 5, routing_iterations=r, **kw)
        self.deconv_cap_2_1 = LocalDeconvCaps(4, 32, 4, 16, 4, stride=2, routing_iterations=r, **kw)
        self.deconv_cap_2_2 = LocalConvCaps(8, 16, 4, 16, 5, routing_iterations=r, **kw)
        self.deconv_cap_3_1 = LocalDeconvCaps(4, 16, 2, 16, 4, stride=2, routing_iterations=r, **kw)
        self.seg_caps = LocalConvCaps(3, 16, self.seg_types, 16, 1, routing_iterations=r, **kw)
        self.decoder = None
        if reconstruction:
            self.decoder = nn.Sequential(
                nn.Conv2d(self.seg_types * 16, 64, 1), nn.ReLU(),
                nn.Conv2d(64, 128, 1), nn.ReLU(),
                nn.Conv2d(128, in_channels, 1), nn.Sigmoid(),
            )
            for m in self.decoder:
                if isinstance(m, nn.Conv2d):
                    _he_normal_(m)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        self.check_input(images, labels)
        x = torch.relu(self.conv1(images))  # (B, 16, H, W)
        conv1 = x.permute(0, 2, 3, 1).unsqueeze(1)  # (B, 1, H, W, 16): one capsule type
        primary = self.primary_caps(conv1).poses  # (B, 2, H/2, W/2, 16)
        c21 = self.conv_cap_2_1(primary).poses  # (B, 4, H/2, W/2, 16)
        c22 = self.conv_cap_2_2(c21).poses  # (B, 4, H/4, W/4, 32)
        c31 = self.conv_cap_3_1(c22).poses  # (B, 8, H/4, W/4, 32)
        c32 = self.conv_cap_3_2(c31).poses  # (B, 8, H/8, W/8, 64)
        c41 = self.conv_cap_4_1(c32).poses  # (B, 8, H/8, W/8, 32)
        up1 = torch.cat([self.deconv_cap_1_1(c41).poses, c31], 1)  # (B, 16, H/4, W/4, 32)
        d12 = self.deconv_cap_1_2(up1).poses  # (B, 4, H/4, W/4, 32)
        up2 = torch.cat([self.deconv_cap_2_1(d12).poses, c21], 1)  # (B, 8, H/2, W/2, 16)
        d22 = self.deconv_cap_2_2(up2).poses  # (B, 4, H/2, W/2, 16)
        up3 = torch.cat([self.deconv_cap_3_1(d22).poses, conv1], 1)  # (B, 3, H, W, 16)
        seg = self.seg_caps(up3).poses  # (B, K', H, W, 16)
        lengths = capsule_length(seg)  # (B, K', H, W)
        if self.seg_types == 1:
            p = lengths[:, 0].clamp(_EPS, 1 - _EPS)  # foreground probability
            logits = torch.stack([torch.log1p(-p), torch.log(p)], 1)  # (B, 2, H, W)
        else:
            logits = torch.log(lengths.clamp_min(_EPS))  # (B, K, H, W)
        recon = None
        if self.decoder is not None:
            mask = self._mask(labels) if labels is not None else self._predicted_mask(lengths)
            recon = self.reconstruct(seg, mask)
        return SegmentationOutput(logits=logits, reconstruction=recon,
                                  aux={"lengths": lengths, "poses": seg})

    def _mask(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, K', H, W)``: the capsule of each pixel's labelled class, none on background."""
        if self.seg_types == 1:
            return (labels == 1).unsqueeze(1)
        onehot = F.one_hot(labels.long(), self.num_classes).movedim(-1, 1)  # (B, K, H, W)
        onehot[:, 0] = 0
        return onehot

    def _predicted_mask(self, lengths: torch.Tensor) -> torch.Tensor | None:
        if self.seg_types == 1:
            return None  # the official eval model decodes the unmasked capsule
        return self._mask(lengths.argmax(1))

    def reconstruct(self, poses: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode segmentation capsules ``(B, K', H, W, 16)`` masked by ``mask`` ``(B, K', H, W)``
        (None: unmasked) into an image ``(B, C, H, W)``."""
        if self.decoder is None:
            raise RuntimeError("this SegCaps was built with reconstruction=False")
        if mask is not None:
            poses = poses * mask.unsqueeze(-1).to(poses.dtype)
        b, k, h, w, d = poses.shape
        return self.decoder(poses.permute(0, 1, 4, 2, 3).reshape(b, k * d, h, w))

    def loss(self, out: SegmentationOutput, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted BCE on the capsule length (K = 2) or a per-pixel margin loss (K > 2), plus
        ``recon_weight`` x the MSE of the label-masked reconstruction against the label-masked
        image. Parts are detached and sum to the loss."""
        self.check_input(images, labels)
        lengths = out.aux["lengths"]
        if self.seg_types == 1:
            p = lengths[:, 0].clamp(_EPS, 1 - _EPS)
            y = labels.to(p.dtype)
            if self.pos_weight is None:
                n_pos = y.sum()
                w = torch.where(n_pos > 0, (y.numel() - n_pos) / n_pos.clamp_min(1), torch.ones_like(n_pos))
            else:
                w = torch.tensor(self.pos_weight, dtype=p.dtype, device=p.device)
            # -(w y log p + (1 - y) log(1 - p)): TF's weighted_cross_entropy_with_logits
            seg = F.binary_cross_entropy_with_logits(torch.log(p) - torch.log1p(-p), y, pos_weight=w)
        else:
            k = self.num_classes
            seg = margin_loss(lengths.movedim(1, -1).reshape(-1, k), labels.reshape(-1).long())
        parts = {"segmentation": seg.detach()}
        total = seg
        if self.decoder is not None:
            recon = self.reconstruct(out.aux["poses"], self._mask(labels))
            target = images * (labels > 0).unsqueeze(1).to(images.dtype)
            rec = self.recon_weight * F.mse_loss(recon, target)
            parts["reconstruction"] = rec.detach()
            total = total + rec
        return total, parts


@register_model(task="segmentation")
def segcaps(in_channels: int = 1, num_classes: int = 2, **kwargs) -> SegCaps:
    """SegCaps R3 (LaLonde & Bagci 2018); 1,425,649 parameters for one channel, two classes."""
    return SegCaps(in_channels=in_channels, num_classes=num_classes, **kwargs)
