"""Reconstruction decoder on masked class capsules (Sabour et al. 2017, Sec. 4.1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import check_tensor

__all__ = ["CapsuleDecoder", "mask_capsules"]


def mask_capsules(poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Zero all class capsules but ``index`` per example.

    Args:
        poses: ``(B, J, D)``.
        index: ``(B,)`` integer class per example, or a ``(B, J)`` 0/1 mask.

    Returns:
        the masked poses flattened to ``(B, J*D)``.
    """
    if index.dim() == 1:
        mask = torch.nn.functional.one_hot(index.long(), poses.shape[1]).to(poses.dtype)
    else:
        mask = index.to(poses.dtype)
    return (poses * mask.unsqueeze(-1)).flatten(1)


class CapsuleDecoder(nn.Module):
    """FC 512 ReLU -> 1024 ReLU -> pixels sigmoid, from masked class capsules.

    Args:
        num_caps: class capsules ``J``.
        dim: their dimension ``D``.
        out_shape: image shape ``(C, H, W)``.
        hidden: hidden widths (512, 1024 in the paper).

    Shape:
        poses ``(B, J, D)``, index ``(B,)`` -> images ``(B, C, H, W)`` in [0, 1].
    """

    def __init__(
        self,
        num_caps: int,
        dim: int,
        out_shape: tuple[int, int, int],
        hidden: tuple[int, ...] = (512, 1024),
    ) -> None:
        super().__init__()
        self.num_caps, self.dim, self.out_shape = num_caps, dim, tuple(out_shape)
        layers: list[nn.Module] = []
        width = num_caps * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Linear(width, math.prod(out_shape)), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        check_tensor(poses, "decoder poses", ("B", self.num_caps, self.dim))
        return self.net(mask_capsules(poses, index)).view(-1, *self.out_shape)
