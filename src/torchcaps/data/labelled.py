"""Reader for user-supplied labelled image sets, and fitting them to a model's input size.

File format: an ``.npz`` (read with pickling disabled by :func:`load_npz`) holding

    ========  ==============  ==============================================
    images    (N, H, W) uint8  grey-level pixels 0-255
    labels    (N,) integer     class indices, int64 preferred (any integer
                               dtype is widened losslessly; floats rejected)
    ========  ==============  ==============================================

Every defect raises :class:`DataFormatError` with the file name and the problem:
missing arrays, wrong dtype (no silent coercion), wrong number of dimensions,
different N for images and labels, labels out of range, an empty set, a size above the
limit. All but the label range are read from the ``.npy`` headers, before any array is
decompressed, so a forged or oversized file is refused without filling memory.

:func:`fit_images` then brings images of another size to the model's ``(H, W)``:
``"error"`` (default) refuses and names both sizes, ``"pad"`` zero-pads around the
centre, ``"resize"`` interpolates bilinearly (antialiased when shrinking).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import NPZ_MAX_BYTES, load_npz
from .errors import DataFormatError

__all__ = ["load_labelled_npz", "fit_images", "FIT_MODES"]

FIT_MODES = ("error", "pad", "resize")


def _check_layout(specs: dict, name: str, expected_hw: tuple[int, int] | None) -> None:
    """Everything the ``.npy`` headers tell: dtypes, ranks, counts and image size."""
    (ishape, idtype), (lshape, ldtype) = specs["images"], specs["labels"]
    if idtype != np.uint8:
        raise DataFormatError(f"{name}: images must be uint8 (0-255), got {idtype}; "
                              "convert explicitly (e.g. np.round(x * 255).astype(np.uint8))")
    if len(ishape) != 3:
        raise DataFormatError(f"{name}: images must have shape (N, H, W), got {ishape}")
    if ldtype.kind not in "iu":
        raise DataFormatError(f"{name}: labels must be integers (int64), got {ldtype}")
    if len(lshape) != 1:
        raise DataFormatError(f"{name}: labels must have shape (N,), got {lshape}")
    if lshape[0] != ishape[0]:
        raise DataFormatError(f"{name}: {ishape[0]} images but {lshape[0]} labels")
    if ishape[0] == 0:
        raise DataFormatError(f"{name}: the file holds no images")
    if min(ishape[1:]) == 0:
        raise DataFormatError(f"{name}: images have an empty side, shape {ishape}")
    if expected_hw is not None and tuple(ishape[1:]) != tuple(expected_hw):
        h, w = ishape[1:]
        raise DataFormatError(f"{name}: images are {h}x{w} but {expected_hw[0]}x{expected_hw[1]} "
                              "are expected; fit them with --resize or --pad "
                              "(torchcaps.data.labelled.fit_images)")


def load_labelled_npz(
    path: str | os.PathLike,
    expected_hw: tuple[int, int] | None = None,
    num_classes: int | None = None,
    max_bytes: int = NPZ_MAX_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``images`` and ``labels`` from an ``.npz`` file, checking every property.

    Dtypes, shapes, counts and the total size are checked on the ``.npy`` headers before
    any array is decompressed (see :func:`load_npz`); only the label range needs the data.

    Args:
        path: the file.
        expected_hw: if given, the images must be exactly this ``(H, W)`` (else use
            :func:`fit_images` with mode ``"pad"`` or ``"resize"``).
        num_classes: if given, labels must lie in ``[0, num_classes)``; otherwise
            they must be non-negative.
        max_bytes: limit on the decompressed size of both arrays together.

    Returns:
        ``(images, labels)``: uint8 ``(N, H, W)`` and int64 ``(N,)`` tensors.
    """
    name = str(path)
    arrays = load_npz(path, ("images", "labels"), max_bytes=max_bytes,
                      check=lambda specs: _check_layout(specs, name, expected_hw))
    images, labels = arrays["images"], arrays["labels"]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise DataFormatError(f"{name}: labels must be {bound}, got range [{lo}, {hi}]")
    if hi > np.iinfo(np.int64).max:  # only reachable for uint64 labels
        raise DataFormatError(f"{name}: label {hi} does not fit in int64")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _as_float_images(images) -> torch.Tensor:
    """uint8 (scaled by 1/255) or float in [0, 1], ``(N, H, W)`` or ``(N, 1, H, W)`` -> float."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), "
                         f"got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError("images contain non-finite values")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError("float images must lie in [0, 1]")
    return images.float()


def fit_images(images, hw: tuple[int, int], mode: str = "error") -> torch.Tensor:
    """Return images as float ``(N, 1, H, W)`` in [0, 1] of size ``hw``.

    Args:
        images: uint8 (0-255) or float ([0, 1]) ``(N, H', W')`` or ``(N, 1, H', W')``.
        hw: target ``(H, W)``.
        mode: ``"error"``: the sizes must already agree (the error names both and
            suggests ``--resize`` / ``--pad``); ``"pad"``: zero-pad around the centre
            (an odd difference puts the extra row/column at the bottom/right; larger
            images are an error); ``"resize"``: bilinear interpolation
            (``align_corners=False``, antialiased when shrinking).

    Shape:
        ``(N, H', W')`` or ``(N, 1, H', W')`` -> ``(N, 1, H, W)``
    """
    if mode not in FIT_MODES:
        raise ValueError(f"mode must be one of {FIT_MODES}, got {mode!r}")
    h, w = (int(v) for v in hw)
    if h < 1 or w < 1:
        raise ValueError(f"hw must be positive, got {tuple(hw)}")
    x = _as_float_images(images)  # (N, 1, H', W')
    sh, sw = x.shape[2:]
    if (sh, sw) == (h, w):
        return x
    if mode == "error":
        raise ValueError(f"images are {sh}x{sw} but the model expects {h}x{w}; "
                         "pass --resize (interpolate) or --pad (zero-pad, if smaller)")
    if mode == "pad":
        if sh > h or sw > w:
            raise ValueError(f"cannot pad {sh}x{sw} images to {h}x{w}: they are larger; "
                             "use --resize instead")
        top, left = (h - sh) // 2, (w - sw) // 2
        return F.pad(x, (left, w - sw - left, top, h - sh - top))  # (N, 1, H, W)
    shrink = sh > h or sw > w
    out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                        antialias=shrink)  # (N, 1, H, W)
    return out.clamp_(0.0, 1.0)
