"""smallNORB (LeCun, Huang, Bottou 2004): NORB binary matrix files, optionally gzipped.

The dataset (https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/) is 24,300 training and
24,300 test *stereo pairs* of 96x96 grey images of 50 toys in 5 categories (animal, human,
airplane, truck, car), 5 instances per category in each set, under 9 elevations, 18
azimuths and 6 lightings. Each set is three files: ``-dat`` (the images, uint8
``(24300, 2, 96, 96)``: pair, camera, rows, columns), ``-cat`` (the category, int32
``(24300,)``) and ``-info`` (instance, elevation, azimuth, lighting; not read here).

Format of one file (all integers little-endian int32):

    =======  ==============================================================
    magic    0x1E3D4C55 uint8, 0x1E3D4C54 int32, 0x1E3D4C56 int16,
             0x1E3D4C51 float32, 0x1E3D4C53 float64
    ndim     number of dimensions
    dims     max(3, ndim) sizes; the ones past ndim are padding (1)
    data     prod(dims[:ndim]) values in C order
    =======  ==============================================================

Every field is checked: a wrong magic, a truncated file or trailing bytes raise
:class:`DataFormatError` naming the file.

Channels: ``channels="left"`` keeps camera 0 as one grey channel, ``(N, 1, 96, 96)``, as
the capsule papers do; ``"stereo"`` keeps both cameras as two channels ``(N, 2, 96, 96)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..idx import read_maybe_gzip

__all__ = ["NORB_TYPES", "read_norb_matrix", "read_smallnorb"]

#: magic number -> element type (little-endian)
NORB_TYPES = {
    0x1E3D4C55: np.dtype(np.uint8),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C56: np.dtype("<i2"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
}


def read_norb_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read one NORB binary matrix (``.mat`` or ``.mat.gz``) into a numpy array."""
    path = Path(path)
    raw = read_maybe_gzip(path)
    if len(raw) < 8:
        raise DataFormatError(f"{path.name}: too short for a NORB header ({len(raw)} bytes)")
    magic, ndim = (int(v) for v in np.frombuffer(raw, "<i4", 2))
    if magic not in NORB_TYPES:
        raise DataFormatError(f"{path.name}: bad NORB magic number 0x{magic & 0xFFFFFFFF:08X}")
    if not 1 <= ndim <= 16:
        raise DataFormatError(f"{path.name}: implausible number of dimensions {ndim}")
    header = 8 + 4 * max(3, ndim)
    if len(raw) < header:
        raise DataFormatError(f"{path.name}: truncated NORB header ({len(raw)} < {header} bytes)")
    dims = tuple(int(v) for v in np.frombuffer(raw, "<i4", ndim, offset=8))
    if min(dims) < 0:
        raise DataFormatError(f"{path.name}: negative dimension in {dims}")
    dtype = NORB_TYPES[magic]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataFormatError(f"{path.name}: NORB file {kind}: dimensions {dims} need "
                              f"{expected:,} bytes, got {len(raw):,}")
    arr = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_smallnorb(dat: str | os.PathLike, cat: str | os.PathLike,
                   channels: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, C, 96, 96)`` and labels int64 ``(N,)`` (0-4) of one smallNORB set.

    Args:
        dat: the ``-dat`` file (images).
        cat: the ``-cat`` file (categories).
        channels: ``"left"`` (camera 0, ``C = 1``) or ``"stereo"`` (both cameras, ``C = 2``).
    """
    if channels not in ("left", "stereo"):
        raise ValueError(f"channels must be 'left' or 'stereo', got {channels!r}")
    images, labels = read_norb_matrix(dat), read_norb_matrix(cat)
    name = Path(dat).name
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 2:
        raise DataFormatError(f"{name}: expected uint8 stereo pairs (N, 2, H, W), got "
                              f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise DataFormatError(f"{Path(cat).name}: expected {images.shape[0]} integer categories, "
                              f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 4):
        raise DataFormatError(f"{Path(cat).name}: categories must be 0-4, got range "
                              f"[{labels.min()}, {labels.max()}]")
    if channels == "left":
        images = images[:, :1]  # (N, 1, H, W): camera 0
    return np.ascontiguousarray(images), labels.astype(np.int64)
