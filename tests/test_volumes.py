"""NIfTI input/output: round trips, reorientation, every defect of an image or label map
(each a DataFormatError naming the file), atomic writes and intensity normalisation.
Every file is generated here with nibabel; nothing is downloaded."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from torchcaps.data.errors import DataFormatError  # noqa: E402
from torchcaps.data.volumes import (  # noqa: E402
    Volume,
    load_labelled_pair,
    normalize_intensity,
    read_label_map,
    read_volume,
    reorient,
    write_volume,
)

# an oblique-free affine whose voxel axes point I, A, R (not RAS): reorientation has work to do
AFFINE = np.array([[0.0, 0.0, 2.0, -3.0],
                   [0.0, 1.5, 0.0, 2.0],
                   [-1.0, 0.0, 0.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _raw(path, array, affine=AFFINE, dtype=None):
    """Write with nibabel directly (bypassing write_volume's checks)."""
    img = nib.Nifti1Image(array, affine, dtype=dtype)
    nib.save(img, str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("channels", [None, 3])
def test_round_trip_keeps_values_and_affine(tmp_path, rng, suffix, channels):
    shape = (6, 7, 8) if channels is None else (channels, 6, 7, 8)
    array = rng.normal(size=shape).astype(np.float32)
    path = write_volume(tmp_path / f"x{suffix}", array, AFFINE)
    vol = read_volume(path)
    assert vol.array.dtype == np.float32 and vol.array.shape == shape
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-6)
    assert vol.spacing == pytest.approx((1.0, 1.5, 2.0))
    assert vol.shape == (6, 7, 8) and vol.path == path
    assert (suffix == ".nii.gz") == (path.read_bytes()[:2] == b"\x1f\x8b")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_nifti2_files_are_read(tmp_path, rng):
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    for name in ("two.nii", "two.nii.gz"):
        nib.save(nib.Nifti2Image(array, AFFINE), str(tmp_path / name))
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, array)


def test_integer_and_bool_arrays_are_written_in_a_small_integer_type(tmp_path):
    labels = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4) % 3
    path = write_volume(tmp_path / "l.nii.gz", labels, np.eye(4))
    assert nib.load(path).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_label_map(path, 3), labels)
    mask = write_volume(tmp_path / "m.nii", labels > 0, np.eye(4))
    np.testing.assert_array_equal(read_label_map(mask, 2), labels > 0)
    signed = write_volume(tmp_path / "s.nii", labels - 1, np.eye(4))
    assert nib.load(signed).get_data_dtype() == np.int16


