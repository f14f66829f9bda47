"""Readers of every dataset format, on small files written here in the exact published layout.

The writers below (``write_*``) produce the on-disk formats byte for byte as published:
IDX gz (Fashion-MNIST, KMNIST), the EMNIST ``gzip.zip``, CIFAR python batches (dicts
pickled with protocol 2, bytes keys, as the Python 2 originals), SVHN ``.mat`` (scipy's
``savemat``), smallNORB binary matrices (a small writer of the NORB format), affNIST
``.mat`` files zipped. :func:`populate` puts such files into a cache's ``downloads/`` folder
and points the catalog's digests at them, so ``load_dataset`` runs its real path. The other
``test_datasets_*`` files import these helpers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from torchcaps.data import ChecksumError, DataFormatError, UnsafePickleError, catalog, load_dataset, write_idx
from torchcaps.data.datasets import carve
from torchcaps.data.formats import (
    read_cifar_archive,
    read_cifar_batch,
    read_emnist_zip,
    read_norb_matrix,
    read_smallnorb,
    read_svhn_mat,
)
from torchcaps.data.sources import SOURCES, RemoteFile

scipy_io = pytest.importorskip("scipy.io")

NORB_MAGIC = {np.dtype(np.uint8): 0x1E3D4C55, np.dtype(np.int32): 0x1E3D4C54}


# ----------------------------------------------------------------------------- writers


def write_norb(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """A NORB binary matrix: magic, ndim, max(3, ndim) sizes (padded with 1), data (LE)."""
    a = np.ascontiguousarray(array)
    dims = list(a.shape) + [1] * max(0, 3 - a.ndim)
    head = np.array([NORB_MAGIC[a.dtype], a.ndim, *dims], dtype="<i4").tobytes()
    payload = head + a.astype(a.dtype.newbyteorder("<")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _gz_idx(array: np.ndarray) -> bytes:
    """A gzipped IDX file of uint8 ``array`` (the layout of ``write_idx``), as bytes."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(head + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def cifar_batch(images: np.ndarray, labels: np.ndarray, key: bytes = b"labels",
                extra: dict | None = None) -> bytes:
    """A batch pickled like the originals: a dict with bytes keys, ``data`` uint8 (N, 3072)."""
    d = {b"batch_label": b"training batch 1 of 5", key: [int(v) for v in labels],
         b"data": images.reshape(len(images), 3072), b"filenames": [b"x.png"] * len(images)}
    d.update(extra or {})
    return pickle.dumps(d, protocol=2)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _affnist_mat_zip(path: Path, images: np.ndarray, labels: np.ndarray, inner: str) -> None:
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"affNISTdata": {"image": images.reshape(len(images), 1600).T.copy(),
                                           "label_int": labels.astype(np.uint8)[None, :]}})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(inner, buf.getvalue())


