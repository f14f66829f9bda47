import math
import sys

import numpy as np
import pytest
import torch

from torchcaps.data import DataFormatError, load_dataset
from torchcaps.data.affnist import (
    AffineParams,
    affine_transform,
    make_affnist_test,
    make_translated_mnist,
    place_on_canvas,
    random_affine_params,
    read_affnist_mat,
)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("mnist-mini")
    return d.train.images[:600, 0], d.train.labels[:600]  # uint8 (600, 28, 28), int64


# ----------------------------------------------------------------------------- translation


def test_place_on_canvas_keeps_every_pixel(digits):
    x, _ = digits
    out, off = place_on_canvas(x, canvas=40, seed=3)
    assert out.shape == (600, 40, 40) and out.dtype == torch.uint8
    assert off.shape == (600, 2) and off.min() >= 0 and off.max() <= 12
    # every value of each offset appears over 600 draws (uniform over 0..12)
    assert set(off[:, 0].tolist()) == set(range(13)) == set(off[:, 1].tolist())
    np.testing.assert_array_equal(out.sum((1, 2), dtype=torch.int64).numpy(),
                                  x.sum((1, 2), dtype=torch.int64).numpy())
    for i in range(0, 600, 37):
        r, c = off[i].tolist()
        assert torch.equal(out[i, r:r + 28, c:c + 28], x[i])


def test_place_on_canvas_determinism_and_channel(digits):
    x, y = digits
    a, oa = place_on_canvas(x[:50], seed=1)
    b, ob = place_on_canvas(x[:50], seed=1)
    c, oc = place_on_canvas(x[:50], seed=2)
    assert torch.equal(a, b) and torch.equal(oa, ob)
    assert not torch.equal(oa, oc)
    d, _ = place_on_canvas(x[:50, None], seed=1)
    assert d.shape == (50, 1, 40, 40) and torch.equal(d[:, 0], a)
    imgs, labels = make_translated_mnist(x[:50].numpy(), y[:50].numpy(), seed=1)
    assert torch.equal(imgs, a) and labels.dtype == torch.int64


def test_place_on_canvas_rejects_bad_input(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="canvas"):
        place_on_canvas(x[:2], canvas=20, seed=0)
    with pytest.raises(TypeError, match="uint8"):
        place_on_canvas(x[:2].float(), seed=0)
    with pytest.raises(ValueError, match="shape"):
        place_on_canvas(x[0], seed=0)


# ----------------------------------------------------------------------------- parameters


def test_random_affine_params_ranges_measured_back():
    p = random_affine_params(4000, seed=0)
    assert p.angle.abs().max() <= 20 and p.angle.min() < -19.5 and p.angle.max() > 19.5
    assert p.shear.abs().max() <= 0.2 and p.shear.min() < -0.19 and p.shear.max() > 0.19
    assert p.scale.min() >= 0.8 and p.scale.max() <= 1.2
    assert p.scale.min() < 0.81 and p.scale.max() > 1.19
    assert ((p.position >= 0) & (p.position <= 1)).all()
    # x and y scales are drawn independently, not one isotropic factor
    assert (p.scale[:, 0] - p.scale[:, 1]).abs().max() > 0.3
    # roughly uniform: mean angle near 0, std near 20 / sqrt(3)
    assert abs(float(p.angle.mean())) < 1.0
    assert abs(float(p.angle.std()) - 20 / math.sqrt(3)) < 0.5
    # the linear part is R H S and its determinant is s_x s_y
    a = p.linear()
    np.testing.assert_allclose(torch.linalg.det(a).numpy(), p.scale.prod(1).numpy(), rtol=1e-12)


