"""Dataset views: the load-time half of a preprocessing recipe, named in the dataset string.

A dataset string is ``SOURCE`` followed by any of these views, each after a ``+``, in
this order::

    smallnorb+resize48+crop32+standardize      cifar10+norm      digits+resize28

=================  ==========================================================================
``resizeN``        resize every split to N x N (``resizeHxW``: H x W), bilinear, antialiased
                   when shrinking, rounded back to uint8 once at load time
``cropN``          a model sees the centred N x N square (evaluation: the test-time crop);
                   training augmentation may take other N x N crops of the stored image
``norm``           per-channel ``(x - mean) / std`` with the mean and standard deviation of
                   the *training* split (as a model sees it), applied last
``standardize``    each image to zero mean and unit variance, applied last (Hinton et al. 2018)
=================  ==========================================================================

Because the views are part of the dataset's name, a checkpoint records them with the
dataset, and ``torchcaps evaluate`` rebuilds exactly the test-time images the model was
validated on. The training-time half of a recipe (random crops, flips, jitter) is the
``--augment`` recipe (:mod:`torchcaps.data.recipes`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .datasets import DatasetSplits, Split
from .transforms import center_crop, resize

__all__ = ["VIEW_HELP", "apply_views", "parse_views", "split_dataset_name"]

VIEW_HELP = "resizeN, cropN, norm, standardize"
_PATTERNS = (
    ("resize", re.compile(r"resize(\d+)(?:x(\d+))?")),
    ("crop", re.compile(r"crop(\d+)")),
    ("norm", re.compile(r"norm")),
    ("standardize", re.compile(r"standardize")),
)
_ORDER = [kind for kind, _ in _PATTERNS]


def _match(token: str) -> tuple[str, tuple[int, ...]] | None:
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(token)
        if m:
            return kind, tuple(int(g) for g in m.groups() if g is not None)
    return None


def split_dataset_name(name: str) -> tuple[str, list[str]]:
    """``("smallnorb", ["resize48", "crop32"])`` from ``"smallnorb+resize48+crop32"``.

    Only trailing ``+`` parts that are views are split off, so a path containing ``+``
    (``folder:my+data``) stays whole.
    """
    parts = name.split("+")
    views: list[str] = []
    while len(parts) > 1 and _match(parts[-1]) is not None:
        views.insert(0, parts.pop())
    return "+".join(parts), views


def parse_views(views: list[str], name: str = "") -> list[tuple[str, tuple[int, ...]]]:
    """Check the views and their order; ``[(kind, numbers), ...]``."""
    parsed = []
    for token in views:
        found = _match(token)
        if found is None:
            raise ValueError(f"{name}: unknown view {token!r} (views: {VIEW_HELP})")
        kind, numbers = found
        if any(n < 1 for n in numbers):
            raise ValueError(f"{name}: {token} needs a positive size")
        parsed.append(found)
    kinds = [k for k, _ in parsed]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{name}: each view may appear once, got {'+'.join(views)}")
    if kinds != sorted(kinds, key=_ORDER.index):
        raise ValueError(f"{name}: views must come in the order resize, crop, norm, standardize; "
                         f"got {'+'.join(views)}")
    if "norm" in kinds and "standardize" in kinds:
        raise ValueError(f"{name}: choose one of norm and standardize")
    return parsed


def _channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the images a model sees, in float64."""
    c = split.shape[0]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, len(split), 4096):
        x, _ = split.raw(slice(start, start + 4096))
        if split.crop is not None:
            x = center_crop(x, split.crop)
        x = x.double()  # (B, C, H, W)
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean * mean).clamp(min=0).sqrt().clamp(min=1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _resize(splits: dict[str, Split], numbers: tuple[int, ...], name: str) -> dict[str, Split]:
    hw = (numbers[0], numbers[-1])
    return {k: dataclasses.replace(s, images=resize(s.images, hw)) for k, s in splits.items()}


def _crop(splits: dict[str, Split], numbers: tuple[int, ...], name: str) -> dict[str, Split]:
    side = numbers[0]
    h, w = splits["train"].images.shape[-2:]
    if side > min(h, w):
        raise ValueError(f"{name}: crop{side} is larger than the {h}x{w} images")
    return {k: dataclasses.replace(s, crop=side) for k, s in splits.items()}


def _norm(splits: dict[str, Split], numbers: tuple[int, ...], name: str) -> dict[str, Split]:
    mean, std = _channel_stats(splits["train"])
    return {k: dataclasses.replace(s, mean=mean, std=std) for k, s in splits.items()}


def _standardize(splits: dict[str, Split], numbers: tuple[int, ...], name: str) -> dict[str, Split]:
    return {k: dataclasses.replace(s, standardize=True) for k, s in splits.items()}


_APPLY = {"resize": _resize, "crop": _crop, "norm": _norm, "standardize": _standardize}


def apply_views(data: DatasetSplits, views: list[str]) -> DatasetSplits:
    """``data`` seen through ``views`` (see the module docstring); the name is unchanged."""
    splits = {k: getattr(data, k) for k in ("train", "val", "test")}
    for kind, numbers in parse_views(views, data.name):
        splits = _APPLY[kind](splits, numbers, data.name)
    return dataclasses.replace(data, **splits)
