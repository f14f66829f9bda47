"""A user's image folder: one sub-folder per class, PNG or JPEG files, read with Pillow.

    ROOT/
      cat/  0001.png  0002.png ...
      dog/  a.jpg  b.jpeg ...

Classes are the sub-folders' names in sorted order (label 0 is the first); files are read
in sorted order within each class. Only ``.png``, ``.jpg`` and ``.jpeg`` files (any case)
directly inside a class folder are read; hidden entries and other files are ignored, so a
stray ``notes.txt`` does no harm. Every image must have the same width and height
(otherwise the first offending file is named, with both sizes). Grey images (Pillow modes
``1``, ``L``, ``LA``) give one channel; if any image is in colour, every image is read as
RGB (grey ones repeated over the three channels; alpha is dropped, palettes are applied).
16-bit and floating-point images are refused: convert them to 8 bits first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataFormatError

__all__ = ["IMAGE_SUFFIXES", "list_image_folder", "read_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY = ("1", "L", "LA")
_REFUSED = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_MAX_BYTES = 4 << 30  # default limit on the decoded size of the whole folder


def list_image_folder(
    root: str | os.PathLike, classes: tuple[str, ...] | None = None
) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """The image files under ``root`` with their labels, and the class names.

    Args:
        root: the folder of class sub-folders.
        classes: the class names to label by (e.g. those of the training folder, for a test
            folder); every sub-folder must be one of them. Default: ``root``'s sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataFormatError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE.png)")
    if classes is None:
        classes = tuple(found)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataFormatError(f"{root}: class folders {unknown} are not among the training "
                              f"classes {list(classes)}")
    files = []
    for name in found:
        images = sorted(p for p in (root / name).iterdir()
                        if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataFormatError(f"{root / name}: no .png/.jpg/.jpeg images in this class folder")
        files += [(p, classes.index(name)) for p in images]
    return files, tuple(classes)


def _open(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def read_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None,
                      max_bytes: int = _MAX_BYTES) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images uint8 ``(N, C, H, W)`` (``C`` 1 or 3), labels int64 ``(N,)`` and class names.

    Args:
        root: the folder (see the module docstring).
        classes: label by these class names (see :func:`list_image_folder`).
        max_bytes: refuse folders whose decoded images would exceed this many bytes.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("reading image folders needs Pillow: pip install pillow "
                          "(or pip install 'torchcaps[datasets]')") from None
    files, classes = list_image_folder(root, classes)
    pixels, first = [], None
    colour = False
    for path, _ in files:
        im = _open(path)
        if im.mode in _REFUSED:
            raise DataFormatError(f"{path}: {im.mode} images (16-bit or floating point) are not "
                                  "supported; convert them to 8-bit grey or RGB")
        if first is None:
            first = (path, im.size)
            need = len(files) * 3 * im.size[0] * im.size[1]
            if need > max_bytes:
                raise DataFormatError(f"{root}: {len(files):,} images of {im.size[0]}x{im.size[1]} "
                                      f"need up to {need:,} bytes, above the limit of {max_bytes:,}")
        elif im.size != first[1]:
            (w0, h0), (w, h) = first[1], im.size
            raise DataFormatError(f"{path}: image is {w}x{h} (width x height) but {first[0]} and "
                                  f"the images before it are {w0}x{h0}; every image must have "
                                  "the same size (resize them first)")
        grey = im.mode in _GREY
        colour |= not grey
        pixels.append(np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8))
    channels = 3 if colour else 1
    n, (w, h) = len(pixels), first[1]
    images = np.empty((n, channels, h, w), dtype=np.uint8)
    for i, px in enumerate(pixels):
        images[i] = px[None] if px.ndim == 2 else px.transpose(2, 0, 1)  # (C, H, W)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return images, labels, classes