def test_write_refuses_what_it_could_not_read_back(tmp_path, rng):
    x = rng.normal(size=(4, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_volume(tmp_path / "x.npy", x, np.eye(4))
    x[1, 2, 3] = np.nan
    with pytest.raises(DataFormatError, match="1 NaN"):
        write_volume(tmp_path / "x.nii", x, np.eye(4))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        write_volume(tmp_path / "y.nii", np.zeros((4, 4, 4)), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        write_volume(tmp_path / "z.nii", np.zeros((4, 4)), np.eye(4))
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(tmp_path, rng, monkeypatch):
    path = write_volume(tmp_path / "x.nii.gz", np.ones((3, 3, 3), np.float32), np.eye(4))
    before = path.read_bytes()

    def broken(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        write_volume(path, rng.normal(size=(3, 3, 3)), np.eye(4))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_reorientation_keeps_every_voxel_in_its_world_place(tmp_path, rng):
    array = rng.normal(size=(2, 6, 7, 8)).astype(np.float32)
    path = write_volume(tmp_path / "x.nii.gz", array, AFFINE)
    plain, sar = read_volume(path), read_volume(path, orientation="SAR")
    assert sar.array.shape == (2, 6, 7, 8)  # axes I, A, R -> S, A, R: one flip, no permutation
    np.testing.assert_allclose(np.sign(np.diag(sar.affine[[2, 1, 0], :3])), 1)
    # every voxel's world position and value are unchanged
    for index in [(0, 0, 0), (1, 2, 3), (5, 6, 7)]:
        world = plain.affine @ np.array([*index, 1.0])
        d, h, w = np.rint(np.linalg.solve(sar.affine, world)[:3]).astype(int)
        np.testing.assert_array_equal(sar.array[:, d, h, w], plain.array[(slice(None), *index)])
    ras = reorient(sar, "RAS")
    assert ras.array.shape == (2, 8, 7, 6) and ras.spacing == pytest.approx((2.0, 1.5, 1.0))
    with pytest.raises(ValueError, match="three letters"):
        read_volume(path, orientation="SAA")


def test_not_nifti_and_corrupt_files_are_named(tmp_path, rng):
    # int16 voxels: damage cannot hide behind a NaN check, only gzip's CRC catches it
    good = write_volume(tmp_path / "good.nii.gz", rng.integers(-900, 900, size=(30, 30, 30)), np.eye(4))
    blob = good.read_bytes()
    cases = {
        "random.nii": os.urandom(2000),
        "random.nii.gz": os.urandom(2000),
        "plain-named-gz.nii.gz": gzip.decompress(blob),
        "gz-named-plain.nii": blob,
        "truncated.nii.gz": blob[: len(blob) // 2],
        "header-only.nii.gz": blob[:200],
        "truncated.nii": gzip.decompress(blob)[:5000],
        "tiny.nii": b"\x00" * 10,
    }
    for seed in range(4):
        damaged = bytearray(blob)
        damaged[len(blob) // 2: len(blob) // 2 + 64] = np.random.default_rng(seed).bytes(64)
        cases[f"damaged{seed}.nii.gz"] = bytes(damaged)
    expected = {
        "random.nii": "not a NIfTI file",
        "random.nii.gz": "not gzip-compressed",
        "plain-named-gz.nii.gz": "not gzip-compressed",
        "gz-named-plain.nii": "named .nii",
        "truncated.nii.gz": "truncated",
        "header-only.nii.gz": "truncated",
        "truncated.nii": "truncated",
        "tiny.nii": "shorter than a NIfTI header",
        **{f"damaged{seed}.nii.gz": "corrupt" for seed in range(4)},
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=expected[name]) as err:
            read_volume(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataFormatError, match="image.png: not a NIfTI file name"):
        read_volume(tmp_path / "image.png")
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        read_volume(tmp_path / "missing.nii")


def test_nan_inf_2d_and_oversized_images_are_refused(tmp_path, rng):
    x = rng.normal(size=(5, 6, 7)).astype(np.float32)
    x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(DataFormatError, match=r"nan.nii: 1 NaN and 2 Inf voxels"):
        read_volume(_raw(tmp_path / "nan.nii", x))
    for name, shape in (("flat.nii", (5, 6)), ("slice.nii", (5, 6, 1))):
        with pytest.raises(DataFormatError, match=f"{name}: a 2D image"):
            read_volume(_raw(tmp_path / name, np.zeros(shape, np.float32)))
    with pytest.raises(DataFormatError, match="5 dimensions"):
        read_volume(_raw(tmp_path / "5d.nii", np.zeros((3, 3, 3, 1, 2), np.float32)))
    with pytest.raises(DataFormatError, match="above the limit"):
        read_volume(_raw(tmp_path / "big.nii", np.zeros((8, 8, 8), np.float32)), max_bytes=1000)


def test_float_labels_must_be_whole_numbers_in_range(tmp_path):
    labels = np.zeros((4, 5, 6), np.float32)
    labels[1, 2, 3] = 2.0
    np.testing.assert_array_equal(read_label_map(_raw(tmp_path / "ok.nii", labels), 3), labels.astype(int))
    half = labels.copy()
    half[0, 0, :2] = 0.5
    with pytest.raises(DataFormatError, match=r"half.nii: 2 voxels hold non-integer labels \(e.g. 0.5\)"):
        read_label_map(_raw(tmp_path / "half.nii", half), 3)
    nan = labels.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataFormatError, match="1 NaN"):
        read_label_map(_raw(tmp_path / "nan.nii", nan), 3)


def test_labels_outside_the_classes_are_refused(tmp_path):
    labels = np.zeros((4, 5, 6), np.int16)
    labels[0, 0, 0], labels[1, 1, 1] = 3, -1
    path = _raw(tmp_path / "l.nii.gz", labels)
    with pytest.raises(DataFormatError,
                       match=r"l.nii.gz: 2 voxels hold labels outside \[0, 3\) \(values -1, 3\)"):
        read_label_map(path, 3)
    assert read_label_map(_raw(tmp_path / "m.nii.gz", np.abs(labels)), 4).max() == 3
    with pytest.raises(DataFormatError, match="must be 3D"):
        read_label_map(_raw(tmp_path / "4d.nii", np.zeros((4, 5, 6, 2), np.int16)), 3)
    with pytest.raises(ValueError, match="num_classes"):
        read_label_map(path, 0)


def test_label_map_must_share_its_images_grid(tmp_path, rng):
    image = write_volume(tmp_path / "img.nii.gz", rng.normal(size=(6, 7, 8)), AFFINE)
    labels = rng.integers(0, 3, size=(6, 7, 8))
    good = write_volume(tmp_path / "lab.nii.gz", labels, AFFINE)
    # the image is reoriented on reading; its labels follow it
    vol, lab = load_labelled_pair(image, good, 3, orientation="SAR")
    np.testing.assert_array_equal(lab, reorient(Volume(labels[None].astype(np.float32), AFFINE, (1, 1, 1)),
                                                "SAR").array[0])
    assert lab.shape == vol.shape and lab.dtype == np.int64
    small = write_volume(tmp_path / "small.nii.gz", labels[:5], AFFINE)
    with pytest.raises(DataFormatError, match=r"small.nii.gz: label map shape \(5, 7, 8\) differs from its "
                                              r"image's \(6, 7, 8\) \(.*img.nii.gz\)"):
        load_labelled_pair(image, small, 3)
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    moved = write_volume(tmp_path / "moved.nii.gz", labels, shifted)
    with pytest.raises(DataFormatError, match="not on the same voxel grid .* 2 mm"):
        load_labelled_pair(image, moved, 3)


def _slow_zscore(x, mask):
    """Loop reference: mean and standard deviation by explicit sums, in float64."""
    vals = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    return (x.astype(np.float64) - mean) / std


def test_normalize_intensity(rng):
    x = rng.gamma(2.0, 50.0, size=(6, 7, 8)).astype(np.float32)
    x[:, :, :2] = 0  # background
    fg = x != 0
    np.testing.assert_allclose(normalize_intensity(x), _slow_zscore(x, fg), rtol=1e-5, atol=1e-5)
    mask = np.zeros_like(fg)
    mask[2:5, 2:5, 3:7] = True
    np.testing.assert_allclose(normalize_intensity(x, mask), _slow_zscore(x, mask), rtol=1e-5, atol=1e-5)
    mm = normalize_intensity(x, method="minmax")
    assert mm[fg].min() == pytest.approx(0.0) and mm[fg].max() == pytest.approx(1.0)
    outlier = x.copy()
    outlier[3, 3, 5] = 1e6
    robust = normalize_intensity(outlier, method="robust")
    assert np.median(robust[fg]) == pytest.approx(0.0, abs=1e-6)
    assert abs(np.median(np.abs(robust[fg])) * 1.4826 - 1) < 1e-4  # MAD-scaled to 1
    clipped = normalize_intensity(outlier, clip=(1.0, 99.0))
    assert clipped.max() < 5  # the outlier was clipped before the statistics
    two = normalize_intensity(np.stack([x, 3 * x + 1]), fg)
    np.testing.assert_allclose(two[0], two[1], rtol=1e-4, atol=1e-4)  # channels each on their own
    with pytest.raises(ValueError, match="constant"):
        normalize_intensity(np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="selects 0 voxels"):
        normalize_intensity(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="method"):
        normalize_intensity(x, method="mean")
    with pytest.raises(ValueError, match="mask must be boolean"):
        normalize_intensity(x, fg.astype(np.uint8))
