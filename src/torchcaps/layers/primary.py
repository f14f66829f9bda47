"""Primary capsules: a convolution whose channels are regrouped into capsules."""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_dtype_matches, check_tensor
from .squash import SQUASHES

__all__ = ["PrimaryCaps", "channels_to_capsules"]


def channels_to_capsules(x: torch.Tensor, num_types: int, dim: int) -> torch.Tensor:
    """Regroup conv channels into capsules: ``(B, T*D, H, W)`` -> ``(B, T*H*W, D)``.

    Channel ``t*D + d`` at position ``(h, w)`` is element ``d`` of the capsule of type
    ``t`` at ``(h, w)``: the ``D`` values of a capsule are ``D`` channels at one
    position. A plain ``x.view(B, -1, D)`` would instead group ``D`` neighbouring
    *pixels* of one channel into a "capsule", a known bug of several ports.
    Capsules are ordered type-major: index ``t*H*W + h*W + w``.
    """
    b, c, h, w = x.shape
    if c != num_types * dim:
        raise ValueError(f"expected {num_types}*{dim}={num_types * dim} channels, got {c}")
    # (B, T, D, H, W) -> (B, T, H, W, D) -> (B, T*H*W, D)
    return x.view(b, num_types, dim, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, dim)


class PrimaryCaps(nn.Module):
    """Convolution -> capsules -> squash (Sabour et al. 2017, Sec. 4).

    Args:
        in_channels: channels of the input feature map.
        num_types: capsule types (32 in CapsNet).
        dim: capsule dimension (8 in CapsNet).
        kernel_size, stride, padding: of the convolution (9, 2, 0 in CapsNet).
        squash: squash variant name, or ``None`` for no nonlinearity.

    Shape:
        input ``(B, C_in, H, W)`` -> output ``(B, num_types * H' * W', dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_types: int = 32,
        dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        padding: int = 0,
        squash: str | None = "sabour",
    ) -> None:
        super().__init__()
        if squash is not None and squash not in SQUASHES:
            raise ValueError(f"unknown squash variant {squash!r}; choose from {sorted(SQUASHES)}")
        self.in_channels, self.num_types, self.dim = in_channels, num_types, dim
        self.squash = squash
        self.conv = nn.Conv2d(in_channels, num_types * dim, kernel_size, stride, padding)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial size ``(H', W')`` of the capsule grid for an ``h x w`` input."""
        k, s, p = self.conv.kernel_size, self.conv.stride, self.conv.padding
        return ((h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1)

    def num_capsules(self, h: int, w: int) -> int:
        oh, ow = self.output_size(h, w)
        return self.num_types * oh * ow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "PrimaryCaps input", ("B", self.in_channels, "H", "W"))
        check_dtype_matches(x, "PrimaryCaps input", self)
        u = channels_to_capsules(self.conv(x), self.num_types, self.dim)  # (B, I, D)
        return SQUASHES[self.squash](u) if self.squash else u
