import numpy as np
import pytest
import torch

from torchcaps.data import load_dataset
from torchcaps.data.multimnist import make_multimnist, multi_hot


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("mnist-mini")
    return d.train.images[:1000, 0], d.train.labels[:1000]  # uint8 (1000, 28, 28), int64


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits
    return make_multimnist(x, y, n=2000, seed=0)


def test_shapes_and_dtypes(batch):
    assert batch.images.shape == (2000, 36, 36) and batch.images.dtype == torch.uint8
    assert batch.labels.shape == (2000, 2) and batch.labels.dtype == torch.int64
    assert batch.singles.shape == (2000, 2, 36, 36) and batch.singles.dtype == torch.uint8
    images, labels, singles = batch[:3]
    assert images is batch.images and singles is batch.singles


def test_two_different_classes_always(batch, digits):
    _, y = digits
    assert bool((batch.labels[:, 0] != batch.labels[:, 1]).all())
    assert torch.equal(batch.labels, y[batch.indices])
    # every class appears in both positions
    assert set(batch.labels[:, 0].tolist()) == set(range(10)) == set(batch.labels[:, 1].tolist())


def test_overlay_is_clipped_sum_of_singles(batch):
    s = batch.singles.to(torch.int32)
    expected = (s[:, 0] + s[:, 1]).clamp(max=255).to(torch.uint8)
    assert torch.equal(batch.images, expected)
    # the clip matters: some overlapping pixels would exceed 255
    assert bool((s[:, 0] + s[:, 1] > 255).any())


def test_singles_are_shifted_centred_digits(batch, digits):
    x, _ = digits
    sh = batch.shifts
    assert sh.min() >= -4 and sh.max() <= 4
    assert set(sh.flatten().tolist()) == set(range(-4, 5))
    # every pixel of each digit is kept
    src = x[batch.indices]  # (n, 2, 28, 28)
    assert torch.equal(batch.singles.sum((2, 3), dtype=torch.int64),
                       src.sum((2, 3), dtype=torch.int64))
    # shift measured back by the centre of mass against the digit centred on the canvas
    centred = torch.nn.functional.pad(src, (4, 4, 4, 4)).double()  # (n, 2, 36, 36)
    coords = torch.arange(36, dtype=torch.float64)

    def com(img):
        m = img.sum((-1, -2))
        return torch.stack([(img.sum(-1) * coords).sum(-1) / m,
                            (img.sum(-2) * coords).sum(-1) / m], -1)  # (n, 2, 2) (row, col)

    measured = com(batch.singles.double()) - com(centred)
    np.testing.assert_allclose(measured.numpy(), sh.double().numpy(), atol=1e-9)
    # and exactly: each single equals the centred digit rolled by its shift
    for i in range(0, 2000, 97):
        for k in range(2):
            rolled = torch.roll(centred[i, k], shifts=tuple(sh[i, k].tolist()), dims=(0, 1))
            assert torch.equal(batch.singles[i, k].double(), rolled)


def test_determinism(digits):
    x, y = digits
    a = make_multimnist(x, y, n=50, seed=7)
    b = make_multimnist(x.numpy(), y.numpy(), n=50, seed=7)
    c = make_multimnist(x, y, n=50, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.images, c.images)


def test_other_canvas_and_errors(digits):
    x, y = digits
    small = make_multimnist(x[:100], y[:100], n=10, seed=0, canvas=28, max_shift=0)
    assert torch.equal(small.singles[:, 0], x[small.indices[:, 0]])
    with pytest.raises(ValueError, match="canvas"):
        make_multimnist(x, y, n=5, seed=0, canvas=34, max_shift=4)
    with pytest.raises(ValueError, match="two different classes"):
        make_multimnist(x[:5], torch.zeros(5, dtype=torch.int64), n=5, seed=0)
    with pytest.raises(ValueError, match="n must"):
        make_multimnist(x, y, n=0, seed=0)
    with pytest.raises(TypeError, match="uint8"):
        make_multimnist(x.float(), y, n=5, seed=0)
    with pytest.raises(ValueError, match="labels"):
        make_multimnist(x, y[:-1], n=5, seed=0)


def test_multi_hot():
    labels = torch.tensor([[3, 7], [0, 9], [2, 2]])
    t = multi_hot(labels, 10)
    assert t.shape == (3, 10) and t.dtype == torch.float32
    assert t.sum(1).tolist() == [2.0, 2.0, 1.0]
    assert t[0, 3] == 1 and t[0, 7] == 1 and t[1, 0] == 1 and t[1, 9] == 1 and t[2, 2] == 1
    assert torch.equal(multi_hot(np.array([1, 4]), 5), torch.eye(5)[[1, 4]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        multi_hot(torch.tensor([[1, 10]]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        multi_hot(torch.tensor([[-1, 2]]), 10)
    with pytest.raises(TypeError, match="integer"):
        multi_hot(torch.tensor([[1.0, 2.0]]), 10)
