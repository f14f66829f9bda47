"""MultiMNIST of Sabour, Frosst, Hinton 2017 (arXiv 1710.09829, Sec. 6).

Each example overlays two MNIST digits of *different* classes. Every digit is first
centred on the canvas (the 28x28 image zero-padded by 4 pixels to 36x36), then shifted
by an integer number of pixels drawn uniformly from ``[-4, 4]`` in each direction,
independently for the two digits; the overlay is the pixel-wise sum clipped at 255:

    merged = min(shifted_1 + shifted_2, 255)        (uint8)

Checked against the authors' released generator (``research/capsules/input_data/
mnist/mnist_shift.py`` in tensorflow/models, ``shift_write_multi_mnist``): ``pad=4``
gives the 36x36 canvas, shifts are ``randint(-shift, shift + 1)`` per axis and digit,
the partner is drawn at random among images of a different label, and the pair is
merged with ``np.minimum(a + b, 255)`` ("aggregates the image pair with a maximum pixel
value of 255"). That generator also stores the two shifted single digits
(``image_raw_1``/``image_raw_2``), which the reconstruction of each digit is trained
against; :func:`make_multimnist` returns them as ``singles``. The paper makes 1,000
pairs per digit (60M training examples); here ``n`` examples are drawn with both
partners chosen uniformly at random (the second rejected until its class differs).

Shapes:

    ========  ====================  =========================================
    images    (n, C, C) uint8       merged pairs, C = canvas (36)
    labels    (n, 2) int64          classes of the two digits (always differ)
    singles   (n, 2, C, C) uint8    each shifted digit alone on the canvas
    indices   (n, 2) int64          source images of the two digits
    shifts    (n, 2, 2) int64       (row, col) shift of each digit from centre
    ========  ====================  =========================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..functional import multi_hot
from .affnist import _as_labels, _as_uint8_images, _generator

__all__ = ["MultiMNIST", "make_multimnist", "multi_hot"]


class MultiMNIST(NamedTuple):
    """Output of :func:`make_multimnist` (the first three fields are the data)."""

    images: torch.Tensor  # (n, C, C) uint8
    labels: torch.Tensor  # (n, 2) int64
    singles: torch.Tensor  # (n, 2, C, C) uint8
    indices: torch.Tensor  # (n, 2) int64
    shifts: torch.Tensor  # (n, 2, 2) int64, (row, col)


def make_multimnist(
    images,
    labels,
    n: int,
    seed: int | torch.Generator | None = 0,
    canvas: int = 36,
    max_shift: int = 4,
) -> MultiMNIST:
    """Generate ``n`` MultiMNIST examples from single digits.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, 1, H, W)`` source digits.
        labels: integer ``(N,)`` classes; at least two distinct classes.
        n: number of examples.
        seed: int seed or ``torch.Generator`` (deterministic given an int seed).
        canvas: side of the square canvas; the digit is centred on it.
        max_shift: largest shift in pixels along each axis; ``canvas - H`` and
            ``canvas - W`` must be at least ``2 * max_shift`` so no ink is cut off.
    """
    x, _ = _as_uint8_images(images)
    y = _as_labels(labels, x.shape[0])
    num, h, w = x.shape
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if canvas - h < 2 * max_shift or canvas - w < 2 * max_shift:
        raise ValueError(f"canvas ({canvas}) too small for {h}x{w} digits shifted by up to "
                         f"{max_shift} px: need at least {max(h, w) + 2 * max_shift}")
    if torch.unique(y).numel() < 2:
        raise ValueError("labels must contain at least two different classes")
    g = _generator(seed)
    first = torch.randint(0, num, (n,), generator=g)
    second = torch.randint(0, num, (n,), generator=g)
    clash = y[first] == y[second]
    while bool(clash.any()):  # redraw partners of the same class (expected ~1/(1-p) rounds)
        second[clash] = torch.randint(0, num, (int(clash.sum()),), generator=g)
        clash = y[first] == y[second]
    indices = torch.stack([first, second], 1)  # (n, 2)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2, 2), generator=g)  # (n, 2, 2)
    top = torch.tensor([(canvas - h) // 2, (canvas - w) // 2])  # centred top-left (row, col)
    corner = top + shifts  # (n, 2, 2)
    singles = torch.zeros(n, 2, canvas, canvas, dtype=torch.uint8)
    rows = corner[..., 0, None] + torch.arange(h)  # (n, 2, H)
    cols = corner[..., 1, None] + torch.arange(w)  # (n, 2, W)
    b = torch.arange(n)[:, None, None, None]
    k = torch.arange(2)[None, :, None, None]
    singles[b, k, rows[..., :, None], cols[..., None, :]] = x[indices]  # (n, 2, H, W)
    merged = singles.to(torch.int16).sum(1).clamp_(max=255).to(torch.uint8)  # (n, C, C)
    return MultiMNIST(merged, y[indices], singles, indices, shifts)
