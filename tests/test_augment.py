"""Efficient-CapsNet augmentation: determinism, measured ranges, references, trainer wiring."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from torchcaps.cli import main
from torchcaps.data.augment import (
    efficient_capsnet_augment,
    erase,
    lanczos3_resize_matrix,
    roll_shift,
    rotate,
    squish,
)
from torchcaps.train import TrainConfig

OFF = {"rotation": 0.0, "shift": False, "max_squish": 0, "erase_size": 0}


def _digits(n=8, seed=0):
    """Blob images in [0, 1] with empty margins, like MNIST digits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 9:19] = torch.rand(n, 1, 16, 10, generator=g)
    return x


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- determinism
def test_same_seed_same_result_and_state():
    x = _digits()
    g1, g2 = _gen(5), _gen(5)
    a = efficient_capsnet_augment(x, g1)
    b = efficient_capsnet_augment(x, g2)
    assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(a, efficient_capsnet_augment(x, _gen(6)))
    # a second call continues the stream: different from the first
    assert not torch.equal(efficient_capsnet_augment(x, g1), a)


def test_draw_count_independent_of_options():
    """The generator advances the same whatever is switched off (resume stays aligned)."""
    x = _digits(3)
    g1, g2 = _gen(1), _gen(1)
    efficient_capsnet_augment(x, g1)
    efficient_capsnet_augment(x, g2, **OFF)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_identity_when_everything_off():
    x = _digits()
    assert torch.equal(efficient_capsnet_augment(x, _gen(0), **OFF), x)
    x8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(efficient_capsnet_augment(x8, _gen(0), **OFF), x8)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-6)
    assert torch.equal(squish(x, 0, 3), x)
    assert torch.equal(erase(x, 4, 4, 0), x)
    assert torch.equal(roll_shift(x, 0, 0), x)


# ---------------------------------------------------------------- rotation
def _orientation_deg(img):
    """Counter-clockwise (on screen) angle of the principal axis of a 2-D image."""
    h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    m = img.double().clamp(min=0)
    cx, cy = (m * xx).sum() / m.sum(), (m * yy).sum() / m.sum()
    cxx = (m * (xx - cx) ** 2).sum()
    cyy = (m * (yy - cy) ** 2).sum()
    cxy = (m * (xx - cx) * (yy - cy)).sum()
    # y points down on screen, so the on-screen angle is minus the array angle
    return -math.degrees(0.5 * math.atan2(2 * cxy, cxx - cyy)), float(cx), float(cy)


@pytest.mark.parametrize("deg", [-29.0, -12.0, 7.0, 25.0, 60.0])
def test_rotation_angle_measured_back(deg):
    bar = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    bar[0, 0, 14, 6:23] = 1.0  # horizontal bar centred on pixel (14, 14)
    out = rotate(bar, deg)
    angle, cx, cy = _orientation_deg(out[0, 0])
    assert angle == pytest.approx(deg, abs=0.5)
    # OpenCV's centre is (W/2, H/2) = (14, 14): the bar's centre does not move
    assert cx == pytest.approx(14.0, abs=1e-6) and cy == pytest.approx(14.0, abs=1e-6)


def test_rotation_single_pixel_quarter_turn():
    img = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    img[0, 0, 14, 20] = 1.0  # 6 px right of the centre (14, 14)
    out = rotate(img, 90.0)[0, 0]
    # counter-clockwise on screen: right of centre -> above the centre
    assert out[8, 14] == pytest.approx(1.0, abs=1e-9)
    assert out.sum() == pytest.approx(1.0, abs=1e-9)


def _rotate_loop(img, deg):
    """OpenCV warpAffine(getRotationMatrix2D((W/2, H/2), deg, 1)), bilinear, zero border."""
    h, w = img.shape
    t = math.radians(deg)
    a, b = math.cos(t), math.sin(t)
    cx, cy = w / 2, h / 2
    out = torch.zeros(h, w, dtype=torch.float64)

    def px(r, c):
        return float(img[r, c]) if 0 <= r < h and 0 <= c < w else 0.0

    for y in range(h):
        for x in range(w):
            # invert dst = c + R (src - c), R = [[a, b], [-b, a]]
            sx = cx + a * (x - cx) - b * (y - cy)
            sy = cy + b * (x - cx) + a * (y - cy)
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            out[y, x] = ((1 - fx) * (1 - fy) * px(y0, x0) + fx * (1 - fy) * px(y0, x0 + 1)
                         + (1 - fx) * fy * px(y0 + 1, x0) + fx * fy * px(y0 + 1, x0 + 1))
    return out


