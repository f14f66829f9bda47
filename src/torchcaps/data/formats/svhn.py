"""SVHN, cropped digits (Netzer et al. 2011): ``train_32x32.mat`` and ``test_32x32.mat``.

Each MATLAB file (read with ``scipy.io.loadmat``) holds ``X``, uint8 ``(32, 32, 3, N)``
(rows, columns, RGB, image), and ``y``, ``(N, 1)`` labels 1-10 where 10 stands for the
digit 0. We return images ``(N, 3, 32, 32)`` and labels 0-9 (10 -> 0), the convention
under which SVHN results are usually reported. The ``extra`` set (531,131 images) is not
read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataFormatError

__all__ = ["read_svhn_mat"]


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` in 0-9 from an SVHN ``.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading SVHN .mat files needs scipy: pip install scipy "
                          "(or pip install 'torchcaps[datasets]')") from None
    path = Path(path)
    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on bad files
        raise DataFormatError(f"{path.name}: not a readable MATLAB file "
                              f"({type(e).__name__}: {e})") from None
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise DataFormatError(f"{path.name}: no variables {missing} in this MATLAB file")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFormatError(f"{path.name}: X must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    n = x.shape[3]
    if y.size != n or (y.ndim == 2 and 1 not in y.shape) or y.ndim > 2:
        raise DataFormatError(f"{path.name}: y must hold {n} labels, got shape {y.shape}")
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        raise DataFormatError(f"{path.name}: y holds non-integer labels")
    if y.dtype.kind not in "iuf" or (n and (y.min() < 1 or y.max() > 10)):
        raise DataFormatError(f"{path.name}: labels must be 1-10 (10 for the digit 0)")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (32, 32, 3, N) -> (N, 3, 32, 32)
    return images, (y.astype(np.int64) % 10)
