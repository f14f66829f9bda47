"""The MNI152 tissue benchmark and the pretraining volumes on a small synthetic template,
packed into a fake nilearn wheel (and a fake dipy wheel) with their digests pinned here: the
source order, digest checks, pip failures, the label rule against hand-computed and loop
references, resampling, the splits' margins, axial slices and the overlay PNG. No network,
no nilearn. The real template is checked by the ``slow`` test at the end when its wheel is
at hand (``TORCHCAPS_TEST_WHEELS``: a folder holding the pinned wheels)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from torchcaps.data import mni152  # noqa: E402
from torchcaps.data.errors import ChecksumError, DataFormatError  # noqa: E402
from torchcaps.data.mni152 import (  # noqa: E402
    DIPY,
    MNI152_GM,
    MNI152_T1,
    MNI152_WM,
    NILEARN,
    fetch_mni152,
    load_mni152_tissue,
    load_pretraining_volumes,
    make_tissue_volumes,
    template_training_volumes,
    tissue_labels,
)
from torchcaps.data.volumes import read_volume  # noqa: E402
from torchcaps.viz.overlay import save_overlay_png  # noqa: E402

_REAL_INSTALLED_FOLDER = mni152._installed_folder  # the fixture below replaces it

SHAPE = (33, 30, 36)  # x (left-right), y, z of the fake template, 1 mm voxels
AFFINE = np.array([[1.0, 0, 0, -16], [0, 1, 0, -15], [0, 0, 1, -10], [0, 0, 0, 1]])  # x = 0 at i = 16


def _fake_template(rng) -> dict[str, np.ndarray]:
    """An ellipsoidal 'brain': white matter inside, a noisy grey-matter shell, CSF at the edge."""
    idx = np.indices(SHAPE).astype(float)
    centre, radii = np.array([16, 15, 17])[:, None, None, None], np.array([13, 12, 15])[:, None, None, None]
    r = np.sqrt((((idx - centre) / radii) ** 2).sum(0))
    wm = np.clip((0.55 - r) / 0.2, 0, 1) * 255
    gm = np.clip(255 - wm, 0, None) * np.clip((0.95 - r) / 0.15, 0, 1)
    gm = np.minimum(gm + rng.integers(0, 40, SHAPE) * (r < 0.95), 255 - wm)
    wm, gm = np.rint(wm), np.floor(gm)
    t1 = (r < 1.0) * (60 + 120 * wm / 255 + 50 * gm / 255 + rng.integers(1, 10, SHAPE))
    return {MNI152_T1: t1.astype(np.uint8), MNI152_GM: gm.astype(np.uint8), MNI152_WM: wm.astype(np.uint8)}


def _write_wheel(path: Path, folder: str, files: dict[str, np.ndarray], affine=AFFINE) -> dict[str, str]:
    """A zip named like a wheel holding ``files`` as .nii.gz under ``folder``; their SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digests = {}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{folder}/README.txt", "other data")
        for name, array in files.items():
            blob = gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), mtime=0)
            digests[name] = hashlib.sha256(blob).hexdigest()
            z.writestr(f"{folder}/{name}", blob)
    return digests