def test_rotation_matches_loop_reference():
    img = torch.rand(9, 11, generator=_gen(2), dtype=torch.float64)
    for deg in (17.0, -23.0):
        got = rotate(img[None, None], deg)[0, 0]
        assert torch.allclose(got, _rotate_loop(img, deg), atol=1e-12)


def test_random_angles_whole_degrees_in_range():
    x = torch.zeros(3000, 1, 28, 28)
    _, p = efficient_capsnet_augment(x, _gen(0), return_params=True)
    d = p["degrees"]
    assert torch.equal(d, d.round())
    assert d.abs().max() <= 29  # int(30 * clip(r, +-0.9999)) truncates toward zero
    frac = (d != 0).float().mean().item()
    # half the images, less the ~8% whose |30 r| < 1 truncates to 0
    assert 0.40 < frac < 0.52
    rotated = d[d != 0]
    assert 8.0 < rotated.std().item() < 11.5  # 30 * 0.33 = 9.9 before truncation
    _, p = efficient_capsnet_augment(x[:500], _gen(0), rotation_prob=1.0, return_params=True)
    assert (p["degrees"] != 0).float().mean() > 0.85


# ---------------------------------------------------------------- shift
def _bbox(img):
    rows = torch.nonzero(img.sum(dim=1) > 0).flatten()
    cols = torch.nonzero(img.sum(dim=0) > 0).flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def test_shift_measured_back_and_within_margins():
    x = torch.zeros(400, 1, 28, 28)
    x[:, :, 10:13, 5:9] = 1.0  # margins: top 10, bottom 15, left 5, right 19
    out, p = efficient_capsnet_augment(x, _gen(3), rotation=0.0, max_squish=0, erase_size=0,
                                       return_params=True)
    sy, sx = p["shift_y"], p["shift_x"]
    for i in range(len(x)):
        assert _bbox(out[i, 0]) == (10 + sy[i], 12 + sy[i], 5 + sx[i], 8 + sx[i])
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # no ink wrapped
    assert sx.min() >= -5 and sx.max() <= 19 and sy.min() >= -10 and sy.max() <= 15
    assert (sx < 0).any() and (sx > 0).any() and (sy < 0).any() and (sy > 0).any()
    # |N(0, 0.33)| amounts: shifts towards the far side stay mostly below the margin
    assert (sx.float().abs() / 19).mean() < 0.35


def test_roll_shift_is_a_per_image_roll():
    x = _digits(2)
    out = roll_shift(x, torch.tensor([1, -3]), torch.tensor([-2, 4]))
    assert torch.equal(out[0], torch.roll(x[0], (1, -2), (1, 2)))
    assert torch.equal(out[1], torch.roll(x[1], (-3, 4), (1, 2)))


def test_empty_image_is_not_shifted():
    x = torch.zeros(4, 1, 28, 28)
    _, p = efficient_capsnet_augment(x, _gen(0), return_params=True)
    assert (p["shift_x"] == 0).all() and (p["shift_y"] == 0).all()


# ---------------------------------------------------------------- squish
def _lanczos3_loop(in_size, out_size):
    """TensorFlow ScaleAndTranslate ComputeSpansCore with the Lanczos-3 kernel, antialias."""
    scale = out_size / in_size
    q = max(1 / scale, 1.0)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for x in range(out_size):
        s = (x + 0.5) / scale
        start = min(max(math.ceil(s - 3 * q - 0.5), 0), in_size - 1)
        stop = min(max(math.floor(s + 3 * q - 0.5), 0), in_size - 1) + 1
        for k in range(start, stop):
            t = abs((k + 0.5 - s) / q)
            if t <= 1e-3:
                v = 1.0
            elif t > 3:
                v = 0.0
            else:
                v = 3 * math.sin(math.pi * t) * math.sin(math.pi * t / 3) / (math.pi * t) ** 2
            m[x, k] = v
        m[x] /= m[x].sum()
    return m


