"""Module twins of the functional squash variants and capsule length."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F

__all__ = ["Squash", "CapsuleLength", "SQUASHES"]

#: Squash variants by name, as used by the ``squash=`` argument of capsule layers.
SQUASHES = {"sabour": F.squash, "exp": F.squash_exp}


class Squash(nn.Module):
    """Squash along the last axis.

    Args:
        variant: ``"sabour"`` (Sabour et al. 2017) or ``"exp"`` (Efficient-CapsNet).
        eps: numerical floor under the square root.

    Shape:
        ``(*, D)`` -> ``(*, D)``
    """

    def __init__(self, variant: str = "sabour", eps: float = 1e-8) -> None:
        super().__init__()
        if variant not in SQUASHES:
            raise ValueError(f"unknown squash variant {variant!r}; choose from {sorted(SQUASHES)}")
        self.variant = variant
        self.eps = eps

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return SQUASHES[self.variant](s, dim=-1, eps=self.eps)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


class CapsuleLength(nn.Module):
    """Capsule lengths. Shape: ``(*, D)`` -> ``(*)``."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.capsule_length(v)
