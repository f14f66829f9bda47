"""Every registered model on every dataset format: one training step each (dataset x model).

The datasets are small files in the exact published formats (``test_datasets_formats``),
read through the catalog with their paper views, so channels and size come from the data:
1x28x28 (IDX, EMNIST, digits resized), 3x32x32 (CIFAR, SVHN), 1x32x32 and 2x32x32
(smallNORB downsampled to 48 and centre-cropped to 32), 1x40x40 (affNIST), 1x8x8 (raw
digits) and a 3x24x24 image folder. A model either trains one step on the shape or refuses
it at construction with one ValueError naming the size; the refusals are listed below, and
any other refusal fails. Models are built small (``TINY``) to keep the matrix fast; the
default suite runs one dataset per shape, ``-m slow`` the whole matrix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torchcaps
from test_datasets_formats import pin_digests, write_dataset
from torchcaps.data import load_dataset
from torchcaps.train import ClassificationTask, TrainConfig, run_task

#: small settings of every registered model (same architecture, fewer channels/capsules)
TINY = {
    "capsnet": {"conv_channels": 16, "primary_types": 4},
    "cluster_capsnet": {"channels": 2, "cluster_size": 2, "dim": 2},
    "cnn_baseline": {"conv_channels": (8, 8, 8), "hidden": (16, 8)},
    "efficient_capsnet": {"channels": (8, 8, 8, 16), "decoder_hidden": (32, 64)},
    "em_capsnet": {"conv_channels": 8, "primary_types": 4, "caps1_types": 4, "caps2_types": 4,
                   "iterations": 1},
    "ida_capsnet": {"channels": (8, 8, 8), "primary_types": 2, "hidden_caps": (4,)},
    "res_capsnet": {"conv_channels": 16, "primary_types": 2, "depth": 3, "hidden_caps": 4,
                    "hidden_dim": 4},
    "subspace_capsnet": {"channels": (8, 8, 8, 8), "sc_types": (2, 2), "sc_dim": 4, "class_dim": 4},
    "vb_capsnet": {"conv_channels": 8, "primary_types": 4, "caps1_types": 4, "caps2_types": 4,
                   "iterations": 1},
}

#: dataset string -> (training augmentation, in_shape it must give)
DATASETS = {
    "fashion-mnist": ("shift", (1, 28, 28)),
    "kmnist": ("shift", (1, 28, 28)),
    "emnist-balanced": ("shift", (1, 28, 28)),
    "emnist-letters": ("efficient", (1, 28, 28)),
    "cifar10+norm": ("cifar", (3, 32, 32)),
    "cifar100": ("cifar", (3, 32, 32)),
    "svhn": ("shift", (3, 32, 32)),
    "smallnorb+resize48+crop32+standardize": ("norb", (1, 32, 32)),
    "smallnorb-stereo+resize48+crop32": ("norb", (2, 32, 32)),
    "affnist": ("shift", (1, 40, 40)),
    "digits+resize28": ("shift", (1, 28, 28)),
    "digits": ("none", (1, 8, 8)),
    "folder": ("cifar", (3, 24, 24)),
}
#: one dataset per shape, in the default (fast) suite
FAST = ("fashion-mnist", "cifar10+norm", "smallnorb+resize48+crop32+standardize",
        "smallnorb-stereo+resize48+crop32", "affnist", "digits", "folder")

#: (model, (H, W)) pairs refused at construction: too small for the model's valid convolutions
REFUSED = {(m, (8, 8)) for m in ("capsnet", "efficient_capsnet", "em_capsnet", "res_capsnet",
                                  "vb_capsnet")}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Every dataset of the sweep, loaded once through the catalog from fake published files."""
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("fashion-mnist", "kmnist", "emnist-balanced", "emnist-letters", "cifar10",
                     "cifar100", "svhn", "smallnorb", "smallnorb-stereo", "affnist"):
            write_dataset(name, cache / "downloads", n_train=10, n_test=4)
            pin_digests(mp, name, cache / "downloads")
        folder = tmp_path_factory.mktemp("images")
        _image_folder(folder)
        for name in DATASETS:
            source = f"folder:{folder}" if name == "folder" else name
            out[name] = load_dataset(source, cache, val_size=2)
    return out


def _image_folder(root) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 5), ("test", 2)):
        for cls in ("cat", "dog", "emu"):
            (root / part / cls).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / part / cls / f"{i}.png")


def _cases(names):
    for name in names:
        for model in torchcaps.list_models():
            marks = []
            if name not in FAST:
                marks.append(pytest.mark.slow)
            yield pytest.param(name, model, marks=marks, id=f"{name}-{model}")


@pytest.mark.parametrize("dataset, model", list(_cases(DATASETS)))
def test_one_training_step_or_a_clear_refusal(dataset, model, splits):
    d = splits[dataset]
    augment, shape = DATASETS[dataset]
    assert d.in_shape == shape
    kwargs = {"in_shape": shape, "num_classes": d.num_classes, **TINY[model]}
    if (model, shape[1:]) in REFUSED:
        with pytest.raises(ValueError, match=f"{shape[1]}x{shape[2]} is too small"):
            torchcaps.create_model(model, **kwargs)
        return
    cfg = TrainConfig(model=model, model_kwargs=TINY[model], dataset=dataset, augment=augment,
                      batch_size=4, max_steps=1, out=None, progress=False, threads=1,
                      eval_batch_size=16)
    task = ClassificationTask(data=d)
    trainer, summary = run_task(task, cfg)
    assert summary["steps"] == 1
    assert tuple(task.model.in_shape) == shape and task.model.num_classes == d.num_classes
    assert math.isfinite(summary["test_loss"]) and summary["test_total"] == len(d.test)
    # the batch the step trained on had the model's shape (augmentation kept the size)
    x, y = task.batch(0, 0, torch.Generator().manual_seed(0))
    assert tuple(x.shape[1:]) == shape and torch.isfinite(x).all()


def test_every_model_is_in_the_sweep():
    assert set(TINY) == set(torchcaps.list_models())