@pytest.mark.parametrize("out_size", [21, 24, 27, 28])
def test_lanczos_matrix_matches_loop_reference(out_size):
    assert torch.allclose(lanczos3_resize_matrix(28, out_size), _lanczos3_loop(28, out_size),
                          atol=1e-12)


def test_lanczos_identity_at_scale_one():
    assert torch.allclose(lanczos3_resize_matrix(28, 28), torch.eye(28, dtype=torch.float64),
                          atol=1e-12)


def test_squish_width_and_offset_measured_back():
    ones = torch.ones(7, 1, 28, 28, dtype=torch.float64)
    red = torch.arange(1, 8)
    off = red // 2 + torch.tensor([0, 1, 0, 1, 0, 1, 0])
    out = squish(ones, red, off)
    for i in range(7):
        w = 28 - int(red[i])
        cols = out[i, 0, 0]
        o = int(off[i])
        assert torch.allclose(cols[o:o + w], torch.ones(w, dtype=torch.float64), atol=1e-12)
        assert (cols[:o] == 0).all() and (cols[o + w:] == 0).all()
        assert torch.equal(out[i, 0], cols.expand(28, 28))  # rows untouched


def test_squish_random_ranges():
    x = _digits(2000)
    _, p = efficient_capsnet_augment(x, _gen(4), rotation=0.0, shift=False, erase_size=0,
                                     return_params=True)
    red, off = p["squish"], p["squish_offset"]
    assert red.min() == 1 and red.max() <= 7  # floor(a * 28 / 4 + 1)
    assert (red <= 2).float().mean() > 0.5  # |N(0, 0.33)| * 7: mostly small squeezes
    extra = off - red // 2
    assert set(extra.tolist()) == {0, 1}  # floor(2 a), a >= 0.5 with p ~ 0.13
    assert 0.05 < extra.float().mean() < 0.22


# ---------------------------------------------------------------- erase
def test_erased_patch_size_and_position():
    x = torch.ones(600, 1, 28, 28)
    out, p = efficient_capsnet_augment(x, _gen(7), rotation=0.0, shift=False, max_squish=0,
                                       return_params=True)
    zeros = out[:, 0] == 0
    assert (zeros.sum(dim=(1, 2)) == 16).all()
    for i in range(0, 600, 37):
        t, left = int(p["erase_top"][i]), int(p["erase_left"][i])
        assert zeros[i, t:t + 4, left:left + 4].all()
    for key in ("erase_top", "erase_left"):
        assert p[key].min() == 4 and p[key].max() == 22  # floor(19 u) + 4


# ---------------------------------------------------------------- shapes, dtypes, errors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_shape_and_dtype_kept(dtype):
    x = _digits(4)
    x = (x * 255).round().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    out = efficient_capsnet_augment(x, _gen(0))
    assert out.shape == x.shape and out.dtype == dtype
    rgb = efficient_capsnet_augment(x.expand(4, 3, 28, 28).contiguous(), _gen(0))
    assert rgb.shape == (4, 3, 28, 28)
    assert torch.equal(rgb[:, 0], rgb[:, 2])  # one set of parameters per image


def test_uint8_matches_float_up_to_rounding():
    x8 = (_digits(6) * 255).round().to(torch.uint8)
    a = efficient_capsnet_augment(x8, _gen(0)).float()
    b = efficient_capsnet_augment(x8.float(), _gen(0)).round().clamp(0, 255)
    assert torch.equal(a, b)


def test_bad_arguments():
    x = _digits(2)
    with pytest.raises(ValueError, match="4 dimensions"):
        efficient_capsnet_augment(x[0])
    with pytest.raises(TypeError, match="uint8 or floating"):
        efficient_capsnet_augment(x.to(torch.int32))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        efficient_capsnet_augment(nan)
    for kwargs, name in [({"rotation": -1.0}, "rotation"), ({"rotation_prob": 1.5}, "rotation_prob"),
                         ({"std": -0.1}, "std"), ({"max_squish": 27}, "max_squish"),
                         ({"erase_size": -1}, "erase_size"),
                         ({"erase_positions": (4, 30)}, "erase_positions")]:
        with pytest.raises(ValueError, match=name):
            efficient_capsnet_augment(x, **kwargs)
    with pytest.raises(ValueError, match="width_reduction"):
        squish(x, 28, 0)
    with pytest.raises(ValueError, match="degrees"):
        rotate(x, torch.zeros(3))
    with pytest.raises(ValueError, match="size"):
        erase(x, 4, 4, -2)
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="bogus")
    with pytest.raises(ValueError, match="lr_min"):
        TrainConfig(lr_min=1.0)


