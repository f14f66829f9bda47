"""The Efficient-CapsNet MNIST augmentation, batched and driven by a ``torch.Generator``.

Mazzia, Salvetti, Chiaberge, "Efficient-CapsNet: capsule network with self-attention
routing", Scientific Reports 11, 2021 (arXiv 2101.12491). The paper only names the four
operations; every number below was read in the authors' official code,
``EscVM/Efficient-CapsNet`` (TensorFlow), ``utils/pre_process_mnist.py``. Its
``generate_tf_data`` maps each training image, in this order, through:

1. ``image_rotate_random`` (+ ``image_rotate_random_py_func``): ``r ~ N(0, 0.33)`` clipped
   to ``[-0.9999, 0.9999]``, angle ``= int(30 r)`` degrees (Python ``int``: truncation
   toward zero, so whole degrees in ``[-29, 29]``), applied only when a second clipped
   ``N(0, 0.33)`` draw is ``<= 0`` (probability 1/2). The rotation is OpenCV's
   ``getRotationMatrix2D((W/2, H/2), angle, 1)`` + ``warpAffine`` (bilinear, zero border):
   positive angles turn the digit counter-clockwise on screen, about the point
   ``(x, y) = (14, 14)`` in pixel-centre coordinates (not the image centre 13.5).
2. ``image_shift_rand``: the digit's empty margins (left, right, top, bottom; a row or
   column is empty when its sum is not > 0) bound the shift. Per axis, a direction bit
   ``floor(2 u)``, ``u ~ U[0, 1)``, and an amount ``a = min(|N(0, 0.33)|, 0.9999)``; the
   shift is ``floor(-a * left)`` (towards the left / top) or ``floor(a * (1 + right))``
   (towards the right / bottom), so the ink never leaves the frame; applied with
   ``tf.roll`` (integer pixels). The x direction uses the second direction bit and the
   first amount, y the first bit and the second amount (equivalent in distribution).
3. ``image_squish_random``: ``a = min(|N(0, 0.33)|, 0.9999)`` twice; width reduction
   ``w = floor(a0 * W / 4 + 1)`` (1 to 7 px at 28 px), ``offset = w // 2 + floor(2 a1)``.
   The image is resized to ``(H, W - w)`` with ``tf.image.resize(LANCZOS3,
   antialias=True)``, padded on the left by ``offset`` and cropped back to ``W`` columns,
   i.e. a horizontal squeeze, always applied (no probability).
4. ``image_erase_random``: ``u ~ U[0, 1)`` twice; a 4x4 patch of zeros at rows
   ``floor(19 u0) + 4`` and columns ``floor(19 u1) + 4`` (top-left corner in
   ``[4, 22]``), always applied.

The resize (step 3) follows TensorFlow's ``ScaleAndTranslate`` kernel
(``tensorflow/core/kernels/image/scale_and_translate_op.cc``, ``ComputeSpansCore``, and
``sampling_kernels.h``, ``LanczosKernelFunc``): output column ``x`` samples the input at
``s = (x + 0.5) / scale``, taps ``k`` in ``[ceil(s - 3 q - 0.5), floor(s + 3 q - 0.5)]``
clamped to the image, weights ``lanczos3((k + 0.5 - s) / q)`` normalised to sum 1, with
``q = max(1 / scale, 1)`` (antialias). The height is not resized (scale 1), which is the
identity up to float32 rounding of ``sin(pi)``; we skip it.

Deviations, all deliberate: random numbers come from the caller's ``torch.Generator`` (same
distributions, different streams), the rotation probability is drawn as ``u < 1/2``
instead of the sign of a second normal, bilinear weights are exact (OpenCV quantises
sub-pixel positions to 1/32), Lanczos weights are computed in float64 (TF: float32), an
empty image is not shifted (the official code would take the min of an empty set), and
for ``uint8`` input the result is rounded and clamped back to ``[0, 255]`` (float input is
left unclamped, as in TF: Lanczos ringing can make values slightly negative or above the
input's maximum). The official pipeline scales pixels by ``1/256`` (``pre_process``);
torchcaps loaders use ``1/255``. Defaults are the official MNIST (28 x 28) values.

Other parts of the official recipe (``config.json``, ``utils/tools.py``,
``models/model.py``): Adam, lr 5e-4 times ``0.97 ** epoch`` set at each epoch start
(staircase) and floored at 5e-5 (``learn_scheduler``), batch 16, 150 epochs, loss margin
(m+ 0.9, m- 0.1, lambda 0.5; ``marginLoss``) + 0.392 x MSE reconstruction of the
*augmented* image (``loss_weights=[1., lmd_gen]``).

Letter legend: ``B`` batch, ``C`` channels, ``H`` rows, ``W`` columns.

Shape:
    every function maps ``(B, C, H, W)`` to ``(B, C, H, W)`` with the input's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._validate import check_tensor

__all__ = ["efficient_capsnet_augment", "rotate", "roll_shift", "squish", "erase",
           "lanczos3_resize_matrix"]


# ------------------------------------------------------------------ input checks
def _check_images(images: object) -> torch.Tensor:
    x = check_tensor(images, "images", ("B", "C", "H", "W"), floating=False)
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"images must be at least 2x2, got {tuple(x.shape[-2:])}")
    return x


def _check_per_image(v: object, name: str, batch: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.dim() == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v


def _work(x: torch.Tensor) -> torch.Tensor:
    """The floating copy we compute in: float64 stays float64, anything else float32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _back(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.round().clamp_(0, 255).to(torch.uint8)
    return y.to(dtype)


# ------------------------------------------------------------------ the four operations
def rotate(images: torch.Tensor, degrees) -> torch.Tensor:
    """Rotate each image by ``degrees`` (OpenCV convention), bilinear, zero fill.

    Positive angles rotate counter-clockwise as displayed (row 0 at the top), about the
    point ``(x, y) = (W / 2, H / 2)`` in pixel-centre coordinates, as
    ``cv2.getRotationMatrix2D((W/2, H/2), angle, 1.0)`` with ``cv2.warpAffine`` in the
    official ``image_rotate_random_py_func``. Output pixel ``q`` samples the input at
    ``c + R(-angle) (q - c)``.

    Args:
        images: ``(B, C, H, W)``, uint8 or float.
        degrees: a scalar or ``(B,)`` angles in degrees.
    """
    x = _check_images(images)
    b, _, h, w = x.shape
    deg = _check_per_image(degrees, "degrees", b).to(torch.float64)
    if not bool(torch.isfinite(deg).all()):
        raise ValueError("degrees must be finite")
    xf = _work(x)
    theta = torch.deg2rad(deg)  # (B,)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]  # (B, 1, 1)
    dx = (torch.arange(w, dtype=torch.float64) - w / 2)[None, None, :]  # (1, 1, W)
    dy = (torch.arange(h, dtype=torch.float64) - h / 2)[None, :, None]  # (1, H, 1)
    src_x = w / 2 + cos * dx - sin * dy  # (B, H, W) input column sampled by output (y, x)
    src_y = h / 2 + sin * dx + cos * dy  # (B, H, W) input row
    grid = torch.stack((2 * src_x / (w - 1) - 1, 2 * src_y / (h - 1) - 1), dim=-1)  # (B, H, W, 2)
    out = F.grid_sample(xf, grid.to(device=x.device, dtype=xf.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # (B, C, H, W)
    return _back(out, x.dtype)


def roll_shift(images: torch.Tensor, dy, dx) -> torch.Tensor:
    """Roll each image by integer ``dy`` rows (down) and ``dx`` columns (right), wrapping.

    ``tf.roll`` in the official ``image_shift_rand``; with shifts bounded by the margins
    only empty rows and columns wrap around, so it equals a zero-filled shift.
    """
    x = _check_images(images)
    b, _, h, w = x.shape
    dy = _check_per_image(dy, "dy", b).to(device=x.device, dtype=torch.long)
    dx = _check_per_image(dx, "dx", b).to(device=x.device, dtype=torch.long)
    rows = (torch.arange(h, device=x.device) - dy[:, None]) % h  # (B, H) source row of each row
    cols = (torch.arange(w, device=x.device) - dx[:, None]) % w  # (B, W)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _lanczos3(t: torch.Tensor) -> torch.Tensor:
    """TF ``LanczosKernelFunc(3)``: ``3 sin(pi t) sin(pi t / 3) / (pi t)^2`` on ``|t| <= 3``."""
    t = t.abs()
    safe = torch.where(t <= 1e-3, torch.ones_like(t), t)
    v = 3 * torch.sin(math.pi * safe) * torch.sin(math.pi * safe / 3) / (math.pi * safe) ** 2
    return torch.where(t <= 1e-3, torch.ones_like(t), torch.where(t > 3, torch.zeros_like(t), v))


@functools.lru_cache(maxsize=64)
def _lanczos3_matrix_cached(in_size: int, out_size: int) -> torch.Tensor:
    scale = out_size / in_size
    q = max(1 / scale, 1.0)  # kernel stretch when downsampling (antialias=True)
    s = (torch.arange(out_size, dtype=torch.float64) + 0.5) / scale  # (O,) sample positions
    k = torch.arange(in_size, dtype=torch.float64)  # (I,) input taps
    start = torch.ceil(s - 3 * q - 0.5).clamp(0, in_size - 1)  # (O,)
    stop = torch.floor(s + 3 * q - 0.5).clamp(0, in_size - 1)  # (O,) inclusive
    inside = (k[None, :] >= start[:, None]) & (k[None, :] <= stop[:, None])  # (O, I)
    wts = torch.where(inside, _lanczos3((k[None, :] + 0.5 - s[:, None]) / q), 0.0)  # (O, I)
    return wts / wts.sum(dim=1, keepdim=True)


def lanczos3_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``(out_size, in_size)`` float64 matrix of TF's antialiased Lanczos-3 resize along one axis.

    ``resized = M @ line``; each row sums to 1. See the module docstring for the source.
    """
    if not (isinstance(in_size, int) and isinstance(out_size, int) and in_size >= 1
            and out_size >= 1):
        raise ValueError(f"in_size and out_size must be positive ints, got {in_size}, {out_size}")
    return _lanczos3_matrix_cached(in_size, out_size).clone()


def squish(images: torch.Tensor, width_reduction, offset) -> torch.Tensor:
    """Squeeze each image horizontally by ``width_reduction`` px and place it at ``offset``.

    As the official ``image_squish_random``: resize to ``(H, W - width_reduction)``
    (antialiased Lanczos-3), pad ``offset`` zero columns on the left and crop to ``W``
    columns. ``width_reduction == 0`` leaves an image unchanged (and ignores ``offset``).

    Args:
        images: ``(B, C, H, W)``, uint8 or float.
        width_reduction: scalar or ``(B,)`` ints in ``[0, W - 1]``.
        offset: scalar or ``(B,)`` ints in ``[0, W - 1]``.
    """
    x = _check_images(images)
    b, _, _, w = x.shape
    red = _check_per_image(width_reduction, "width_reduction", b).to(torch.long).cpu()
    off = _check_per_image(offset, "offset", b).to(torch.long).cpu()
    if b and (int(red.min()) < 0 or int(red.max()) > w - 1):
        raise ValueError(f"width_reduction must lie in [0, {w - 1}], got {red.tolist()}")
    if b and (int(off.min()) < 0 or int(off.max()) > w - 1):
        raise ValueError(f"offset must lie in [0, {w - 1}], got {off.tolist()}")
    xf = _work(x)
    # one (W, W) column map per distinct reduction; row r < W - red holds the resize weights
    table = torch.zeros(w, w, w, dtype=torch.float64)  # (reduction, W_out, W_in)
    table[0] = torch.eye(w, dtype=torch.float64)
    for r in sorted(set(red.tolist()) - {0}):
        table[r, : w - r] = _lanczos3_matrix_cached(w, w - r)
    j = torch.arange(w)[None, :] - torch.where(red > 0, off, 0)[:, None]  # (B, W) resized column
    valid = (j >= 0) & (j < (w - red)[:, None])  # (B, W) columns inside the pasted strip
    cols = table[red[:, None], j.clamp(0, w - 1)] * valid[:, :, None]  # (B, W_out, W_in)
    out = torch.einsum("bchk,bjk->bchj", xf, cols.to(device=x.device, dtype=xf.dtype))
    out = torch.where((red == 0).to(x.device)[:, None, None, None], xf, out)  # exact identity
    return _back(out, x.dtype)


def erase(images: torch.Tensor, top, left, size: int) -> torch.Tensor:
    """Zero a ``size x size`` patch with top-left corner ``(top, left)`` in each image.

    As the official ``image_erase_random`` (a mask of ones with a zero patch, multiplied in).
    """
    x = _check_images(images)
    b, _, h, w = x.shape
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    top = _check_per_image(top, "top", b).to(device=x.device, dtype=torch.long)
    left = _check_per_image(left, "left", b).to(device=x.device, dtype=torch.long)
    r = torch.arange(h, device=x.device)[None, :]  # (1, H)
    c = torch.arange(w, device=x.device)[None, :]  # (1, W)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size)  # (B, H)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size)  # (B, W)
    patch = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(patch, torch.zeros((), dtype=x.dtype, device=x.device), x)


# ------------------------------------------------------------------ the random pipeline
def _margins(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty columns left/right and rows top/bottom of each image's ink (sum > 0)."""
    cols = x.sum(dim=(1, 2)) > 0  # (B, W)
    rows = x.sum(dim=(1, 3)) > 0  # (B, H)
    # argmax returns the first maximal index; an all-empty image gives 0 everywhere
    left = cols.int().argmax(dim=1)
    right = cols.flip(1).int().argmax(dim=1)
    top = rows.int().argmax(dim=1)
    bottom = rows.flip(1).int().argmax(dim=1)
    return left, right, top, bottom


def efficient_capsnet_augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    rotation: float = 30.0,
    rotation_prob: float = 0.5,
    std: float = 0.33,
    shift: bool = True,
    max_squish: float | None = None,
    erase_size: int = 4,
    erase_positions: tuple[int, int] = (4, 23),
    return_params: bool = False,
):
    """Rotate, shift, squish and erase each image as the official Efficient-CapsNet code.

    Ten numbers are drawn per image from ``generator`` (on the CPU, in a fixed order
    whatever the options), so a given generator state always gives the same result and a
    checkpointed generator resumes exactly. See the module docstring for the source of
    every step and constant.

    Args:
        images: ``(B, C, H, W)``, uint8 or float (pixel values >= 0 for the margin test).
        generator: a CPU ``torch.Generator`` (default: the global one).
        rotation: largest angle in degrees (30); the drawn angle is truncated to whole
            degrees. 0 disables the rotation.
        rotation_prob: probability that an image is rotated (1/2).
        std: standard deviation of the normal draws behind angle, shift and squish (0.33).
        shift: shift the ink within its margins (``image_shift_rand``).
        max_squish: the width reduction is ``floor(a * max_squish + 1)`` px; default
            ``W / 4`` (1 to 7 px at 28). 0 disables the squish (the official formula
            itself never gives 0).
        erase_size: side of the erased square (4); 0 disables erasing.
        erase_positions: half-open range ``[lo, hi)`` of the patch's top row and left
            column (official: ``[4, 23)``).
        return_params: also return a dict of the per-image parameters that were applied
            (``degrees``, ``shift_y``, ``shift_x``, ``squish``, ``squish_offset``,
            ``erase_top``, ``erase_left``; ``(B,)`` tensors).

    Returns:
        the augmented batch (same shape and dtype), and the parameters if requested.
    """
    x = _check_images(images)
    b, _, h, w = x.shape
    if not (math.isfinite(rotation) and 0 <= rotation <= 180):
        raise ValueError(f"rotation must be in [0, 180] degrees, got {rotation!r}")
    if not (0 <= rotation_prob <= 1):
        raise ValueError(f"rotation_prob must be in [0, 1], got {rotation_prob!r}")
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    if max_squish is None:
        max_squish = w / 4
    if not (math.isfinite(max_squish) and 0 <= max_squish <= w - 2):
        raise ValueError(f"max_squish must be in [0, {w - 2}] for width {w}, got {max_squish!r}")
    if not isinstance(erase_size, int) or erase_size < 0:
        raise ValueError(f"erase_size must be an int >= 0, got {erase_size!r}")
    lo, hi = erase_positions
    if erase_size and not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi
                           and hi - 1 + erase_size <= min(h, w)):
        raise ValueError(f"erase_positions {erase_positions!r} with erase_size {erase_size} do "
                         f"not fit a {h}x{w} image")

    # all draws first, fixed count and order: (B,) or (2, B)
    rot_r = (torch.randn(b, generator=generator) * std).clamp(-0.9999, 0.9999)
    rot_u = torch.rand(b, generator=generator)
    dir_u = torch.rand(2, b, generator=generator)
    shift_a = (torch.randn(2, b, generator=generator) * std).abs().clamp(max=0.9999)
    squish_a = (torch.randn(2, b, generator=generator) * std).abs().clamp(max=0.9999)
    erase_u = torch.rand(2, b, generator=generator)

    # every stage runs on the floating copy; one rounding at the end for uint8 input
    out = _work(x)
    # 1. rotation (image_rotate_random): whole degrees, truncated toward zero
    deg = torch.trunc(rot_r * rotation)  # (B,)
    deg = torch.where(rot_u < rotation_prob, deg, torch.zeros_like(deg))
    if bool((deg != 0).any()):
        turned = rotate(out, deg)
        out = torch.where((deg != 0).to(x.device)[:, None, None, None], turned, out)

    # 2. shift within the margins (image_shift_rand)
    sy = torch.zeros(b, dtype=torch.long)
    sx = torch.zeros(b, dtype=torch.long)
    if shift:
        left, right, top, bottom = (m.cpu().float() for m in _margins(out))
        towards_end = torch.floor(dir_u * 2).long() == 1  # (2, B)
        sx = torch.where(towards_end[1], torch.floor(shift_a[0] * (1 + right)),
                         torch.floor(-shift_a[0] * left)).long()
        sy = torch.where(towards_end[0], torch.floor(shift_a[1] * (1 + bottom)),
                         torch.floor(-shift_a[1] * top)).long()
        if bool((sx != 0).any() or (sy != 0).any()):
            out = roll_shift(out, sy, sx)

    # 3. horizontal squish (image_squish_random), always applied unless disabled
    red = torch.zeros(b, dtype=torch.long)
    off = torch.zeros(b, dtype=torch.long)
    if max_squish > 0:
        red = torch.floor(squish_a[0] * max_squish + 1).long()
        off = red // 2 + torch.floor(squish_a[1] * 2).long()
        out = squish(out, red, off)

    # 4. erase a square (image_erase_random), always applied unless disabled
    et = torch.floor(erase_u[0] * (hi - lo)).long() + lo
    el = torch.floor(erase_u[1] * (hi - lo)).long() + lo
    if erase_size:
        out = erase(out, et, el, erase_size)
    else:
        et, el = torch.full((b,), -1), torch.full((b,), -1)

    out = _back(out, x.dtype) if x.dtype == torch.uint8 else out.to(x.dtype)
    if return_params:
        return out, {"degrees": deg, "shift_y": sy, "shift_x": sx, "squish": red,
                     "squish_offset": off, "erase_top": et, "erase_left": el}
    return out
