"""The user's own data as a dataset: ``folder:PATH`` and ``npz:TRAIN.npz[,TEST.npz]``.

``folder:PATH`` (PNG/JPEG, one sub-folder per class; :mod:`torchcaps.data.formats.folder`):

    PATH/train/CLASS/*.png    training images (required if PATH/test exists)
    PATH/test/CLASS/*.png     test images (optional; its classes must be training classes)

or simply ``PATH/CLASS/*.png`` (no ``train/`` folder): all of it is training data.

``npz:TRAIN.npz`` or ``npz:TRAIN.npz,TEST.npz``: labelled ``.npz`` files holding
``images`` uint8 ``(N, H, W)`` (grey; read by :func:`~torchcaps.data.labelled.load_labelled_npz`)
or ``(N, C, H, W)`` (``C`` 1 to 4), and integer ``labels`` ``(N,)``. Every size and dtype
is checked on the ``.npy`` headers before anything is decompressed.

Without a test folder or file, a fixed tenth of the training images (at least one; the
same images whatever ``split_seed``) is set aside as the test split, and validation is
then carved from the rest, as for every dataset. The number of classes is the number of
class folders, or the largest label + 1 over both npz files; the test images must have
the training images' channels and size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import NPZ_MAX_BYTES, load_npz
from .errors import DataFormatError
from .formats.folder import read_image_folder
from .labelled import load_labelled_npz

__all__ = ["USER_PREFIXES", "load_user_arrays", "TEST_FRACTION"]

USER_PREFIXES = ("folder:", "npz:")
TEST_FRACTION = 10  # 1/10 of the training images become the test split when none is given
_TEST_SEED = 0


class _Peeked(Exception):
    """Stops :func:`load_npz` once the headers are read (nothing is decompressed)."""


def _image_rank(path: Path) -> int:
    seen = {}

    def peek(specs: dict) -> None:
        seen.update(specs)
        raise _Peeked

    try:
        load_npz(path, ("images",), check=peek)
    except _Peeked:
        pass
    return len(seen["images"][0])


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, C, H, W) uint8, labels int64)`` from one labelled npz."""
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if _image_rank(path) != 4:  # grey (N, H, W): the reader of labelled files checks it all
        images, labels = load_labelled_npz(path)
        return images.numpy()[:, None], labels.numpy()
    name = str(path)

    def check(s: dict) -> None:
        (ishape, idtype), (lshape, ldtype) = s["images"], s["labels"]
        if idtype != np.uint8 or len(ishape) != 4 or not 1 <= ishape[1] <= 4:
            raise DataFormatError(f"{name}: images must be uint8 (N, H, W) or (N, C, H, W) with "
                                  f"C in 1-4, got {idtype} {ishape}")
        if ldtype.kind not in "iu" or len(lshape) != 1 or lshape[0] != ishape[0] or not ishape[0]:
            raise DataFormatError(f"{name}: labels must be integers (N,) for the {ishape[0]} "
                                  f"images, got {ldtype} {lshape}")

    arrays = load_npz(path, ("images", "labels"), max_bytes=NPZ_MAX_BYTES, check=check)
    labels = arrays["labels"]
    if labels.min() < 0:
        raise DataFormatError(f"{name}: labels must be non-negative, got {labels.min()}")
    return arrays["images"], labels.astype(np.int64)


def _set_aside_test(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    n = labels.shape[0]
    if n < 3:
        raise DataFormatError(f"only {n} training images: too few to set a test split aside")
    k = max(1, n // TEST_FRACTION)
    perm = np.random.default_rng(_TEST_SEED).permutation(n)
    test, train = np.sort(perm[:k]), np.sort(perm[k:])
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


def _check_same_layout(arrays: dict[str, np.ndarray], what: str) -> None:
    a, b = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if a != b:
        raise DataFormatError(f"{what}: test images are {b} (C, H, W) but training images are {a}")


def load_user_arrays(source: str) -> tuple[dict[str, np.ndarray], int, tuple[str, ...] | None]:
    """``(arrays, num_classes, class names)`` for ``folder:PATH`` or ``npz:TRAIN[,TEST]``."""
    kind, _, rest = source.partition(":")
    if not rest:
        raise ValueError(f"{source!r}: give a path after {kind}:")
    if kind == "folder":
        root = Path(rest).expanduser()
        train_dir = root / "train" if (root / "train").is_dir() else root
        if train_dir == root and (root / "test").is_dir():
            raise DataFormatError(f"{root}: has a test/ folder but no train/ folder; put the "
                                  "training classes in train/")
        images, labels, classes = read_image_folder(train_dir)
        if (root / "test").is_dir() and train_dir != root:
            ti, tl, _ = read_image_folder(root / "test", classes)
            arrays = {"train_images": images, "train_labels": labels,
                      "test_images": ti, "test_labels": tl}
        else:
            arrays = _set_aside_test(images, labels)
        _check_same_layout(arrays, str(root))
        return arrays, len(classes), classes
    if kind == "npz":
        paths = [Path(p).expanduser() for p in rest.split(",")]
        if len(paths) > 2 or not all(str(p) for p in paths):
            raise ValueError(f"{source!r}: expected npz:TRAIN.npz or npz:TRAIN.npz,TEST.npz")
        images, labels = _npz(paths[0])
        if len(paths) == 2:
            ti, tl = _npz(paths[1])
            arrays = {"train_images": images, "train_labels": labels,
                      "test_images": ti, "test_labels": tl}
        else:
            arrays = _set_aside_test(images, labels)
        _check_same_layout(arrays, rest)
        top = max(int(arrays["train_labels"].max()), int(arrays["test_labels"].max()))
        if top < 1:
            raise DataFormatError(f"{rest}: every label is 0; a classifier needs at least 2 classes")
        return arrays, top + 1, None
    raise ValueError(f"unknown data source {source!r} (user data: folder:PATH or npz:PATH)")
