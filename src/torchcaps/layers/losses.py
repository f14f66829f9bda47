"""Module twins of the capsule losses in :mod:`torchcaps.functional`."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F

__all__ = ["MarginLoss", "ReconstructionLoss"]


class MarginLoss(nn.Module):
    """Margin loss (Sabour et al. 2017, Eq. 4); see :func:`torchcaps.functional.margin_loss`."""

    def __init__(self, m_pos: float = 0.9, m_neg: float = 0.1, lambda_neg: float = 0.5) -> None:
        super().__init__()
        self.m_pos, self.m_neg, self.lambda_neg = m_pos, m_neg, lambda_neg

    def forward(self, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.margin_loss(lengths, targets, self.m_pos, self.m_neg, self.lambda_neg)


class ReconstructionLoss(nn.Module):
    """``weight * sum of squared errors`` per image, mean over batch."""

    def __init__(self, weight: float = 0.0005) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.reconstruction_loss(reconstruction, images, self.weight)
