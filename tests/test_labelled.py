import numpy as np
import pytest
import torch

from torchcaps.data import DataFormatError, load_dataset
from torchcaps.data.labelled import fit_images, load_labelled_npz


def _write(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 30), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 4, 5], dtype=np.int64)
    return _write(tmp_path / "good.npz", images=images, labels=labels), images, labels


def test_load_good_file(good):
    path, images, labels = good
    x, y = load_labelled_npz(path)
    assert x.dtype == torch.uint8 and x.shape == (6, 32, 30)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    x2, _ = load_labelled_npz(path, expected_hw=(32, 30), num_classes=10)
    assert torch.equal(x, x2)


def test_integer_labels_are_widened_losslessly(tmp_path, good):
    _, images, labels = good
    path = _write(tmp_path / "u8.npz", images=images, labels=labels.astype(np.uint8))
    _, y = load_labelled_npz(path)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


@pytest.mark.parametrize(
    "arrays, pattern",
    [
        (dict(images=np.zeros((2, 4, 4), np.uint8)), "missing arrays"),
        (dict(labels=np.zeros(2, np.int64)), "missing arrays"),
        (dict(images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, np.int64)), "uint8"),
        (dict(images=np.zeros((2, 4, 4), np.int64), labels=np.zeros(2, np.int64)), "uint8"),
        (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.float64)), "integers"),
        (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, bool)), "integers"),
        (dict(images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(2, np.int64)), r"\(N, H, W\)"),
        (dict(images=np.zeros((16,), np.uint8), labels=np.zeros(2, np.int64)), r"\(N, H, W\)"),
        (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros((2, 1), np.int64)), r"\(N,\)"),
        (dict(images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, np.int64)), "3 images but 2"),
        (dict(images=np.zeros((0, 4, 4), np.uint8), labels=np.zeros(0, np.int64)), "no images"),
        (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1])), "range"),
        (dict(images=np.zeros((2, 0, 4), np.uint8), labels=np.zeros(2, np.int64)), "empty side"),
    ],
)
def test_malformed_files(tmp_path, arrays, pattern):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=pattern):
        load_labelled_npz(path)


def test_label_range_shape_and_pickle(tmp_path, good):
    path, images, labels = good
    with pytest.raises(DataFormatError, match=r"\[0, 5\).*\[0, 9\]"):
        load_labelled_npz(path, num_classes=5)
    with pytest.raises(DataFormatError, match="32x30 but 28x28.*--resize or --pad"):
        load_labelled_npz(path, expected_hw=(28, 28))
    obj = np.empty(6, dtype=object)
    obj[:] = [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataFormatError, match="refused"):
        load_labelled_npz(_write(tmp_path / "obj.npz", images=images, labels=obj))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataFormatError):
        load_labelled_npz(tmp_path / "empty.npz")
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        load_labelled_npz(tmp_path / "cut.npz")
    with pytest.raises(FileNotFoundError):
        load_labelled_npz(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------- fit_images


def test_fit_images_same_size_and_error_mode():
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = fit_images(x, (28, 28))
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], x.float() / 255)
    torch.testing.assert_close(fit_images(x.numpy()[:, None], (28, 28)), out)
    with pytest.raises(ValueError, match=r"28x28 but the model expects 40x40.*--resize.*--pad"):
        fit_images(x, (40, 40))
    with pytest.raises(ValueError, match="mode"):
        fit_images(x, (40, 40), mode="crop")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_images(torch.full((1, 28, 28), 2.0), (28, 28))
    with pytest.raises(TypeError, match="uint8 or floating"):
        fit_images(torch.zeros(1, 28, 28, dtype=torch.int64), (28, 28))


def test_fit_images_pad_centres():
    digits = load_dataset("mnist-mini").test.images[:4, 0]  # uint8 (4, 28, 28)
    out = fit_images(digits, (40, 40), mode="pad")
    assert out.shape == (4, 1, 40, 40)
    torch.testing.assert_close(out[:, 0, 6:34, 6:34], digits.float() / 255)
    assert out.sum() == pytest.approx(float(digits.float().sum() / 255), rel=1e-6)
    odd = fit_images(torch.ones(1, 3, 3), (6, 6), mode="pad")[0, 0]
    assert odd[1:4, 1:4].eq(1).all() and odd.sum() == 9  # extra row/column at bottom/right
    with pytest.raises(ValueError, match="larger.*--resize"):
        fit_images(torch.zeros(1, 30, 20, dtype=torch.uint8), (28, 28), mode="pad")


def test_fit_images_resize():
    const = torch.full((2, 56, 56), 0.4)
    out = fit_images(const, (28, 28), mode="resize")
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out, torch.full((2, 1, 28, 28), 0.4))
    # a horizontal ramp stays a ramp with the same mean after shrinking and growing
    ramp = torch.linspace(0, 1, 32).repeat(1, 32, 1)  # (1, 32, 32)
    for size in ((16, 16), (48, 48)):
        r = fit_images(ramp, size, mode="resize")[0, 0]
        assert r.shape == size and r.min() >= 0 and r.max() <= 1
        assert float(r.mean()) == pytest.approx(0.5, abs=1e-3)
        assert bool((r[:, 1:] >= r[:, :-1] - 1e-6).all())  # monotone along x
        assert torch.allclose(r, r[:1].expand_as(r))  # constant along y
    u8 = torch.randint(0, 256, (2, 20, 24), dtype=torch.uint8)
    out = fit_images(u8, (28, 28), mode="resize")
    assert out.shape == (2, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