@pytest.fixture
def template(tmp_path, monkeypatch):
    """A fake nilearn wheel in ``tmp_path/wheels`` with its files' digests pinned."""
    arrays = _fake_template(np.random.default_rng(0))
    wheel = tmp_path / "wheels" / NILEARN.wheel
    digests = _write_wheel(wheel, NILEARN.folder, arrays)
    monkeypatch.setattr(mni152, "NILEARN", dataclasses.replace(NILEARN, files=digests))
    monkeypatch.setattr(mni152, "_installed_folder", lambda spec: None)
    return types.SimpleNamespace(wheel=wheel, arrays=arrays, digests=digests, data=tmp_path / "data")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Chebyshev dilation of a 3D mask by ``r`` voxels."""
    out = mask.copy()
    for axis in range(3):
        grown = out.copy()
        for s in range(1, r + 1):
            grown |= np.roll(out, s, axis) & _not_wrapped(out.shape, axis, s)
            grown |= np.roll(out, -s, axis) & _not_wrapped(out.shape, axis, -s)
        out = grown
    return out


def _not_wrapped(shape, axis, shift):
    keep = np.ones(shape, bool)
    index = [slice(None)] * 3
    index[axis] = slice(0, shift) if shift > 0 else slice(shape[axis] + shift, None)
    keep[tuple(index)] = False
    return keep


# ----------------------------------------------------------------------------- labels


def test_tissue_labels_by_hand():
    # probabilities in units of 1/20: other = 20 - gm - wm
    gm = np.array([10, 4, 6, 0, 8, 9])
    wm = np.array([2, 14, 6, 0, 8, 2])
    # other:       8  2  8 20  4  9
    expected = [1, 2, 0, 0, 1, 0]  # ties: GM over WM (5th), other over GM (6th)
    assert tissue_labels(gm, wm, total=20).tolist() == expected
    assert tissue_labels(gm / 20, wm / 20).tolist() == [1, 2, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="probabilities"):
        tissue_labels(np.array([0.7]), np.array([0.4]))
    with pytest.raises(ValueError, match="one shape"):
        tissue_labels(np.zeros(2), np.zeros(3))


def test_two_mm_labels_are_the_argmax_of_block_mean_probabilities(template):
    tv = load_mni152_tissue(template.data, spacing=2, margin=1, wheel=template.wheel, fetch=False, crop_pad=2)
    t1, gm, wm = (read_volume(fetch_mni152(template.data, fetch=False) / n, orientation="SAR")
                  for n in (MNI152_T1, MNI152_GM, MNI152_WM))
    # locate the crop from the affine: the first coarse voxel's centre is 0.5 fine voxels in
    start = np.rint(np.linalg.solve(t1.affine, tv.affine @ np.array([0, 0, 0, 1.0]))[:3] - 0.5).astype(int)
    d, h, w = tv.labels.shape
    labels = tv.labels.numpy()
    image = tv.image[0].double().numpy()
    means = []
    for i in range(d):  # slow loop reference, float64
        for j in range(h):
            for k in range(w):
                lo = start + 2 * np.array([i, j, k])
                block = tuple(slice(a, a + 2) for a in lo)
                p_gm, p_wm = gm.array[block].mean() / 255, wm.array[block].mean() / 255
                probs = [1 - p_gm - p_wm, p_gm, p_wm]
                best = max(range(3), key=lambda c: (probs[c] - 1e-12 * c))  # ties to the lower label
                assert labels[i, j, k] == best, (i, j, k, probs)
                means.append((t1.array[block].mean(), image[i, j, k]))
    raw, normalised = np.array(means).T
    slope, offset = np.polyfit(raw, normalised, 1)  # the image is a linear map of the block means
    np.testing.assert_allclose(raw * slope + offset, normalised, atol=1e-4)
    assert tv.background == pytest.approx(offset, abs=1e-4)


def test_resampling_shapes_and_affines(template):
    one = load_mni152_tissue(template.data, spacing=1, wheel=template.wheel, fetch=False)
    two = load_mni152_tissue(template.data, spacing=2, margin=1, fetch=False)  # from the cache now
    three = load_mni152_tissue(template.data, spacing=3, margin=1, fetch=False)
    for tv, k in ((one, 1), (two, 2), (three, 3)):
        assert tv.image.dtype == torch.float32 and tv.labels.dtype == torch.int64
        assert tv.image.shape == (1, *tv.labels.shape)
        np.testing.assert_allclose(np.abs(tv.affine[:3, :3]).sum(0), k)  # SAR: one non-zero per column
        assert tv.spacing == k and tv.class_names == ("other", "grey matter", "white matter")
    # SAR order, D along z. The fake brain spans z 3..31, y 4..26, x 4..28; with crop_pad 4 the
    # box reaches the volume's edges (36, 30, 33); at 2 mm x has an odd 33 planes and no room
    # to grow, so it is trimmed to 32
    assert one.labels.shape == (36, 30, 33)
    assert two.labels.shape == (18, 15, 16) and three.labels.shape == (12, 10, 11)
    # a coarse voxel's centre is the mean of its fine voxels' centres
    world = two.affine @ np.array([0, 0, 0, 1.0])
    fine = one.affine @ np.array([0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(world, fine)
    with pytest.raises(ValueError, match="multiple"):
        load_mni152_tissue(template.data, spacing=1.5, fetch=False)
    # the normalisation's statistics come from the training region's brain voxels only
    train = one.mask("train").numpy()
    brain = one.image[0].numpy() > one.background + 1e-6
    values = one.image[0].numpy()[train & brain]
    assert values.mean() == pytest.approx(0, abs=1e-4) and values.std() == pytest.approx(1, abs=1e-4)


def test_template_files_must_agree(template):
    folder = fetch_mni152(template.data, wheel=template.wheel, fetch=False)
    t1, gm, wm = (read_volume(folder / n, orientation="SAR") for n in (MNI152_T1, MNI152_GM, MNI152_WM))
    assert make_tissue_volumes(t1, gm, wm, spacing=1).labels.shape == (36, 30, 33)
    small = dataclasses.replace(gm, array=gm.array[1:])
    with pytest.raises(DataFormatError, match="not on the T1's voxel grid"):
        make_tissue_volumes(t1, small, wm, spacing=1)
    heavy = dataclasses.replace(wm, array=np.maximum(wm.array, 200))
    with pytest.raises(DataFormatError, match="probability above 1"):
        make_tissue_volumes(t1, gm, heavy, spacing=1)
    empty = dataclasses.replace(t1, array=np.zeros_like(t1.array))
    with pytest.raises(DataFormatError, match="empty"):
        make_tissue_volumes(empty, *(dataclasses.replace(v, array=np.zeros_like(v.array)) for v in (gm, wm)))


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("split", ["axial", "hemisphere"])
@pytest.mark.parametrize("margin", [0, 2, 3])
def test_splits_are_disjoint_and_keep_the_margin(template, split, margin):
    tv = load_mni152_tissue(template.data, spacing=1, split=split, margin=margin, wheel=template.wheel,
                            fetch=False)
    masks = {name: tv.mask(name).numpy() for name in ("train", "val", "test")}
    assert sorted(tv.regions) == ["test", "train", "val"]
    for a in masks:
        assert masks[a].any()
        for b in masks:
            if a != b:  # no voxel of b within `margin` voxels of a
                assert not (_dilate(masks[a], margin) & masks[b]).any(), (a, b)
    if split == "axial":  # the gap is exactly `margin` planes: one more and they touch
        assert (_dilate(masks["train"], margin + 1) & masks["val"]).any()
        assert (_dilate(masks["val"], margin + 1) & masks["test"]).any()
        # inferior to superior: train, val, test; full axial planes each
        planes = {n: np.flatnonzero(m.any(axis=(1, 2))) for n, m in masks.items()}
        assert planes["train"].max() < planes["val"].min() <= planes["val"].max() < planes["test"].min()
        assert all(m[p].all() for n, m in masks.items() for p in planes[n])
    else:  # train and val left of x = 0, test right of it, `margin` planes left out around it
        x_of_w = tv.affine[0, 2] * np.arange(tv.labels.shape[2]) + tv.affine[0, 3]
        for name, side in (("train", -1), ("val", -1), ("test", 1)):
            xs = x_of_w[masks[name].any(axis=(0, 1))]
            assert (np.sign(xs) == side).all()
            assert np.abs(xs).min() >= margin / 2


def test_subvolumes_hold_only_their_split(template):
    tv = load_mni152_tissue(template.data, spacing=1, split="hemisphere", wheel=template.wheel, fetch=False)
    for name in ("train", "val", "test"):
        mask = tv.mask(name)
        pieces = tv.subvolumes(name)
        assert sum(y.numel() for _, y in pieces) == int(mask.sum())
        assert torch.equal(torch.cat([x.flatten() for x, _ in pieces]).sort().values,
                           tv.image[0][mask].sort().values)
        counts = torch.bincount(tv.labels[mask], minlength=3).double()
        torch.testing.assert_close(tv.class_fractions(name), counts / counts.sum())
    with pytest.raises(KeyError, match="no split 'dev'"):
        tv.mask("dev")


def test_axial_slices_are_padded_to_a_multiple(template):
    tv = load_mni152_tissue(template.data, spacing=1, margin=2, wheel=template.wheel, fetch=False)
    d, h, w = tv.labels.shape  # (35, 30, 33)
    for name in ("train", "test"):
        images, labels = tv.axial_slices(name)
        planes = np.flatnonzero(tv.mask(name).numpy().any(axis=(1, 2)))
        assert images.shape == (planes.size, 1, 32, 48) and labels.shape == (planes.size, 32, 48)
        # the slices sit centred: (32 - 30) / 2 = 1 row and (48 - 33) // 2 = 7 columns before them
        assert torch.equal(images[:, 0, 1:31, 7:40], tv.image[0, planes])
        assert torch.equal(labels[:, 1:31, 7:40], tv.labels[planes])
        border = torch.ones(32, 48, dtype=torch.bool)
        border[1:31, 7:40] = False
        assert (images[:, 0][:, border] == tv.background).all() and (labels[:, border] == 0).all()
    images, labels = tv.axial_slices("val", multiple=8, pad_label=-100)
    assert images.shape[-2:] == (32, 40) and (labels[:, 0] == -100).all()
    with pytest.raises(ValueError, match="multiple"):
        tv.axial_slices("val", multiple=0)


def test_impossible_splits_are_refused(template):
    with pytest.raises(ValueError, match="cannot hold bands"):
        load_mni152_tissue(template.data, spacing=3, margin=10, wheel=template.wheel, fetch=False)
    with pytest.raises(ValueError, match="split must be"):
        load_mni152_tissue(template.data, split="random", fetch=False)
    with pytest.raises(ValueError, match="margin"):
        load_mni152_tissue(template.data, margin=-1, fetch=False)


# ----------------------------------------------------------------------------- sources


def test_files_are_extracted_once_and_checked_on_every_use(template):
    folder = fetch_mni152(template.data, wheel=template.wheel, fetch=False)
    assert folder == template.data / "mni152"
    assert sorted(p.name for p in folder.iterdir()) == sorted(template.digests)
    # later loads need no wheel; a damaged cached copy is refused, not re-used
    assert fetch_mni152(template.data, fetch=False) == folder
    (folder / MNI152_WM).write_bytes(b"damaged")
    with pytest.raises(ChecksumError, match=f"{MNI152_WM}: SHA-256 mismatch.*delete it"):
        load_mni152_tissue(template.data, spacing=1, fetch=False)
    # force: extract again from the wheel
    fetch_mni152(template.data, wheel=template.wheel.parent, fetch=False, force=True)
    assert load_mni152_tissue(template.data, spacing=1, fetch=False).labels.numel() > 0


def test_a_wheel_with_other_files_is_refused(template, tmp_path, monkeypatch):
    other = dict(template.digests, **{MNI152_GM: "0" * 64})
    monkeypatch.setattr(mni152, "NILEARN", dataclasses.replace(mni152.NILEARN, files=other))
    with pytest.raises(ChecksumError, match=f"{MNI152_GM} in {NILEARN.wheel}: SHA-256 mismatch .*"
                                            "nilearn==0.14.1"):
        fetch_mni152(template.data, wheel=template.wheel, fetch=False)
    assert not (template.data / "mni152").exists()  # nothing kept
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="broken.whl: not a valid wheel"):
        fetch_mni152(template.data, wheel=tmp_path / "broken.whl", fetch=False)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("nilearn/__init__.py", "")
    with pytest.raises(DataFormatError, match=f"has no {NILEARN.folder}/mni_icbm152"):
        fetch_mni152(template.data, wheel=empty, fetch=False)


def test_no_source_says_how_to_get_the_files(template):
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps .*nilearn==0\.14\.1"):
        load_mni152_tissue(template.data, spacing=1, fetch=False)
    # a wheel copied by hand into DATA/downloads is found there
    downloads = template.data / "downloads"
    downloads.mkdir(parents=True)
    (downloads / NILEARN.wheel).write_bytes(template.wheel.read_bytes())
    assert load_mni152_tissue(template.data, spacing=1, fetch=False).image.shape[0] == 1


def _fake_pip(template, returncode=0, stderr=""):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / NILEARN.wheel).write_bytes(template.wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return types.SimpleNamespace(run=run, TimeoutExpired=subprocess.TimeoutExpired), calls


def test_pip_download_is_the_last_resort(template, monkeypatch):
    fake, calls = _fake_pip(template)
    monkeypatch.setattr(mni152, "subprocess", fake)
    wheel_digest = hashlib.sha256(template.wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(mni152, "NILEARN", dataclasses.replace(mni152.NILEARN, wheel_sha256=wheel_digest))
    tv = load_mni152_tissue(template.data, spacing=1)
    assert tv.labels.numel() > 0 and len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[-1] == "nilearn==0.14.1"
    assert (template.data / "downloads" / NILEARN.wheel).is_file()
    load_mni152_tissue(template.data, spacing=1)
    assert len(calls) == 1  # cached


def test_a_tampered_download_is_deleted(template, monkeypatch):
    fake, _ = _fake_pip(template)
    monkeypatch.setattr(mni152, "subprocess", fake)
    with pytest.raises(ChecksumError, match=f"{NILEARN.wheel}: SHA-256 mismatch.*not the wheel published"):
        fetch_mni152(template.data)
    assert not (template.data / "downloads" / NILEARN.wheel).exists()


@pytest.mark.parametrize("stderr, error, words", [
    ("ERROR: Could not find a version that satisfies the requirement nilearn==0.14.1\n"
     "ERROR: No matching distribution found", ConnectionError, "is PyPI reachable.*No matching"),
    ("/usr/bin/python: No module named pip", RuntimeError, "pip is not available in this Python"),
])
def test_pip_failures_are_reported(template, monkeypatch, stderr, error, words):
    fake, _ = _fake_pip(template, returncode=1, stderr=stderr)
    monkeypatch.setattr(mni152, "subprocess", fake)
    with pytest.raises(error, match=words) as err:
        fetch_mni152(template.data)
    assert "pip download --no-deps" in str(err.value)  # and how to get the wheel elsewhere


def test_an_installed_nilearn_is_found_without_importing_it(template, tmp_path, monkeypatch):
    site = tmp_path / "site"
    package = site / "nilearn"
    (package / "datasets" / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('nilearn must not be imported')\n")
    with zipfile.ZipFile(template.wheel) as z:
        for name in template.digests:
            (package / "datasets" / "data" / name).write_bytes(z.read(f"{NILEARN.folder}/{name}"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(mni152, "_installed_folder", _REAL_INSTALLED_FOLDER)
    monkeypatch.delitem(sys.modules, "nilearn", raising=False)
    assert fetch_mni152(template.data, fetch=False) == template.data / "mni152"
    assert "nilearn" not in sys.modules
    # an installed release with other files is passed over for the pinned wheel
    (template.data / "mni152" / MNI152_T1).unlink()
    (package / "datasets" / "data" / MNI152_T1).write_bytes(b"another release")
    with pytest.raises(FileNotFoundError, match="the installed nilearn.*SHA-256 mismatch.*pip download"):
        fetch_mni152(template.data, fetch=False)
    (template.data / "downloads").mkdir(parents=True)
    (template.data / "downloads" / NILEARN.wheel).write_bytes(template.wheel.read_bytes())
    assert fetch_mni152(template.data, fetch=False) == template.data / "mni152"



# ----------------------------------------------------------------------------- pretraining


@pytest.fixture
def dipy_wheel(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    files = {
        "S0_10slices.nii.gz": rng.integers(0, 4000, (12, 10, 5, 1)).astype(np.uint16),
        "aniso_vox.nii.gz": rng.integers(0, 2000, (9, 8, 6)).astype(np.int16),
        "test_piesno.nii.gz": rng.random((10, 11, 4)),
    }
    wheel = tmp_path / "dipy-wheels" / DIPY.wheel
    lps = np.diag([-4.0, -4.0, 5.0, 1.0])
    digests = _write_wheel(wheel, DIPY.folder, files, lps)
    monkeypatch.setattr(mni152, "DIPY", dataclasses.replace(DIPY, files=digests))
    return wheel


@pytest.mark.parametrize("split", ["axial", "hemisphere"])
def test_pretraining_volumes_never_include_the_val_or_test_region(template, dipy_wheel, split):
    volumes = load_pretraining_volumes(template.data, fetch=False, spacing=1, split=split, margin=2,
                                       wheel=template.wheel, dipy_wheel=dipy_wheel)
    dipy = volumes[:3]
    assert [v.path.name for v in dipy] == list(mni152.DIPY.files)
    assert [v.array.shape for v in dipy] == [(1, 5, 10, 12), (1, 6, 8, 9), (1, 4, 11, 10)]  # SAR order
    for v in dipy:
        fg = v.array[0] != v.array[0].min()
        assert abs(v.array[0][fg].mean()) < 0.2
    tv = load_mni152_tissue(template.data, spacing=1, split=split, margin=2, fetch=False)
    seen = np.zeros(tv.labels.shape, bool)
    for v in volumes[3:]:
        assert v.array.shape[0] == 1 and v.path.name == MNI152_T1
        # map every voxel through the affines into the benchmark's grid
        grid = np.indices(v.shape).reshape(3, -1)
        world = v.affine @ np.vstack([grid, np.ones(grid.shape[1])])
        d, h, w = np.rint(np.linalg.solve(tv.affine, world)[:3]).astype(int)
        assert not tv.mask("test").numpy()[d, h, w].any() and not tv.mask("val").numpy()[d, h, w].any()
        np.testing.assert_array_equal(v.array[0].reshape(-1), tv.image[0].numpy()[d, h, w])
        seen[d, h, w] = True
    np.testing.assert_array_equal(seen, tv.mask("train").numpy())  # all of train, nothing else


def test_a_training_box_that_touches_the_test_region_is_refused(template):
    tv = load_mni152_tissue(template.data, spacing=1, margin=2, wheel=template.wheel, fetch=False)
    test_box = tv.regions["test"][0]
    tv.regions["train"] = tv.regions["train"] + ((slice(test_box[0].start - 1, test_box[0].start + 1),
                                                  slice(0, 5), slice(0, 5)),)
    with pytest.raises(RuntimeError, match="overlaps the 'test' region"):
        template_training_volumes(tv)


# ----------------------------------------------------------------------------- overlay


def test_overlay_png(template, tmp_path):
    tv = load_mni152_tissue(template.data, spacing=1, wheel=template.wheel, fetch=False)
    pred = tv.labels.clone()
    pred[:, :, :10] = 0
    out = save_overlay_png(tmp_path / "overlay.png", tv.image[0], tv.labels, pred,
                           class_names=tv.class_names, coronal=True)
    assert out == tmp_path / "overlay.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    picture = imread(out)
    assert picture.ndim == 3 and picture.shape[0] > picture.shape[1] > 200  # 8 rows, 3 columns
    flat = save_overlay_png(tmp_path / "slice.png", tv.image[0, 10].numpy(), tv.labels[10].numpy())
    assert imread(flat).shape[1] < picture.shape[1]  # 2 columns
    with pytest.raises(ValueError, match="labels has shape"):
        save_overlay_png(tmp_path / "bad.png", tv.image[0], tv.labels[1:])
    with pytest.raises(TypeError, match="integer labels"):
        save_overlay_png(tmp_path / "bad.png", tv.image[0], tv.labels.float())
    with pytest.raises(ValueError, match="slices must be"):
        save_overlay_png(tmp_path / "bad.png", tv.image[0], tv.labels, slices=[999])
    assert not (tmp_path / "bad.png").exists()


# ----------------------------------------------------------------------------- the real template


def _real_wheel(spec) -> Path:
    folder = os.environ.get("TORCHCAPS_TEST_WHEELS")
    if not folder or not (Path(folder) / spec.wheel).is_file():
        pytest.skip(f"set TORCHCAPS_TEST_WHEELS to a folder holding {spec.wheel}")
    return Path(folder) / spec.wheel


@pytest.mark.slow
def test_the_real_template(tmp_path):
    wheel = _real_wheel(NILEARN)
    folder = fetch_mni152(tmp_path, wheel=wheel, fetch=False)
    t1 = read_volume(folder / MNI152_T1)
    assert t1.array.shape == (197, 233, 189) and t1.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(t1.array, t1.array[::-1])  # symmetric: left = mirrored right
    tv = load_mni152_tissue(tmp_path, fetch=False)
    assert tv.image.shape == (1, 81, 96, 78)
    fractions = {name: tv.class_fractions(name) for name in ("train", "val", "test")}
    for f in fractions.values():
        assert (f[1:] > 0.05).all()  # grey and white matter in every split
    half = load_mni152_tissue(tmp_path, split="hemisphere", fetch=False)
    (train_box,), (test_box,) = half.regions["train"], half.regions["test"]
    assert train_box[2].stop <= 39 <= test_box[2].start  # x = 0 lies between voxels 38 and 39
    volumes = load_pretraining_volumes(tmp_path, fetch=False, wheel=wheel, dipy_wheel=_real_wheel(DIPY))
    assert [v.array.shape for v in volumes[:3]] == [(1, 10, 128, 128), (1, 24, 58, 58), (1, 14, 96, 96)]
