"""Segmentation overlays: an image in grey with its label map and a prediction in colour.

:func:`save_overlay_png` draws a few slices of a volume ``(D, H, W)`` (or one 2D image
``(H, W)``), one row per slice: the image alone, then the reference labels, then (if given)
the prediction, each label map a semi-transparent colour overlay with label 0 (background,
"other") left clear and negative labels (an ignore index, padding) left clear too.

Axes follow :mod:`torchcaps.data.volumes`' SAR order: ``D`` is the axial axis (inferior to
superior), ``H`` posterior to anterior, ``W`` left to right. Axial slices are ``image[d]``,
drawn with anterior up and the subject's left on the left; coronal slices (``coronal=True``)
are ``image[:, h]``, drawn with superior up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ._common import FigurePath, save

__all__ = ["overlay_colors", "save_overlay_png"]

# label 1, 2, ... (label 0 stays clear); matplotlib's tab10 without its grey
_PALETTE = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan",
            "tab:pink", "tab:olive", "tab:brown")


def _array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be (D, H, W) or (H, W), got shape {x.shape}")
    return x


def overlay_colors(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGBA ``(..., 4)`` for a label map: label ``k >= 1`` in the ``k``-th palette colour at
    opacity ``alpha``; label 0 and negative labels fully transparent."""
    labels = np.asarray(labels)
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for k in np.unique(labels):
        if k <= 0:
            continue
        rgba[labels == k] = (*to_rgba(_PALETTE[(int(k) - 1) % len(_PALETTE)])[:3], alpha)
    return rgba


def _default_slices(labels: np.ndarray, count: int) -> list[int]:
    """``count`` evenly spaced indices of the first axis among the slices holding a label > 0."""
    filled = np.flatnonzero((labels > 0).reshape(labels.shape[0], -1).any(axis=1))
    if filled.size == 0:
        filled = np.arange(labels.shape[0])
    picks = np.linspace(0, filled.size - 1, num=min(count, filled.size) + 2)[1:-1]
    return sorted({int(filled[int(round(p))]) for p in picks})


def save_overlay_png(path: str | Path, image, labels, prediction=None, slices: Sequence[int] | None = None,
                     class_names: Sequence[str] | None = None, *, coronal: bool = False, count: int = 4,
                     alpha: float = 0.45, dpi: int = 100) -> FigurePath:
    """Write a PNG of ``image`` slices with ``labels`` (and ``prediction``) overlaid.

    Args:
        path: the PNG to write.
        image: ``(D, H, W)`` volume or ``(H, W)`` image (numpy or tensor); drawn in grey between
            its 1st and 99th percentiles.
        labels: integer label map of ``image``'s shape.
        prediction: predicted labels of the same shape, drawn in a third column.
        slices: axial indices (along ``D``) to draw; default ``count`` evenly spaced slices
            among those holding a label > 0. With ``coronal``, the same number of coronal
            slices (along ``H``) is added, chosen the same way.
        class_names: a legend entry per label (label 0 is not drawn and gets none).
        coronal: add coronal slices below the axial ones.
        count: the number of slices chosen when ``slices`` is ``None``.
        alpha: opacity of the colour overlays.
        dpi: resolution of the PNG.

    Returns:
        The path written (a :class:`~torchcaps.viz.FigurePath`).
    """
    img = _array(image, "image").astype(np.float32)
    lab = _array(labels, "labels")
    pred = None if prediction is None else _array(prediction, "prediction")
    for name, arr in (("labels", lab), ("prediction", pred)):
        if arr is None:
            continue
        if arr.shape != img.shape:
            raise ValueError(f"{name} has shape {arr.shape}, image has {img.shape}")
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integer labels, got {arr.dtype}")
    if not np.isfinite(img).all():
        raise ValueError("image holds NaN or Inf values")
    if img.ndim == 2:  # one 2D image: a single "axial" slice
        img, lab = img[None], lab[None]
        pred = None if pred is None else pred[None]
        if slices not in (None, [0], (0,)):
            raise ValueError("slices applies to (D, H, W) volumes only")
        slices, coronal = [0], False
    if slices is None:
        slices = _default_slices(lab, count)
    slices = [int(s) for s in slices]
    if not slices or any(not 0 <= s < img.shape[0] for s in slices):
        raise ValueError(f"slices must be indices in [0, {img.shape[0]}), got {slices}")
    views = [(f"axial {s}", img[s], lab[s], None if pred is None else pred[s]) for s in slices]
    if coronal:
        for h in _default_slices(np.moveaxis(lab, 1, 0), len(slices)):
            views.append((f"coronal {h}", img[:, h], lab[:, h], None if pred is None else pred[:, h]))
    vmin, vmax = (float(v) for v in np.percentile(img, [1, 99]))
    vmax = vmax if vmax > vmin else vmin + 1.0

    columns = [("image", None), ("labels", 1)] + ([("prediction", 2)] if pred is not None else [])
    fig = Figure(figsize=(2.6 * len(columns), 2.6 * len(views) + 0.6))
    axes = fig.subplots(len(views), len(columns), squeeze=False)
    for row, (title, im, lb, pr) in enumerate(views):
        maps = (None, lb, pr)
        for col, (heading, which) in enumerate(columns):
            ax = axes[row, col]
            # origin="lower": H (anterior) or D (superior) points up
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            if which is not None:
                ax.imshow(overlay_colors(maps[which], alpha), origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(heading, fontsize=9)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    present = sorted({int(k) for k in np.unique(lab) if k > 0}
                     | ({int(k) for k in np.unique(pred) if k > 0} if pred is not None else set()))
    if present:
        names = list(class_names) if class_names is not None else []
        handles = [Patch(color=_PALETTE[(k - 1) % len(_PALETTE)],
                         label=names[k] if k < len(names) else f"label {k}") for k in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (2.6 * len(views) + 0.6), 1, 1))
    return save(fig, path, dpi)
