"""The user's own data: ``folder:PATH`` (Pillow) and ``npz:TRAIN[,TEST]``, for training and
evaluation through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torchcaps.cli import main
from torchcaps.data import DataFormatError, load_dataset
from torchcaps.data.formats import read_image_folder

Image = pytest.importorskip("PIL.Image")


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_folder_grey_rgb_and_sizes(tmp_path):
    rng = np.random.default_rng(0)
    grey = {c: [rng.integers(0, 256, (6, 5), dtype=np.uint8) for _ in range(3)] for c in ("b", "a")}
    for c, ims in grey.items():
        for i, im in enumerate(ims):
            _save(tmp_path / "g" / c / f"{i}.png", im)
    (tmp_path / "g" / "a" / "notes.txt").write_text("ignored")
    (tmp_path / "g" / "a" / ".hidden.png").write_bytes(b"ignored")
    images, labels, classes = read_image_folder(tmp_path / "g")
    assert classes == ("a", "b") and images.shape == (6, 1, 6, 5) and labels.tolist() == [0] * 3 + [1] * 3
    np.testing.assert_array_equal(images[0, 0], grey["a"][0])  # sorted classes, sorted files
    # one colour image makes the whole set RGB; grey images are repeated over the channels
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 40, 120  # flat colour: JPEG keeps it closely
    _save(tmp_path / "g" / "b" / "9.jpg", rgb)
    images, labels, _ = read_image_folder(tmp_path / "g")
    assert images.shape == (7, 3, 6, 5)
    assert (images[0] == grey["a"][0][None]).all()
    assert np.abs(images[-1].astype(int) - rgb.transpose(2, 0, 1)).max() <= 3  # JPEG is lossy
    # a different size is refused, naming the file and both sizes
    _save(tmp_path / "g" / "b" / "8.png", np.zeros((7, 5), np.uint8))
    with pytest.raises(DataFormatError, match=r"b/8.png: image is 5x7 .* but .*a/0.png .* 5x6"):
        read_image_folder(tmp_path / "g")
    (tmp_path / "g" / "b" / "8.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="b/8.png: not a readable image"):
        read_image_folder(tmp_path / "g")
    _save(tmp_path / "deep" / "c" / "x.png", np.zeros((4, 4), np.uint16))  # 16-bit grey
    with pytest.raises(DataFormatError, match="x.png: I(;16)? images .16-bit"):
        read_image_folder(tmp_path / "deep")
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no .png/.jpg/.jpeg images"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        read_image_folder(tmp_path / "missing")


def _pets(root, n_train=6, n_test=2, size=(28, 28)):
    rng = np.random.default_rng(1)
    for part, n in (("train", n_train), ("test", n_test)):
        for c in ("cat", "dog"):
            for i in range(n):
                _save(root / part / c / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_folder_dataset_splits(tmp_path):
    _pets(tmp_path / "pets")
    d = load_dataset(f"folder:{tmp_path / 'pets'}", val_size=2)
    assert d.classes == ("cat", "dog") and d.num_classes == 2 and d.in_shape == (3, 28, 28)
    assert len(d.train) == 10 and len(d.val) == 2 and len(d.test) == 4
    assert d.test.labels.tolist() == [0, 0, 1, 1]
    # without a test/ folder a fixed tenth of the images is the test split
    _pets(tmp_path / "flat" / "train", n_train=10, n_test=0)
    flat = load_dataset(f"folder:{tmp_path / 'flat' / 'train'}", val_size=3)
    again = load_dataset(f"folder:{tmp_path / 'flat' / 'train'}", val_size=3, split_seed=5)
    assert len(flat.test) == 2 and len(flat.train) + len(flat.val) == 18
    assert torch.equal(flat.test.images, again.test.images)  # split_seed moves only validation
    # a test class the training set does not have is refused
    _save(tmp_path / "pets" / "test" / "owl" / "0.png", np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"class folders \['owl'\] are not among"):
        load_dataset(f"folder:{tmp_path / 'pets'}", val_size=2)
    (tmp_path / "only-test" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no train/ folder"):
        load_dataset(f"folder:{tmp_path / 'only-test'}")


def test_npz_dataset_grey_rgb_and_two_files(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (20, 9, 9), dtype=np.uint8), rng.integers(0, 3, 20)
    np.savez(tmp_path / "grey.npz", images=x, labels=y)
    d = load_dataset(f"npz:{tmp_path / 'grey.npz'}", val_size=4)
    assert d.in_shape == (1, 9, 9) and d.num_classes == int(y.max()) + 1
    assert len(d.test) == 2 and len(d.val) == 4 and len(d.train) == 14
    xt, yt = rng.integers(0, 256, (5, 3, 9, 9), dtype=np.uint8), np.array([0, 1, 4, 2, 1])
    np.savez(tmp_path / "rgb-test.npz", images=xt, labels=yt)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (12, 3, 9, 9), dtype=np.uint8),
             labels=rng.integers(0, 3, 12))
    d = load_dataset(f"npz:{tmp_path / 'rgb.npz'},{tmp_path / 'rgb-test.npz'}", val_size=2)
    assert d.in_shape == (3, 9, 9) and d.num_classes == 5 and len(d.test) == 5
    np.testing.assert_array_equal(d.test.images.numpy(), xt)
    with pytest.raises(DataFormatError,
                       match=r"test images are \(3, 9, 9\).*training images are \(1, 9, 9\)"):
        load_dataset(f"npz:{tmp_path / 'grey.npz'},{tmp_path / 'rgb-test.npz'}")
    np.savez(tmp_path / "float.npz", images=x.astype(np.float32), labels=y)
    with pytest.raises(DataFormatError, match="images must be uint8"):
        load_dataset(f"npz:{tmp_path / 'float.npz'}")
    np.savez(tmp_path / "wide.npz", images=np.zeros((4, 7, 9, 9), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(DataFormatError, match="C in 1-4"):
        load_dataset(f"npz:{tmp_path / 'wide.npz'}")
    with pytest.raises(FileNotFoundError):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(ValueError, match="npz:TRAIN.npz or npz:TRAIN.npz,TEST.npz"):
        load_dataset(f"npz:{tmp_path / 'a.npz'},b.npz,c.npz")


def test_train_and_evaluate_own_folder_from_the_command_line(tmp_path, capsys):
    _pets(tmp_path / "pets", n_train=8, n_test=3)
    out = tmp_path / "run"
    argv = ["train", "--model", "cnn_baseline", "--model-kwargs",
            '{"conv_channels": [4, 4, 4], "hidden": [8, 8]}', "--dataset",
            f"folder:{tmp_path / 'pets'}+norm", "--val-size", "2", "--epochs", "1",
            "--batch-size", "4", "--augment", "cifar", "--out", str(out), "--no-progress",
            "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "/6)" in printed
    manifest = json.loads((out / "best.json").read_text())
    assert manifest["config"]["dataset"].endswith("pets+norm")
    # evaluate rebuilds the checkpoint's dataset, views included (normalised test images)
    assert main(["evaluate", str(out / "best.json"), "--no-plots", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["total"] == 6 and len(result["confusion"]) == 2
