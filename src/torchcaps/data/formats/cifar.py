"""CIFAR-10 / CIFAR-100 "python version": pickled batches inside a ``.tar.gz``.

Layout (Krizhevsky, https://www.cs.toronto.edu/~kriz/cifar.html): the archive holds a
folder (``cifar-10-batches-py/`` or ``cifar-100-python/``) of batch files, each a pickled
dict written by Python 2 with ``data``, a uint8 ``(N, 3072)`` array whose rows are one
image's red, green and blue 32x32 planes in row-major order, and the labels as a list of
ints: ``labels`` (CIFAR-10: ``data_batch_1`` .. ``_5`` and ``test_batch``, 10,000 images
each) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100: ``train`` 50,000 and ``test``
10,000 images), plus names we ignore.

A pickle runs whatever callable it names, so the batches are read only through
:func:`torchcaps.data.safe_pickle.load_numpy_pickle` with ``plain=True`` (numeric arrays,
dicts, lists, strings and numbers; nothing callable but numpy's array constructor), which
is why torchvision's CIFAR class (plain ``pickle.load``) is not used. Members are read
from the archive into memory, never extracted onto disk.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..safe_pickle import load_numpy_pickle

__all__ = ["read_cifar_batch", "read_cifar_archive"]

_MAX_MEMBER = 1 << 30  # bytes; the largest real batch (CIFAR-100 train) is about 155 MB


def read_cifar_batch(data: bytes, name: str, label_key: str = "labels",
                     num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` from one pickled batch.

    Args:
        data: the batch file's bytes.
        name: the file's name, for error messages.
        label_key: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"`` (CIFAR-100).
        num_classes: if given, labels must lie in ``[0, num_classes)``.
    """
    obj = load_numpy_pickle(data, plain=True)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{name}: not a CIFAR batch (a pickled dict), got {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise DataFormatError(f"{name}: CIFAR batch lacks {missing} (has {sorted(batch)})")
    x = batch["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataFormatError(f"{name}: 'data' must be uint8 (N, 3072), got {got}")
    try:
        y = np.asarray(batch[label_key])
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{name}: {label_key!r} is not a list of integers ({e})") from None
    if y.ndim != 1 or y.shape[0] != x.shape[0] or (y.size and y.dtype.kind not in "iu"):
        raise DataFormatError(f"{name}: {label_key!r} must hold {x.shape[0]} integers, got "
                              f"{y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise DataFormatError(f"{name}: labels must lie in [0, {num_classes}), got range "
                              f"[{y.min()}, {y.max()}]")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)  # rows: R, G, B planes of 32x32


def read_cifar_archive(path: str | os.PathLike, train: tuple[str, ...], test: str,
                       label_key: str = "labels",
                       num_classes: int | None = None) -> dict[str, np.ndarray]:
    """``train_images``, ``train_labels``, ``test_images``, ``test_labels`` from a CIFAR tar.gz.

    Args:
        path: ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``.
        train: names of the training batch files, concatenated in this order.
        test: name of the test batch file.
        label_key, num_classes: see :func:`read_cifar_batch`.
    """
    path = Path(path)
    wanted = (*train, test)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted or not member.isfile():
                    continue
                if member.size > _MAX_MEMBER:
                    raise DataFormatError(f"{path.name}: member {member.name} declares "
                                          f"{member.size:,} bytes, more than any CIFAR batch")
                raw = tar.extractfile(member).read()
                found[base] = read_cifar_batch(raw, f"{path.name}:{member.name}", label_key,
                                               num_classes)
    except DataFormatError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{path.name}: corrupt or truncated tar.gz archive ({e})") from None
    missing = [n for n in wanted if n not in found]
    if missing:
        raise DataFormatError(f"{path.name}: archive lacks the batches {missing}")
    tx, ty = zip(*(found[n] for n in train))
    return {"train_images": np.concatenate(tx), "train_labels": np.concatenate(ty),
            "test_images": found[test][0], "test_labels": found[test][1]}
