"""Reader for the IDX format of the MNIST distribution files (optionally gzip-compressed).

Format (LeCun et al.): 2 zero bytes, a type code, the number of dimensions ``n``,
then ``n`` big-endian uint32 sizes, then the data in C order. Every field is
checked; a truncated, oversized or foreign file raises :class:`DataFormatError`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataFormatError

__all__ = ["read_idx", "parse_idx", "write_idx"]

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {v.newbyteorder(">") if v.itemsize > 1 else v: k for k, v in _TYPES.items()}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a numpy array."""
    if len(data) < 4:
        raise DataFormatError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataFormatError(f"{name}: bad IDX magic number {data[:4].hex()} (must start 0000)")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise DataFormatError(f"{name}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataFormatError(f"{name}: IDX file declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{name}: truncated IDX header ({len(data)} < {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = _TYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataFormatError(
            f"{name}: IDX file {kind}: dimensions {dims} need {expected} bytes, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_maybe_gzip(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, decompressed when they start with the gzip magic."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file; a ``.gz`` suffix (or gzip magic) means gzip-compressed."""
    return parse_idx(read_maybe_gzip(path), str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (gzip when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    arr = np.ascontiguousarray(array)
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    if dt not in _CODES:
        raise TypeError(f"IDX cannot store dtype {arr.dtype}")
    head = bytes([0, 0, _CODES[dt], arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = head + arr.astype(dt).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