# ---------------------------------------------------------------- trainer wiring
def test_trainer_defaults_unchanged_and_staircase_lr():
    from torchcaps.train import Trainer

    assert TrainConfig().augment == "shift" and not TrainConfig().lr_staircase
    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig(lr=5e-4, lr_decay=0.97, lr_decay_steps=10, lr_staircase=True,
                        lr_min=5e-5)
    lrs = {}
    for step in (0, 9, 10, 25, 10_000):
        t.step = step
        lrs[step] = t._lr()
    assert lrs[0] == lrs[9] == 5e-4
    assert lrs[10] == pytest.approx(5e-4 * 0.97) and lrs[25] == pytest.approx(5e-4 * 0.97 ** 2)
    assert lrs[10_000] == 5e-5
    t.cfg = TrainConfig()
    t.step = 3000
    assert t._lr() == 1e-3 * 0.96 ** (3000 / 2000)  # continuous default, bitwise


SMALL = ["--batch-size", "8", "--no-progress", "--augment", "efficient", "--model",
         "efficient_capsnet", "--threads", "1", "--no-recipe"]  # the flags alone, no recipe


@pytest.mark.slow  # about 25 s: two efficient-augmentation runs compared
def test_cli_augment_efficient_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), *SMALL, "--max-steps", "2"]) == 0
    assert main(["train", "--out", str(part), *SMALL, "--max-steps", "1"]) == 0
    meta = json.loads((part / "last.json").read_text())
    assert meta["config"]["augment"] == "efficient" and meta["step"] == 1
    assert main(["train", "--out", str(part), "--resume", "--max-steps", "2",
                 "--no-progress"]) == 0
    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys() and "rng.augment" in a
    for k in a:
        if k.startswith(("model.", "optim.")) or k == "rng.augment":
            assert torch.equal(a[k], b[k]), k
    assert json.loads((part / "last.json").read_text())["step"] == 2


def test_lr_milestones_step_decay_and_validation():
    from torchcaps.train import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig(lr=3e-3, lr_milestones=(100, 300), lr_gamma=0.1)
    lrs = {}
    for step in (0, 99, 100, 299, 300, 5000):
        t.step = step
        lrs[step] = t._lr()
    base = {s: 3e-3 * 0.96 ** (s / 2000) for s in lrs}
    assert lrs[0] == base[0] and lrs[99] == base[99]  # no milestone reached yet: unchanged
    assert lrs[100] == pytest.approx(0.1 * base[100]) and lrs[299] == pytest.approx(0.1 * base[299])
    assert lrs[300] == pytest.approx(0.01 * base[300]) and lrs[5000] == pytest.approx(0.01 * base[5000])
    assert TrainConfig(lr_milestones=[5, 9]).lr_milestones == (5, 9)  # a JSON list reads back
    for bad in [(0,), (5, 5), (9, 5), (2.5,), (True,), "100"]:
        with pytest.raises(ValueError, match="lr_milestones"):
            TrainConfig(lr_milestones=bad)
    for gamma in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="lr_gamma"):
            TrainConfig(lr_gamma=gamma)


def test_cli_lr_milestones_recorded_and_kept_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "--max-steps", "1", "--lr-milestones", "1",
                 "--lr-gamma", "0.5"]) == 0
    meta = json.loads((out / "last.json").read_text())
    assert meta["config"]["lr_milestones"] == [1] and meta["config"]["lr_gamma"] == 0.5
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-3  # step 1 ran before the milestone
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    meta = json.loads((out / "last.json").read_text())
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5 * 1e-3 * 0.96 ** (1 / 2000))