def test_random_affine_params_determinism_and_errors():
    a, b, c = (random_affine_params(10, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("angle", "shear", "scale", "position"))
    assert not torch.equal(a.angle, c.angle)
    with pytest.raises(ValueError, match="n must"):
        random_affine_params(0, seed=0)
    with pytest.raises(ValueError, match="scale"):
        random_affine_params(3, seed=0, scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="scale"):
        random_affine_params(3, seed=0, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="rotation"):
        random_affine_params(3, seed=0, rotation=float("nan"))


# ----------------------------------------------------------------------------- warp


def _params(n, angle=0.0, shear=0.0, sx=1.0, sy=1.0, pos=0.5):
    f = torch.float64
    return AffineParams(torch.full((n,), angle, dtype=f), torch.full((n,), shear, dtype=f),
                        torch.tensor([[sx, sy]], dtype=f).repeat(n, 1),
                        torch.full((n, 2), pos, dtype=f))


def _reference_warp(img: np.ndarray, matrix: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Slow float64 loop: bilinear, zero outside, evaluated on output pixels lo..hi-1."""
    h, w = img.shape
    a, b = matrix[:, :2], matrix[:, 2]
    a_inv = np.linalg.inv(a)
    out = np.zeros((hi - lo, hi - lo))
    for r in range(lo, hi):
        for c in range(lo, hi):
            px, py = a_inv @ (np.array([c, r], dtype=np.float64) - b)
            x0, y0 = math.floor(px), math.floor(py)
            val = 0.0
            for yy in (y0, y0 + 1):
                for xx in (x0, x0 + 1):
                    if 0 <= yy < h and 0 <= xx < w:
                        val += (1 - abs(px - xx)) * (1 - abs(py - yy)) * float(img[yy, xx])
            out[r - lo, c - lo] = val
    return out


def test_affine_transform_matches_loop_reference_and_stays_inside(digits):
    x, _ = digits
    p = random_affine_params(4, seed=11)
    p.angle[0], p.shear[0], p.scale[0] = 20.0, 0.2, torch.tensor([1.2, 1.2])  # extreme corner
    p.position[1] = torch.tensor([0.0, 1.0])  # pushed to the left and bottom edges
    res = affine_transform(x[:4], p)
    assert res.images.shape == (4, 40, 40) and res.images.dtype == torch.uint8
    assert bool(res.fits.all())
    # the returned matrices have the linear part of the parameters
    np.testing.assert_allclose(res.matrices[:, :, :2].numpy(), p.linear().numpy(), atol=1e-12)
    for i in range(4):
        # evaluate the exact warp on a larger window: nothing may fall outside the canvas
        ref = _reference_warp(x[i].numpy(), res.matrices[i].numpy(), -6, 46)
        inside = ref[6:46, 6:46]
        assert np.abs(np.round(inside) - res.images[i].numpy()).max() <= 1
        outside = ref.copy()
        outside[6:46, 6:46] = 0
        assert outside.max() < 1e-9, f"image {i}: ink outside the canvas"


def test_affine_transform_identity_is_a_translation(digits):
    x, _ = digits
    res = affine_transform(x[:20], _params(20, pos=0.0))
    for i in range(20):
        tx, ty = res.matrices[i, :, 2].tolist()
        assert float(tx).is_integer() and float(ty).is_integer()  # integer shift, exact copy
        placed = torch.zeros(40, 40, dtype=torch.uint8)
        src = x[i]
        # with position 0 the support box starts at -1, so the first ink column/row is 0
        ink_r, ink_c = src.nonzero()[:, 0], src.nonzero()[:, 1]
        r0, c0 = int(ty), int(tx)
        placed[ink_r + r0, ink_c + c0] = src[ink_r, ink_c]
        assert torch.equal(res.images[i], placed)
        assert res.images[i].any(0)[0] and res.images[i].any(1)[0]  # touches left and top


def _moments(img: torch.Tensor):
    w = img.double()
    r, c = torch.meshgrid(torch.arange(40.0, dtype=torch.float64),
                          torch.arange(40.0, dtype=torch.float64), indexing="ij")
    m = w.sum()
    mr, mc = (w * r).sum() / m, (w * c).sum() / m
    crr = (w * (r - mr) ** 2).sum() / m
    ccc = (w * (c - mc) ** 2).sum() / m
    crc = (w * (r - mr) * (c - mc)).sum() / m
    return crr, ccc, crc


@pytest.mark.parametrize("angle", [-20.0, -7.5, 12.0, 20.0])
def test_rotation_measured_back_counter_clockwise(angle):
    bar = torch.zeros(1, 28, 28, dtype=torch.uint8)
    bar[0, 13:15, 3:25] = 255  # horizontal bar
    out = affine_transform(bar, _params(1, angle=angle)).images[0]
    crr, ccc, crc = _moments(out)
    # principal axis angle, measured counter-clockwise on screen (rows grow downward)
    measured = 0.5 * math.degrees(math.atan2(-2 * float(crc), float(ccc - crr)))
    assert abs(measured - angle) < 1.0


def test_scale_and_shear_measured_back():
    blob = torch.zeros(1, 28, 28, dtype=torch.uint8)
    blob[0, 6:22, 6:22] = 200
    base = _moments(affine_transform(blob, _params(1)).images[0])
    crr, ccc, _ = _moments(affine_transform(blob, _params(1, sx=1.2, sy=0.8)).images[0])
    assert abs(math.sqrt(ccc / base[1]) - 1.2) < 0.03
    assert abs(math.sqrt(crr / base[0]) - 0.8) < 0.03
    # shear y += k x: covariance(row, col) = k var(col); a wide bar tells it from
    # x += k y (which would give k var(row), 6x smaller here)
    wide = torch.zeros(1, 28, 28, dtype=torch.uint8)
    wide[0, 10:18, 2:26] = 200
    var_col = _moments(affine_transform(wide, _params(1)).images[0])[1]
    _, _, crc = _moments(affine_transform(wide, _params(1, shear=0.2)).images[0])
    assert abs(float(crc / var_col) - 0.2) < 0.02


def test_affnist_test_set_on_real_digits(digits):
    x, y = digits
    imgs, labels = make_affnist_test(x[:300], y[:300], seed=0, copies=2)
    assert imgs.shape == (600, 40, 40) and imgs.dtype == torch.uint8
    assert torch.equal(labels, y[:300].repeat_interleave(2))
    again, _ = make_affnist_test(x[:300], y[:300], seed=0, copies=2)
    other, _ = make_affnist_test(x[:300], y[:300], seed=1, copies=2)
    assert torch.equal(imgs, again) and not torch.equal(imgs, other)
    assert not torch.equal(imgs[0], imgs[1])  # the two copies of a digit differ
    # translations spread over the canvas: ink reaches every border for some images
    ink = imgs > 0
    rows, cols = ink.any(2), ink.any(1)
    assert rows[:, 0].any() and rows[:, -1].any() and cols[:, 0].any() and cols[:, -1].any()
    # mass is roughly the original mass times det(A) (nothing cropped, no blow-up)
    p = random_affine_params(600, seed=0)
    ratio = imgs.double().sum((1, 2)) / x[:300].repeat_interleave(2, 0).double().sum((1, 2))
    det = p.scale.prod(1)
    assert ((ratio / det) - 1).abs().median() < 0.05


def test_all_real_digits_fit_at_the_extreme(digits):
    x, _ = digits
    res = affine_transform(x, _params(600, angle=20.0, shear=0.2, sx=1.2, sy=1.2, pos=1.0))
    assert bool(res.fits.all())
    assert res.images[:, -1, :].any() or res.images[:, :, -1].any()


def test_affine_transform_rejects_bad_input(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="parameters"):
        affine_transform(x[:3], random_affine_params(2, seed=0))
    with pytest.raises(TypeError, match="uint8"):
        affine_transform(x[:2].float(), random_affine_params(2, seed=0))
    with pytest.raises(ValueError, match="labels"):
        make_affnist_test(x[:3], torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integers"):
        make_affnist_test(x[:3], torch.zeros(3))


# ----------------------------------------------------------------------------- .mat reader


def _write_mat(path, images, labels, **extra):
    scipy_io = pytest.importorskip("scipy.io")
    struct = {"image": images.reshape(len(images), 1600).T.copy(), "label_int": labels}
    struct.update(extra)
    scipy_io.savemat(str(path), {"affNISTdata": struct})


def test_read_affnist_mat_orientation(tmp_path, digits):
    pytest.importorskip("scipy")
    x, y = digits
    imgs, _ = place_on_canvas(x[:7], seed=0)
    imgs = imgs.numpy()
    labels = y[:7].numpy().astype(np.uint8)[None, :]  # MATLAB row vector (1, N)
    onehot = np.eye(10, dtype=np.uint8)[labels[0]].T
    _write_mat(tmp_path / "a.mat", imgs, labels, label_one_of_n=onehot)
    got, got_labels = read_affnist_mat(tmp_path / "a.mat")
    assert got.dtype == np.uint8 and got.shape == (7, 40, 40)
    np.testing.assert_array_equal(got, imgs)  # not transposed
    assert not np.array_equal(got, imgs.transpose(0, 2, 1))
    np.testing.assert_array_equal(got_labels, y[:7].numpy())
    assert got_labels.dtype == np.int64
    got_f, _ = read_affnist_mat(tmp_path / "a.mat", order="F")
    np.testing.assert_array_equal(got_f, imgs.transpose(0, 2, 1))
    # labels stored as a column or as MATLAB doubles are read too
    _write_mat(tmp_path / "b.mat", imgs, y[:7].numpy().astype(np.float64)[:, None])
    np.testing.assert_array_equal(read_affnist_mat(tmp_path / "b.mat")[1], y[:7].numpy())


def test_read_affnist_mat_rejects_malformed(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    imgs = np.zeros((3, 40, 40), dtype=np.uint8)
    labels = np.array([[1, 2, 3]], dtype=np.uint8)
    cases = {
        "nostruct": ({"other": np.zeros(3)}, "affNISTdata"),
        "noimage": ({"affNISTdata": {"label_int": labels}}, "image"),
        "nolabels": ({"affNISTdata": {"image": np.zeros((1600, 3), np.uint8)}}, "label_int"),
        "rows": ({"affNISTdata": {"image": np.zeros((1599, 3), np.uint8),
                                  "label_int": labels}}, "1600"),
        "float": ({"affNISTdata": {"image": np.zeros((1600, 3)), "label_int": labels}}, "uint8"),
        "count": ({"affNISTdata": {"image": np.zeros((1600, 4), np.uint8),
                                   "label_int": labels}}, "4 labels"),
        "range": ({"affNISTdata": {"image": imgs.reshape(3, -1).T.copy(),
                                   "label_int": np.array([[1, 10, 3]], np.uint8)}}, "0-9"),
        "fraction": ({"affNISTdata": {"image": imgs.reshape(3, -1).T.copy(),
                                      "label_int": np.array([[1, 2.5, 3]])}}, "non-integer"),
    }
    for name, (content, pattern) in cases.items():
        scipy_io.savemat(str(tmp_path / f"{name}.mat"), content)
        with pytest.raises(DataFormatError, match=pattern):
            read_affnist_mat(tmp_path / f"{name}.mat")
    (tmp_path / "junk.mat").write_bytes(b"this is not a MATLAB file" * 20)
    with pytest.raises(DataFormatError, match="MATLAB"):
        read_affnist_mat(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError):
        read_affnist_mat(tmp_path / "missing.mat")


def test_read_affnist_mat_without_scipy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        read_affnist_mat(tmp_path / "x.mat")
