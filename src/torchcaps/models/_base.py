"""The calling and loss convention shared by every model in the registry.

Every model is a :class:`CapsuleModel`:

* ``out = model(images, labels=None)`` returns a :class:`ModelOutput`;
  ``out.logits`` ``(B, K)`` are class scores whose argmax is the prediction
  (capsule lengths for CapsNet-style models).
* ``loss, parts = model.loss(out, images, labels)`` returns the scalar training
  loss and a dict of its named float parts, for logging.

The trainer, evaluator and benchmarks rely on nothing else, so a new model needs
no special case anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validate import check_dtype_matches, check_tensor

__all__ = ["ModelOutput", "CapsuleModel"]


@dataclass
class ModelOutput:
    """Model outputs.

    Attributes:
        logits: ``(B, K)`` class scores; the prediction is their argmax.
        poses: ``(B, K, D)`` class-capsule poses, when the model has them.
        reconstruction: ``(B, C, H, W)`` decoder output, when the model has a decoder.
        couplings: ``(B, I, K)`` couplings of the last routing layer, when routed.
    """

    logits: torch.Tensor
    poses: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    couplings: torch.Tensor | None = None


class CapsuleModel(nn.Module):
    """Base class fixing the input contract: float images ``(B, C, H, W)`` of a known size."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
            raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)

    def check_input(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        check_tensor(images, "images", ("B", *self.in_shape))
        check_dtype_matches(images, "images", self)
        if labels is not None:
            if labels.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"labels must be int64 class indices, got dtype {labels.dtype}")
            if labels.shape != images.shape[:1]:
                raise ValueError(
                    f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
                )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        raise NotImplementedError  # pragma: no cover

    def loss(
        self, out: ModelOutput, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError  # pragma: no cover
