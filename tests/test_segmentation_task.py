"""Segmentation on the engine: metrics against hand-computed values, the patch pool,
whole-volume inference, the task's selection, resume and errors."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("monai")

from torchcaps.data.segmentation import (  # noqa: E402
    SegmentationData,
    SegmentationItem,
    fraction_count,
    load_segmentation_data,
    make_shapes,
    patch_pool,
)
from torchcaps.evaluation.segmentation import (  # noqa: E402
    evaluate_segmentation,
    predict_volume,
    segmentation_metrics,
)
from torchcaps.models import (  # noqa: E402
    SegmentationModel,
    SegmentationOutput,
    list_models,
    model_task,
    register_model,
)
from torchcaps.train import (  # noqa: E402
    SegmentationSettings,
    TrainConfig,
    Trainer,
    train_segmentation,
)
from torchcaps.train.segmentation import SegmentationTask  # noqa: E402


class TinySeg(SegmentationModel):
    """A two-layer conv net: small enough for the engine tests."""

    def __init__(self, in_channels=1, num_classes=2, spatial_dims=3):
        super().__init__(in_channels, num_classes, spatial_dims, size_multiple=2)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.net = nn.Sequential(conv(in_channels, 6, 3, padding=1), nn.ReLU(),
                                 conv(6, num_classes, 1))

    def forward(self, images, labels=None):
        self.check_input(images, labels)
        return SegmentationOutput(self.net(images))

    def loss(self, out, images, labels):
        ce = nn.functional.cross_entropy(out.logits, labels)
        return ce, {"ce": ce.detach()}


if "tiny_seg_test" not in list_models(task=None):
    @register_model(task="segmentation")
    def tiny_seg_test(in_channels=1, num_classes=2, spatial_dims=3):
        return TinySeg(in_channels, num_classes, spatial_dims)


# ---------------------------------------------------------------- metrics
def test_dice_matches_hand_computed_values():
    truth = torch.tensor([[0, 1, 1, 0],
                          [0, 1, 1, 0],
                          [2, 2, 0, 0]])
    pred = torch.tensor([[0, 1, 0, 0],
                         [0, 1, 1, 1],
                         [2, 0, 0, 0]])
    m = segmentation_metrics(pred, truth, 3, hausdorff=False)
    # class 1: |A|=4 (truth), |B|=4 (pred), overlap 3 -> 6/8; class 2: |A|=2, |B|=1, overlap 1
    assert m["dice"][1] == pytest.approx(6 / 8)
    assert m["dice"][2] == pytest.approx(2 / 3)
    # background: truth 6 voxels, pred 7, overlap 5
    assert m["dice"][0] == pytest.approx(10 / 13)
    assert m["mean_dice"] == pytest.approx((6 / 8 + 2 / 3) / 2)


def test_hausdorff_matches_hand_computed_distance():
    truth = torch.zeros(8, 8, dtype=torch.long)
    pred = torch.zeros(8, 8, dtype=torch.long)
    truth[1, 1] = 1
    pred[1, 4] = 1  # three voxels away along one axis
    m = segmentation_metrics(pred, truth, 2)
    assert m["hd95"][1] == pytest.approx(3.0)
    m = segmentation_metrics(pred, truth, 2, spacing=(2.0, 2.0))
    assert m["hd95"][1] == pytest.approx(6.0)  # in millimetres


def test_class_absent_from_both_maps_has_no_dice():
    truth = torch.zeros(4, 4, dtype=torch.long)
    truth[0, 0] = 1
    m = segmentation_metrics(truth.clone(), truth, 3, hausdorff=False)
    assert m["dice"][1] == pytest.approx(1.0)
    assert math.isnan(m["dice"][2])
    assert m["mean_dice"] == pytest.approx(1.0)  # NaN classes are left out of the mean


def test_metrics_refuse_maps_of_other_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_metrics(torch.zeros(3, 3), torch.zeros(3, 4), 2)


# ---------------------------------------------------------------- patch pool
def test_patch_pool_is_seeded_balanced_and_fits():
    items = make_shapes(2, size=24, seed=0)
    x, y = patch_pool(items, (8, 8, 8), 30, seed=3, num_classes=3)
    assert x.shape == (30, 1, 8, 8, 8) and y.shape == (30, 8, 8, 8)
    x2, y2 = patch_pool(items, (8, 8, 8), 30, seed=3, num_classes=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = patch_pool(items, (8, 8, 8), 30, seed=4, num_classes=3)
    assert not torch.equal(x, x3)
    centre = y[:, 4, 4, 4]
    counts = torch.bincount(centre, minlength=3)
    assert counts.min() >= 5  # centre voxels of every class, not mostly background


def test_patch_pool_2d_takes_slices():
    items = make_shapes(1, size=16, seed=0)
    x, y = patch_pool(items, (8, 8), 6, seed=0, num_classes=3)
    assert x.shape == (6, 1, 8, 8) and y.shape == (6, 8, 8)


def test_patch_larger_than_volume_is_refused():
    items = make_shapes(1, size=16, seed=0)
    with pytest.raises(ValueError, match="larger than the volume"):
        patch_pool(items, (32, 32, 32), 4, seed=0, num_classes=3)


def test_fraction_count():
    assert fraction_count(512, 0.05) == 25
    assert fraction_count(512, 1.0) == 512
    assert fraction_count(10, 0.01) == 1
    with pytest.raises(ValueError):
        fraction_count(10, 0.0)


# ---------------------------------------------------------------- inference
def test_predict_volume_2d_model_runs_slice_by_slice():
    torch.manual_seed(0)
    model = TinySeg(spatial_dims=2, num_classes=3)
    image = torch.randn(1, 5, 12, 10)
    probs = predict_volume(model, image, (8, 8), overlap=0.25)
    assert probs.shape == (3, 5, 12, 10)
    assert torch.allclose(probs.sum(0), torch.ones(5, 12, 10), atol=1e-5)
    # the same slice through the model directly (one window covering it) agrees
    direct = torch.softmax(model(image[:, 2:3].permute(1, 0, 2, 3)[:, :, :8, :8]).logits, 1)
    full = predict_volume(model, image[:, 2:3, :8, :8], (8, 8))
    assert torch.allclose(full[:, 0], direct[0], atol=1e-5)


def test_evaluate_segmentation_perfect_model_scores_one():
    class Oracle(nn.Module):
        def __init__(self, labels):
            super().__init__()
            self.labels = labels
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            logits = x.repeat(1, 3, 1, 1, 1) * 0
            for k in range(3):
                logits[:, k] = (x[:, 0].round() == k).float() * 10
            return SegmentationOutput(logits)

    labels = torch.zeros(8, 8, 8, dtype=torch.long)
    labels[2:5, 2:5, 2:5] = 1
    labels[6:, 6:, 6:] = 2
    item = SegmentationItem(labels.float()[None], labels)
    res = evaluate_segmentation(Oracle(labels), [item], 3, (8, 8, 8))
    assert res["dice"] == pytest.approx([1.0, 1.0, 1.0])
    assert res["hd95"][1] == pytest.approx(0.0)


# ---------------------------------------------------------------- the task
def _cfg(tmp_path, **kw):
    base = dict(model="tiny_seg_test", dataset="shapes", epochs=2, batch_size=4, lr=1e-2,
                augment="none", out=str(tmp_path / "run"), progress=False)
    return TrainConfig(**{**base, **kw})


def _settings(**kw):
    return SegmentationSettings(**{"patch": (16, 16, 16), "pool": 24, "samples_per_epoch": 8,
                                   "hausdorff": False, **kw})


def test_segmentation_trains_selects_and_reports(tmp_path):
    summary = train_segmentation(_cfg(tmp_path), _settings())
    assert summary["task"] == "SegmentationTask" and summary["steps"] == 4
    assert summary["class_names"] == ["background", "ball", "cube"]
    assert 0 <= summary["test"]["mean_dice"] <= 1
    assert "val_mean_dice" in summary["best"]
    assert (tmp_path / "run" / "best.json").is_file()
    assert model_task("tiny_seg_test") == "segmentation"


def test_fraction_takes_a_nested_subset_of_the_pool(tmp_path):
    task = SegmentationTask(_settings(fraction=0.25))
    task.setup(_cfg(tmp_path), torch.device("cpu"))
    full = SegmentationTask(_settings())
    full.setup(_cfg(tmp_path), torch.device("cpu"))
    assert len(task.pool_x) == 6 and len(full.pool_x) == 24
    assert torch.equal(task.pool_x, full.pool_x[:6])


def test_batches_are_a_pure_function_of_the_generator(tmp_path):
    task = SegmentationTask(_settings())
    task.setup(_cfg(tmp_path), torch.device("cpu"))
    a = task.batch(0, 0, torch.Generator().manual_seed(5))
    b = task.batch(0, 0, torch.Generator().manual_seed(5))
    c = task.batch(0, 0, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_resume_continues_exactly(tmp_path):
    full = train_segmentation(_cfg(tmp_path, epochs=2, out=str(tmp_path / "a")), _settings())
    train_segmentation(_cfg(tmp_path, epochs=1, out=str(tmp_path / "b")), _settings())
    cfg = _cfg(tmp_path, epochs=2, out=str(tmp_path / "b"))
    resumed = train_segmentation(cfg, _settings(), resume=True)
    assert resumed["best"] == full["best"]
    assert resumed["test"] == full["test"]


def test_resume_with_other_settings_is_refused(tmp_path):
    train_segmentation(_cfg(tmp_path, epochs=1), _settings())
    trainer = Trainer(SegmentationTask(_settings(fraction=0.5)), _cfg(tmp_path, epochs=2))
    with pytest.raises(Exception, match="segmentation settings"):
        trainer.resume()


def test_classifier_and_wrong_patch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="classification model"):
        train_segmentation(_cfg(tmp_path, model="capsnet"), _settings())
    with pytest.raises(ValueError, match="3 sizes"):
        train_segmentation(_cfg(tmp_path), _settings(patch=(16, 16)))
    with pytest.raises(ValueError, match="multiples of 2"):
        train_segmentation(_cfg(tmp_path), _settings(patch=(15, 16, 16)))
    with pytest.raises(ValueError, match="augment"):
        train_segmentation(_cfg(tmp_path, augment="shift"), _settings())


def test_invalid_settings_name_the_problem():
    with pytest.raises(ValueError, match="fraction"):
        SegmentationSettings(fraction=1.5)
    with pytest.raises(ValueError, match="patch"):
        SegmentationSettings(patch=(16, 0, 16))


def test_model_contract_errors():
    model = TinySeg(num_classes=3)
    with pytest.raises(ValueError, match="3D model"):
        model(torch.zeros(1, 1, 8, 8))  # a 2D image given to a 3D model
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.zeros(1, 1, 7, 8, 8))
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="shape of the images"):
        model(x, torch.zeros(1, 8, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        model(x, torch.full((1, 8, 8, 8), 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        model(x, torch.zeros(1, 8, 8, 8))


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="unknown segmentation dataset"):
        load_segmentation_data("mnist")


def test_items_check_their_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        SegmentationItem(torch.zeros(1, 4, 4, 4), torch.zeros(4, 4, 5, dtype=torch.long))


def test_segmentation_data_split_names():
    items = make_shapes(1, size=8)
    d = SegmentationData("x", 3, ("a", "b", "c"), items, items, items)
    assert d.in_channels == 1 and d.split("val") is items
    with pytest.raises(ValueError):
        d.split("dev")
