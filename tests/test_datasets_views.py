"""Dataset views (load-time preprocessing), training recipes, and the catalog's consistency
with the command line and the documentation."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from torchcaps.cli import _args
from torchcaps.data import (
    AUGMENTATIONS,
    UnsafePickleError,
    augment_batch,
    list_datasets,
    load_dataset,
    load_numpy_pickle,
    random_shift,
    split_dataset_name,
)
from torchcaps.data.catalog import DIGITS_TEST_SIZE, get_dataset_spec
from torchcaps.data.sources import SOURCES
from torchcaps.data.transforms import (
    center_crop,
    random_brightness_contrast,
    random_crop,
    random_flip,
    resize,
    standardize,
)
from torchcaps.train.config import AUGMENT_CHOICES, TrainConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "datasets.md"


def test_dataset_names_split_off_views_only():
    assert split_dataset_name("smallnorb+resize48+crop32+standardize") == (
        "smallnorb", ["resize48", "crop32", "standardize"])
    assert split_dataset_name("folder:my+data+norm") == ("folder:my+data", ["norm"])
    assert split_dataset_name("digits") == ("digits", [])
    with pytest.raises(ValueError, match="order resize, crop, norm, standardize"):
        load_dataset("digits+crop4+resize28")
    with pytest.raises(ValueError, match="choose one of norm and standardize"):
        load_dataset("digits+norm+standardize")
    with pytest.raises(ValueError, match="crop9 is larger than the 8x8 images"):
        load_dataset("digits+crop9")
    with pytest.raises(KeyError, match="unknown dataset 'digits\\+blur'"):
        load_dataset("digits+blur")


def test_digits_is_real_and_its_test_split_fixed():
    d = load_dataset("digits")
    assert d.in_shape == (1, 8, 8) and d.num_classes == 10 and d.classes[3] == "3"
    assert len(d.test) == DIGITS_TEST_SIZE and len(d.val) == 180
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert int(d.train.images.max()) == 255  # 16 grey levels scaled to 0-255
    other = load_dataset("digits", split_seed=3)
    assert torch.equal(d.test.images, other.test.images)  # only validation moves with the seed
    assert not torch.equal(d.val.images, other.val.images)
    big = load_dataset("digits+resize28")
    assert big.in_shape == (1, 28, 28) and big.train.images.dtype == torch.uint8
    # bilinear resize: the mean grey level is kept within rounding
    assert abs(float(big.test.images.float().mean()) - float(d.test.images.float().mean())) < 2.0


def test_crop_norm_and_standardize_views():
    d = load_dataset("digits+resize12+crop8+norm")
    assert d.in_shape == (1, 8, 8) and d.train.images.shape[-2:] == (12, 12)
    x, _ = d.test.batch(slice(0, 5))  # the test-time view: centre crop, then normalisation
    raw, _ = d.test.raw(slice(0, 5))
    mean, std = d.test.mean[0], d.test.std[0]
    torch.testing.assert_close(x, (raw[..., 2:10, 2:10] - mean) / std)
    # the statistics are those of the training split as a model sees it (centre crop)
    tx, _ = d.train.batch(slice(None))
    assert abs(float(tx.mean())) < 1e-5 and abs(float(tx.std(unbiased=False)) - 1) < 1e-4
    s = load_dataset("digits+standardize")
    xs, _ = s.val.batch(slice(0, 4))
    torch.testing.assert_close(xs.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(xs.std(dim=(1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


def test_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 1:5])
    assert torch.equal(center_crop(x, (2, 4)), x[..., 2:4, 1:5])
    crops = random_crop(x, 4, g, padding=2)
    assert crops.shape == (2, 3, 4, 4)
    # every crop is a window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        assert any(torch.equal(crops[b], padded[b, :, i:i + 4, j:j + 4])
                   for i in range(7) for j in range(7))
    flipped = random_flip(x, torch.Generator().manual_seed(1), p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    assert torch.equal(random_flip(x, g, p=0.0), x)
    grey = torch.full((3, 1, 4, 4), 0.5)
    grey[:, :, 0] = 0.7
    jittered = random_brightness_contrast(grey, torch.Generator().manual_seed(2))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, grey)
    const = standardize(torch.full((1, 1, 3, 3), 0.4))
    torch.testing.assert_close(const, torch.zeros(1, 1, 3, 3), atol=1e-5, rtol=0)  # finite: 0/0 avoided
    big = resize((x * 3).clamp(0, 255).to(torch.uint8), (12, 12))
    assert big.dtype == torch.uint8 and big.shape == (2, 3, 12, 12)
    with pytest.raises(ValueError, match="cannot crop 7x7 from 6x6"):
        center_crop(x, 7)


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_every_recipe_is_deterministic_and_gives_the_model_size(name):
    x = torch.rand(4, 3, 36, 36)
    out = augment_batch(name, x, (32, 32), torch.Generator().manual_seed(7), max_shift=2)
    again = augment_batch(name, x, (32, 32), torch.Generator().manual_seed(7), max_shift=2)
    assert out.shape == (4, 3, 32, 32) and torch.equal(out, again)
    assert torch.isfinite(out).all()


def test_shift_recipe_draws_exactly_as_before():
    """Runs recorded before the recipes existed resume onto the same batches."""
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(augment_batch("shift", x, (28, 28), torch.Generator().manual_seed(3), 2),
                               random_shift(x, 2, torch.Generator().manual_seed(3)), rtol=0, atol=0)


def test_choices_agree_everywhere():
    assert tuple(AUGMENTATIONS) == AUGMENT_CHOICES == _args.AUGMENTATIONS
    assert tuple(list_datasets()) == _args.DATASETS
    for name in AUGMENT_CHOICES:
        TrainConfig(augment=name)
    with pytest.raises(ValueError, match="augment='blur'"):
        TrainConfig(augment="blur")
    assert all(len(desc) < 100 and "\n" not in desc for desc in list_datasets().values())


def test_docs_list_every_dataset_and_digest():
    text = DOCS.read_text()
    for name in list_datasets():
        assert f"`{name}`" in text, name
    for files in SOURCES.values():
        for f in files:
            if f.digest is not None:
                assert f.digest[1] in text, f.name
    for name in AUGMENTATIONS:
        assert f"`{name}`" in text, name


def test_plain_pickles_admit_data_but_no_objects():
    blob = pickle.dumps({b"data": np.zeros((2, 3), np.uint8), "labels": [1, 2], "n": None,
                         "nested": {"x": (1.5, "y")}}, protocol=2)
    assert load_numpy_pickle(blob, plain=True)["labels"] == [1, 2]
    with pytest.raises(UnsafePickleError, match="arrays only"):
        load_numpy_pickle(blob)  # the default stays numpy arrays only
    with pytest.raises(UnsafePickleError, match="set"):
        load_numpy_pickle(pickle.dumps({"s": {1, 2}}, protocol=4), plain=True)
    with pytest.raises(UnsafePickleError, match="dtype object"):
        load_numpy_pickle(pickle.dumps({"a": np.array([None])}, protocol=2), plain=True)


def test_catalog_specs_are_consistent():
    for name in list_datasets():
        spec = get_dataset_spec(name)
        assert spec.classes is None or len(spec.classes) == spec.num_classes, name
        assert len(spec.in_shape) == 3 and spec.val_size > 0
        assert (spec.fetch is None) == (name in ("mnist-mini", "digits")), name
        if spec.fetch is not None and name != "mnist":
            assert SOURCES[name], name
    assert re.fullmatch(r"[a-z0-9-]+", "".join(list_datasets()).replace("-", "")) is not None
    assert math.isclose(DIGITS_TEST_SIZE / 1797, 0.2, abs_tol=0.01)