def _rng_images(rng, n, shape):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def write_dataset(name: str, folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    """Write ``name``'s published files into ``folder``; returns the arrays they encode
    (images ``(N, C, H, W)`` as torchcaps reads them, labels int64)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if name in ("fashion-mnist", "kmnist"):
        for part, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
            x, y = _rng_images(rng, n, (28, 28)), rng.integers(0, 10, n).astype(np.uint8)
            write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
            out[part] = (x[:, None], y.astype(np.int64))
    elif name.startswith("emnist-"):
        members = {}
        for split, classes, offset in (("balanced", 47, 0), ("letters", 26, 1)):
            for part, n in (("train", n_train), ("test", n_test)):
                x, y = _rng_images(rng, n, (28, 28)), rng.integers(0, classes, n)
                stored = x.transpose(0, 2, 1)  # EMNIST stores each image transposed
                members[f"gzip/emnist-{split}-{part}-images-idx3-ubyte.gz"] = _gz_idx(stored)
                members[f"gzip/emnist-{split}-{part}-labels-idx1-ubyte.gz"] = _gz_idx(
                    (y + offset).astype(np.uint8))
                if name == f"emnist-{split}":
                    out[part] = (x[:, None], y.astype(np.int64))
        with zipfile.ZipFile(folder / "gzip.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for member, blob in members.items():
                zf.writestr(member, blob)
    elif name == "cifar10":
        batches, xs, ys = {}, [], []
        per = max(1, n_train // 5)
        for i in range(1, 6):
            x, y = _rng_images(rng, per, (3, 32, 32)), rng.integers(0, 10, per)
            batches[f"cifar-10-batches-py/data_batch_{i}"] = cifar_batch(x, y)
            xs.append(x), ys.append(y)
        x, y = _rng_images(rng, n_test, (3, 32, 32)), rng.integers(0, 10, n_test)
        batches["cifar-10-batches-py/test_batch"] = cifar_batch(x, y)
        batches["cifar-10-batches-py/batches.meta"] = pickle.dumps(
            {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per}, protocol=2)
        _tar(folder / "cifar-10-python.tar.gz", batches)
        out = {"train": (np.concatenate(xs), np.concatenate(ys)), "test": (x, y)}
    elif name == "cifar100":
        members = {}
        for part, n in (("train", n_train), ("test", n_test)):
            x, y = _rng_images(rng, n, (3, 32, 32)), rng.integers(0, 100, n)
            members[f"cifar-100-python/{part}"] = cifar_batch(
                x, y, key=b"fine_labels", extra={b"coarse_labels": [int(v) // 5 for v in y]})
            out[part] = (x, y)
        _tar(folder / "cifar-100-python.tar.gz", members)
    elif name == "svhn":
        for part, n in (("train", n_train), ("test", n_test)):
            x, digit = _rng_images(rng, n, (3, 32, 32)), rng.integers(0, 10, n)
            y = np.where(digit == 0, 10, digit).astype(np.uint8)[:, None]  # 10 stands for 0
            scipy_io.savemat(str(folder / f"{part}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": y})
            out[part] = (x, digit)
    elif name.startswith("smallnorb"):
        for part, ids, word, n in (("train", "46789", "training", n_train),
                                   ("test", "01235", "testing", n_test)):
            pairs, y = _rng_images(rng, n, (2, 96, 96)), rng.integers(0, 5, n).astype(np.int32)
            base = f"smallnorb-5x{ids}x9x18x6x2x96x96-{word}"
            write_norb(folder / f"{base}-dat.mat.gz", pairs)
            write_norb(folder / f"{base}-cat.mat.gz", y)
            write_norb(folder / f"{base}-info.mat.gz", np.zeros((n, 4), np.int32))
            out[part] = (pairs if name.endswith("stereo") else pairs[:, :1], y.astype(np.int64))
    elif name == "affnist":
        for part, archive, inner, n in (
                ("train", "training_and_validation.mat.zip", "training_and_validation.mat", n_train),
                ("test", "test.mat.zip", "test.mat", n_test)):
            x, y = _rng_images(rng, n, (40, 40)), rng.integers(0, 10, n)
            _affnist_mat_zip(folder / archive, x, y, inner)
            out[part] = (x[:, None], y.astype(np.int64))
    else:
        raise KeyError(name)
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def pin_digests(monkeypatch, name: str, folder: Path) -> None:
    """Point the catalog's digests for ``name`` at the files written into ``folder``."""
    monkeypatch.setitem(SOURCES, name, tuple(
        RemoteFile(f.name, f.urls, md5=md5(folder / f.name)) for f in SOURCES[name]))


def populate(monkeypatch, cache: Path, name: str, **sizes) -> dict:
    """Write ``name``'s files into ``cache/downloads`` with matching digests; the arrays."""
    arrays = write_dataset(name, cache / "downloads", **sizes)
    pin_digests(monkeypatch, name, cache / "downloads")
    return arrays


DOWNLOADED = ("fashion-mnist", "kmnist", "emnist-balanced", "emnist-letters", "cifar10", "cifar100",
              "svhn", "smallnorb", "smallnorb-stereo", "affnist")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", DOWNLOADED)
def test_every_format_reads_back_through_the_catalog(name, tmp_path, monkeypatch):
    expected = populate(monkeypatch, tmp_path, name)
    d = load_dataset(name, tmp_path, val_size=2)
    spec = catalog.get_dataset_spec(name)
    assert d.in_shape == spec.in_shape and d.num_classes == spec.num_classes
    # validation is carved from the training file: put both back where they came from
    train_idx, val_idx = carve(len(d.train) + len(d.val), len(d.val), 0, name)
    got = np.empty_like(expected["train"][0])
    got[train_idx], got[val_idx] = d.train.images.numpy(), d.val.images.numpy()
    got_y = np.empty_like(expected["train"][1])
    got_y[train_idx], got_y[val_idx] = d.train.labels.numpy(), d.val.labels.numpy()
    np.testing.assert_array_equal(got, expected["train"][0])
    np.testing.assert_array_equal(got_y, expected["train"][1])
    np.testing.assert_array_equal(d.test.images.numpy(), expected["test"][0])
    np.testing.assert_array_equal(d.test.labels.numpy(), expected["test"][1])
    assert d.test.labels.dtype == torch.int64 and d.train.images.dtype == torch.uint8
    # converted once into the cache, with its checksum; a second load reads only that
    assert (tmp_path / f"{name}.npz").is_file() and (tmp_path / f"{name}.npz.sha256").is_file()
    for f in (tmp_path / "downloads").iterdir():
        f.unlink()
    again = load_dataset(name, tmp_path, val_size=2, download=False)
    assert torch.equal(again.test.images, d.test.images)


def test_emnist_images_are_transposed_upright_and_letters_start_at_zero(tmp_path):
    rng = np.random.default_rng(3)
    x = _rng_images(rng, 4, (28, 28))
    x[:, :, 0] = 255  # a bar along the left edge of every upright image
    members = {}
    for split, offset, classes in (("balanced", 0, 47), ("letters", 1, 26)):
        for part in ("train", "test"):
            members[f"gzip/emnist-{split}-{part}-images-idx3-ubyte.gz"] = _gz_idx(x.transpose(0, 2, 1))
            members[f"gzip/emnist-{split}-{part}-labels-idx1-ubyte.gz"] = _gz_idx(
                np.array([0, 1, classes - 1, 2], np.uint8) + offset)
    with zipfile.ZipFile(tmp_path / "gzip.zip", "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    for split, top in (("balanced", 46), ("letters", 25)):
        got = read_emnist_zip(tmp_path / "gzip.zip", split)
        np.testing.assert_array_equal(got["train_images"], x)
        assert (got["train_images"][:, :, 0] == 255).all()  # the bar is on the left again
        assert got["test_labels"].tolist() == [0, 1, top, 2]
    with zipfile.ZipFile(tmp_path / "short.zip", "w") as zf:
        zf.writestr("gzip/emnist-balanced-train-images-idx3-ubyte.gz", members[
            "gzip/emnist-balanced-train-images-idx3-ubyte.gz"])
    with pytest.raises(DataFormatError, match="short.zip: archive lacks emnist-balanced-train-labels"):
        read_emnist_zip(tmp_path / "short.zip", "balanced")


def test_cifar_batches_go_through_the_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(4)
    x, y = _rng_images(rng, 3, (3, 32, 32)), np.array([0, 9, 4])
    # rows of data are the R, G, B planes of each image, row-major
    flat = x.reshape(3, 3072)
    images, labels = read_cifar_batch(cifar_batch(x, y), "b")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(images[1, 2].reshape(-1), flat[1, 2048:])
    assert labels.tolist() == [0, 9, 4] and labels.dtype == np.int64
    # str keys (a batch written by Python 3 with str keys) read the same
    plain = pickle.dumps({"data": flat, "labels": [0, 9, 4]}, protocol=4)
    np.testing.assert_array_equal(read_cifar_batch(plain, "b")[0], x)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(UnsafePickleError, match="refusing to unpickle .*print"):
        read_cifar_batch(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2), "evil")
    bad = {
        "nodata": ({b"labels": [1]}, "lacks \\['data'\\]"),
        "shape": ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
        "float": ({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}, "uint8"),
        "count": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must hold 2"),
        "range": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "lie in \\[0, 10\\)"),
    }
    for what, (content, pattern) in bad.items():
        with pytest.raises(DataFormatError, match=pattern):
            read_cifar_batch(pickle.dumps(content, protocol=2), what, num_classes=10)
    with pytest.raises(DataFormatError, match="not a CIFAR batch"):
        read_cifar_batch(pickle.dumps([flat], protocol=2), "list")
    # a truncated archive is one clear error naming it
    write_dataset("cifar10", tmp_path)
    raw = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="cut.tar.gz: corrupt or truncated"):
        read_cifar_archive(tmp_path / "cut.tar.gz", ("data_batch_1",), "test_batch")
    with pytest.raises(DataFormatError, match="lacks the batches \\['data_batch_9'\\]"):
        read_cifar_archive(tmp_path / "cifar-10-python.tar.gz", ("data_batch_9",), "test_batch")


