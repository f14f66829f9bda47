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

from .. import functional as F
from .._validate import check_dtype_matches, check_tensor

__all__ = ["ModelOutput", "CapsuleModel", "class_capsule_output", "margin_reconstruction_loss",
           "shape_error"]


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


def shape_error(model: str, in_shape: tuple[int, int, int], why: str) -> ValueError:
    """The one error a model raises at construction for an input shape it cannot take.

    ``model`` is the registered name, ``why`` the reason, e.g. ``"input 16x16 is too small
    (needs at least 17x17)"``.
    """
    return ValueError(f"{model} cannot take in_shape {tuple(in_shape)} (C, H, W): {why}")


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


def class_capsule_output(
    poses: torch.Tensor,
    couplings: torch.Tensor | None,
    decoder: nn.Module | None,
    labels: torch.Tensor | None,
    training: bool,
) -> ModelOutput:
    """Output of a vector-capsule classifier: logits are class-capsule lengths.

    The decoder (if any) sees the capsules masked by the true label while training and by
    the longest capsule otherwise (Sabour et al. 2017, Sec. 4.1).
    """
    lengths = F.capsule_length(poses)  # (B, K)
    recon = None
    if decoder is not None:
        index = labels if (training and labels is not None) else lengths.argmax(dim=1)
        recon = decoder(poses, index)
    return ModelOutput(lengths, poses, recon, couplings)


def margin_reconstruction_loss(
    out: ModelOutput, images: torch.Tensor, labels: torch.Tensor, sse_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Margin loss on the logits plus ``sse_weight`` x sum-of-squares reconstruction error."""
    margin = F.margin_loss(out.logits, labels)
    parts = {"margin": margin.detach()}
    total = margin
    if out.reconstruction is not None:
        recon = F.reconstruction_loss(out.reconstruction, images, sse_weight)
        parts["reconstruction"] = recon.detach()
        total = total + recon
    return total, parts
