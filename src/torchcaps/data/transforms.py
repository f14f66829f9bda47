"""Batched image operations: deterministic views and generator-driven augmentation.

Every random operation draws from the caller's ``torch.Generator`` (on the CPU, a fixed
number of draws per call whatever the content), so a checkpointed generator replays the
same batches exactly. Letter legend: ``B`` batch, ``C`` channels, ``H`` rows, ``W`` columns.
Images are float ``(B, C, H, W)`` unless stated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK = 2048  # images resized at once

__all__ = ["center_crop", "random_crop", "random_flip", "random_brightness_contrast",
           "random_shift", "resize", "standardize"]


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_fits(hw: tuple[int, int], out: tuple[int, int]) -> None:
    if not (0 < out[0] <= hw[0] and 0 < out[1] <= hw[1]):
        raise ValueError(f"cannot crop {out[0]}x{out[1]} from {hw[0]}x{hw[1]} images")


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The centred ``size`` (side, or ``(h, w)``) window of each image; an odd margin leaves
    the extra row/column at the bottom/right.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, h, w)``
    """
    (h, w), (oh, ow) = images.shape[-2:], _pair(size)
    _check_fits((h, w), (oh, ow))
    top, left = (h - oh) // 2, (w - ow) // 2
    return images[..., top:top + oh, left:left + ow]


def random_crop(images: torch.Tensor, size: int | tuple[int, int],
                generator: torch.Generator | None = None, padding: int = 0) -> torch.Tensor:
    """A uniformly placed ``size`` (side, or ``(h, w)``) window of each image, after zero
    ``padding`` on every side.

    Offsets are drawn per image, rows then columns (two draws of ``B``), from
    ``[0, H + 2 padding - h]`` and ``[0, W + 2 padding - w]``.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, h, w)``
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    x = F.pad(images, (padding,) * 4) if padding else images  # (B, C, H+2p, W+2p)
    b, _, h, w = x.shape
    oh, ow = _pair(size)
    _check_fits((h, w), (oh, ow))
    top = torch.randint(0, h - oh + 1, (b,), generator=generator)
    left = torch.randint(0, w - ow + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(oh))[:, :, None]  # (B, h, 1)
    cols = (left[:, None] + torch.arange(ow))[:, None, :]  # (B, 1, w)
    idx_b = torch.arange(b)[:, None, None]
    out = x.permute(0, 2, 3, 1)[idx_b, rows.to(x.device), cols.to(x.device)]  # (B, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None,
                p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (one draw of ``B``)."""
    flip = torch.rand(images.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_brightness_contrast(images: torch.Tensor, generator: torch.Generator | None = None,
                               brightness: float = 32 / 255,
                               contrast: tuple[float, float] = (0.5, 1.5)) -> torch.Tensor:
    """Add a random brightness, then scale the contrast about each image's mean; clamp to [0, 1].

    As TensorFlow's ``random_brightness(max_delta)`` followed by ``random_contrast(lower,
    upper)``: ``x + delta`` with ``delta ~ U[-brightness, brightness]``, then
    ``(x - m) f + m`` with ``f ~ U[contrast]`` and ``m`` the mean of each image and channel.
    Two draws of ``B``. Images are in [0, 1].
    """
    lo, hi = contrast
    if brightness < 0 or not 0 <= lo <= hi:
        raise ValueError(f"need brightness >= 0 and 0 <= lower <= upper, got {brightness}, {contrast}")
    b = images.shape[0]
    delta = (torch.rand(b, generator=generator) * 2 - 1) * brightness  # (B,)
    factor = torch.rand(b, generator=generator) * (hi - lo) + lo  # (B,)
    x = images + delta.to(images)[:, None, None, None]
    m = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    x = (x - m) * factor.to(images)[:, None, None, None] + m
    return x.clamp_(0.0, 1.0)


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Each image to zero mean and unit variance over its ``C x H x W`` values.

    As TensorFlow's ``per_image_standardization``: the standard deviation is floored at
    ``1 / sqrt(C H W)``, so a constant image maps to zeros instead of dividing by zero.
    """
    n = math.prod(images.shape[1:])
    mean = images.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    std = images.std(dim=(1, 2, 3), keepdim=True, unbiased=False).clamp(min=1 / math.sqrt(n))
    return (images - mean) / std


def resize(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``hw`` (``align_corners=False``, antialiased when shrinking).

    uint8 input is resized in float and rounded back to uint8.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, hw[0], hw[1])``
    """
    h, w = (int(v) for v in hw)
    if h < 1 or w < 1:
        raise ValueError(f"cannot resize to {hw}")
    if tuple(images.shape[-2:]) == (h, w):
        return images
    shrink = images.shape[-2] > h or images.shape[-1] > w
    out = []
    for start in range(0, images.shape[0], _CHUNK):  # bounds the float copy of a large set
        x = images[start:start + _CHUNK]
        x = x.float() if x.dtype == torch.uint8 else x
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else y)
    return torch.cat(out) if out else images.new_empty((0, *images.shape[1:-2], h, w))


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
