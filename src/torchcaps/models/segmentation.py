"""The calling and loss convention of every segmentation model in the registry.

A segmentation model is a :class:`SegmentationModel`, registered with
``@register_model(task="segmentation")``:

* ``out = model(images, labels=None)`` takes float images ``(B, C, *S)`` with ``S`` the
  ``spatial_dims`` spatial sizes (``(H, W)`` or ``(D, H, W)``), each a multiple of
  ``size_multiple``, and returns a :class:`SegmentationOutput` whose ``logits``
  ``(B, K, *S)`` are per-voxel class scores (argmax over ``K`` is the prediction; a softmax
  over ``K`` gives probabilities).
* ``loss, parts = model.loss(out, images, labels)`` with integer labels ``(B, *S)`` in
  ``[0, K)`` returns the scalar training loss and a dict of its named parts.

The training task, sliding-window inference and metrics rely on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._validate import check_dtype_matches, check_tensor

__all__ = ["SegmentationOutput", "SegmentationModel"]

_AXES = {2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass
class SegmentationOutput:
    """Outputs of a segmentation model.

    Attributes:
        logits: ``(B, K, *S)`` per-voxel class scores.
        reconstruction: ``(B, C, *S)`` reconstruction of the input, when the model has one.
        aux: further named tensors a model's loss uses (e.g. low-resolution capsule
            lengths ``(B, K, *S')`` for a margin loss on downsampled labels).
    """

    logits: torch.Tensor
    reconstruction: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class SegmentationModel(nn.Module):
    """Base class fixing the input contract of dense prediction.

    Args:
        in_channels: image channels ``C``.
        num_classes: classes ``K`` (background included), at least 2.
        spatial_dims: 2 (images ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).
        size_multiple: every spatial size must be a multiple of this (``2 ** downsamplings``).
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int,
                 size_multiple: int = 1) -> None:
        super().__init__()
        if spatial_dims not in _AXES:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_dims, self.size_multiple = spatial_dims, int(size_multiple)

    def check_input(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One clear error for images or labels this model cannot take."""
        axes = _AXES[self.spatial_dims]
        if isinstance(images, torch.Tensor) and images.dim() != 2 + self.spatial_dims:
            kind = {4: "2D images (B, C, H, W)", 5: "3D volumes (B, C, D, H, W)"}.get(
                images.dim(), f"a {images.dim()}-dimensional tensor")
            raise ValueError(
                f"{type(self).__name__} is a {self.spatial_dims}D model and takes "
                f"(B, C, {', '.join(axes)}) inputs; got {kind} of shape {tuple(images.shape)}")
        check_tensor(images, "images", ("B", self.in_channels, *axes))
        check_dtype_matches(images, "images", self)
        m = self.size_multiple
        bad = [s for s in images.shape[2:] if s % m]
        if bad:
            raise ValueError(f"{type(self).__name__} needs spatial sizes that are multiples of "
                             f"{m}; got {tuple(images.shape[2:])}")
        if labels is not None:
            check_labels(labels, images, self.num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        raise NotImplementedError  # pragma: no cover

    def loss(self, out: SegmentationOutput, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover


def check_labels(labels: torch.Tensor, images: torch.Tensor, num_classes: int) -> None:
    """Labels must be integer class indices ``(B, *S)`` in ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    want = (images.shape[0], *images.shape[2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must have the shape of the images without the channel axis "
                         f"{want}, got {tuple(labels.shape)}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] ({num_classes} classes); "
                             f"found values from {lo} to {hi}")
