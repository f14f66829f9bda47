"""Batched, generator-driven augmentation (reproducible and resumable)."""

from __future__ import annotations

import torch

__all__ = ["random_shift"]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None):
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros.

    Sabour et al. train MNIST with shifts of up to 2 px and zero padding. Offsets are
    drawn uniformly from ``[-max_shift, max_shift]`` per image and axis.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    b, c, h, w = images.shape
    s = max_shift
    padded = torch.nn.functional.pad(images, (s, s, s, s))  # (B, C, H+2s, W+2s)
    off = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = off[0, :, None] + torch.arange(h)  # (B, H)
    cols = off[1, :, None] + torch.arange(w)  # (B, W)
    idx_b = torch.arange(b)[:, None, None]
    # advanced indexing -> (B, H, W, C); back to channels-first
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
