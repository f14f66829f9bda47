"""A restricted unpickler that admits plain numeric numpy arrays and nothing else.

Pickle runs whatever callable the file names, so an untrusted pickle can execute
arbitrary code on load. :func:`load_numpy_pickle` resolves only the three globals
a pickled ``numpy.ndarray`` needs (``_reconstruct``, ``ndarray``, ``dtype``),
refuses every other global, and then checks that every array in the result has a
numeric dtype (an ``object`` array could smuggle other objects).

With ``plain=True`` the result may also hold dicts, lists, tuples, strings, bytes, numbers
and ``None`` around the arrays: the shape of the CIFAR python batches (a dict of an array
and lists of labels and file names). Pickle builds these with its own opcodes, never by
calling a named global, so admitting them admits no code.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from .errors import DataFormatError

__all__ = ["load_numpy_pickle", "UnsafePickleError"]


class UnsafePickleError(DataFormatError):
    """The pickle references something other than plain numpy arrays."""


def _reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _latin1_encode():
    """``_codecs.encode``, restricted to latin-1: Python 3 writes bytes this way in protocol 2."""
    import codecs

    def encode(text: str, encoding: str = "utf-8") -> bytes:
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
        return codecs.encode(text, "latin1")

    return encode


_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: only plain numpy arrays are allowed"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids")


_SCALARS = (bool, int, float, str, bytes, type(None))


def _check_arrays(obj: Any, plain: bool, depth: int = 0) -> None:
    if depth > 8:
        raise UnsafePickleError("pickled structure nested too deeply")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise UnsafePickleError(f"refusing a numpy array of dtype {obj.dtype}")
    elif isinstance(obj, (tuple, list)):
        if plain and all(type(item) in _SCALARS for item in obj):
            return  # a list of labels or file names: nothing nested to check
        for item in obj:
            _check_arrays(item, plain, depth + 1)
    elif plain and isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) not in (str, bytes):
                raise UnsafePickleError(f"unexpected dict key of type {type(key).__name__}")
            _check_arrays(value, plain, depth + 1)
    elif not (plain and type(obj) in _SCALARS):
        allowed = "arrays, dicts, lists, strings and numbers" if plain else "arrays only"
        raise UnsafePickleError(f"unexpected {type(obj).__name__} in pickle ({allowed})")


def load_numpy_pickle(data: bytes, plain: bool = False) -> Any:
    """Unpickle ``data`` that must hold only (nested tuples/lists of) numeric numpy arrays.

    Args:
        data: the pickle's bytes (protocol 0-5; Python 2 strings are read as latin-1).
        plain: also admit dicts, strings, bytes, numbers and ``None`` (see the module
            docstring); the arrays in them must still be numeric.
    """
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt stream: many exception types
        raise DataFormatError(f"corrupt or truncated pickle ({type(e).__name__}: {e})") from None
    _check_arrays(obj, plain)
    return obj