def test_svhn_labels_map_ten_to_zero_and_malformed_files_are_named(tmp_path):
    x = np.arange(2 * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 32, 32)
    scipy_io.savemat(str(tmp_path / "a.mat"), {"X": x.transpose(2, 3, 1, 0),
                                               "y": np.array([[10], [3]], np.uint8)})
    images, labels = read_svhn_mat(tmp_path / "a.mat")
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == [0, 3]
    scipy_io.savemat(str(tmp_path / "b.mat"), {"X": x.transpose(2, 3, 1, 0),
                                               "y": np.array([[0], [3]], np.uint8)})
    with pytest.raises(DataFormatError, match="b.mat: labels must be 1-10"):
        read_svhn_mat(tmp_path / "b.mat")
    scipy_io.savemat(str(tmp_path / "c.mat"), {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DataFormatError, match="c.mat: X must be uint8 \\(32, 32, 3, N\\)"):
        read_svhn_mat(tmp_path / "c.mat")
    (tmp_path / "d.mat").write_bytes((tmp_path / "a.mat").read_bytes()[:300])
    with pytest.raises(DataFormatError, match="d.mat"):
        read_svhn_mat(tmp_path / "d.mat")


def test_norb_matrix_header_and_every_defect(tmp_path):
    a = np.random.default_rng(5).integers(0, 256, (3, 2, 96, 96), dtype=np.uint8)
    write_norb(tmp_path / "dat.mat", a, gz=False)
    raw = (tmp_path / "dat.mat").read_bytes()
    assert raw[:4] == bytes.fromhex("554c3d1e")  # 0x1E3D4C55 little-endian: a byte matrix
    assert np.frombuffer(raw[4:24], "<i4").tolist() == [4, 3, 2, 96, 96]
    np.testing.assert_array_equal(read_norb_matrix(tmp_path / "dat.mat"), a)
    cat = np.array([4, 0, 2], np.int32)
    write_norb(tmp_path / "cat.mat.gz", cat)  # 1-D: three sizes stored, the last two padding
    assert read_norb_matrix(tmp_path / "cat.mat.gz").tolist() == [4, 0, 2]
    left, y = read_smallnorb(tmp_path / "dat.mat", tmp_path / "cat.mat.gz")
    np.testing.assert_array_equal(left, a[:, :1])
    both, _ = read_smallnorb(tmp_path / "dat.mat", tmp_path / "cat.mat.gz", channels="stereo")
    np.testing.assert_array_equal(both, a)
    cases = {
        "magic": (b"\x00\x00\x00\x00" + raw[4:], "bad NORB magic"),
        "short": (raw[:-5], "NORB file truncated: dimensions \\(3, 2, 96, 96\\)"),
        "long": (raw + b"\x00", "NORB file has trailing bytes"),
        "header": (raw[:12], "truncated NORB header"),
        "gzip": (gzip.compress(raw)[:100], "corrupt or truncated gzip"),
    }
    for what, (blob, pattern) in cases.items():
        (tmp_path / f"{what}.mat").write_bytes(blob)
        with pytest.raises(DataFormatError, match=f"{what}.mat: {pattern}"):
            read_norb_matrix(tmp_path / f"{what}.mat")
    write_norb(tmp_path / "bad-cat.mat", np.array([0, 7, 1], np.int32), gz=False)
    with pytest.raises(DataFormatError, match="categories must be 0-4"):
        read_smallnorb(tmp_path / "dat.mat", tmp_path / "bad-cat.mat")


def test_corrupted_downloads_are_one_clear_error_naming_the_file(tmp_path, monkeypatch):
    populate(monkeypatch, tmp_path, "svhn")
    target = tmp_path / "downloads" / "test_32x32.mat"
    target.write_bytes(target.read_bytes()[:-100])  # corrupted after its digest was recorded
    with pytest.raises(ChecksumError, match="test_32x32.mat: MD5 mismatch .* delete it"):
        load_dataset("svhn", tmp_path, val_size=2)
    # a file that matches its (here: repinned) digest but is not the format is named too
    pin_digests(monkeypatch, "svhn", tmp_path / "downloads")
    with pytest.raises(DataFormatError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path, val_size=2)
    # the converted cache is checked by its own SHA-256 on every load
    populate(monkeypatch, tmp_path / "c2", "kmnist")
    load_dataset("kmnist", tmp_path / "c2", val_size=2)
    cached = tmp_path / "c2" / "kmnist.npz"
    cached.write_bytes(cached.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="kmnist.npz"):
        load_dataset("kmnist", tmp_path / "c2", val_size=2)


def test_not_fetched_and_no_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="torchcaps data cifar10"):
        load_dataset("cifar10", tmp_path, download=False)
