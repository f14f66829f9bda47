"""EMNIST (Cohen et al. 2017): gzipped IDX files inside the NIST ``gzip.zip`` archive.

The archive holds ``gzip/emnist-SPLIT-{train,test}-{images-idx3,labels-idx1}-ubyte.gz``
for every split (byclass, bymerge, balanced, letters, digits, mnist), in the IDX format of
MNIST (:mod:`torchcaps.data.idx`). Two conventions differ from MNIST and are undone here:

* the images are stored transposed (column-major); each is transposed back so that
  letters stand upright, as MNIST digits do;
* ``letters`` labels run 1-26 (a-z, upper and lower case merged); they are shifted to 0-25.

``balanced`` has 47 classes: digits 0-9, upper-case A-Z, and the lower-case letters whose
shape differs from their capitals (a b d e f g h n q r t).
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..idx import parse_idx

__all__ = ["read_emnist_zip", "EMNIST_CLASSES"]

EMNIST_CLASSES = {
    "balanced": tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") + tuple("abdefghnqrt"),
    "letters": tuple("abcdefghijklmnopqrstuvwxyz"),
}
_LABEL_OFFSET = {"balanced": 0, "letters": 1}


def read_emnist_zip(path: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """``train_images`` ``(N, 28, 28)``, ``train_labels``, ``test_images``, ``test_labels`` of one split.

    Args:
        path: the ``gzip.zip`` archive.
        split: ``"balanced"`` or ``"letters"``.
    """
    if split not in EMNIST_CLASSES:
        raise ValueError(f"split must be one of {sorted(EMNIST_CLASSES)}, got {split!r}")
    path = Path(path)
    classes = len(EMNIST_CLASSES[split])
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            by_name = {n.rsplit("/", 1)[-1]: n for n in zf.namelist()}
            for part in ("train", "test"):
                for kind, key in (("images-idx3", "images"), ("labels-idx1", "labels")):
                    member = f"emnist-{split}-{part}-{kind}-ubyte.gz"
                    if member not in by_name:
                        raise DataFormatError(f"{path.name}: archive lacks {member}")
                    where = f"{path.name}:{by_name[member]}"
                    try:
                        raw = gzip.decompress(zf.read(by_name[member]))
                    except (OSError, EOFError, zlib.error) as e:
                        raise DataFormatError(f"{where}: corrupt gzip stream ({e})") from None
                    out[f"{part}_{key}"] = parse_idx(raw, where)
    except DataFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataFormatError(f"{path.name}: corrupt or truncated zip archive ({e})") from None
    for part in ("train", "test"):
        x, y = out[f"{part}_images"], out[f"{part}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataFormatError(f"{path.name}: emnist-{split}-{part}: images {x.dtype} "
                                  f"{x.shape} do not match labels {y.shape}")
        y = y.astype(np.int64) - _LABEL_OFFSET[split]
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise DataFormatError(f"{path.name}: emnist-{split}-{part} labels out of range")
        out[f"{part}_images"] = np.ascontiguousarray(x.transpose(0, 2, 1))  # upright
        out[f"{part}_labels"] = y
    return out
