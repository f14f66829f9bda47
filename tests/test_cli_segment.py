"""``torchcaps segment``: train, resume, evaluate and predict from the command line, and the
errors a user meets first."""

import json

import numpy as np
import pytest

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from torchcaps.cli import main  # noqa: E402

TINY = ["--model", "unet3d", "--model-kwargs", '{"channels": [4, 8], "num_res_units": 0}',
        "--dataset", "shapes", "--patch", "16", "16", "16", "--pool", "16",
        "--samples-per-epoch", "4", "--batch-size", "2", "--no-progress", "--threads", "1",
        "--lr", "1e-2"]


def _train(tmp_path, *extra):
    return main(["segment", "train", *TINY, "--out", str(tmp_path / "run"), *extra])


def test_train_resume_evaluate_predict(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1", "--json", str(tmp_path / "s.json")) == 0
    out = capsys.readouterr().out
    assert "test mean foreground Dice" in out and "ball" in out and "HD95" in out
    assert json.loads((tmp_path / "s.json").read_text())["class_names"][1] == "ball"
    assert _train(tmp_path, "--epochs", "2", "--resume") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4

    assert main(["segment", "evaluate", str(tmp_path / "run" / "best"), "--out",
                 str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "overlay-0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 <= metrics["mean_dice"] <= 1 and "dice_cube" in metrics

    volume = np.random.default_rng(0).random((16, 24, 16)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "in.nii.gz"))
    assert main(["segment", "predict", str(tmp_path / "run" / "best"), str(tmp_path / "in.nii.gz"),
                 "--output", str(tmp_path / "pred.nii.gz"), "--png", str(tmp_path / "p.png")]) == 0
    pred = nib.load(str(tmp_path / "pred.nii.gz"))
    assert pred.shape == (16, 24, 16) and np.allclose(pred.affine, affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert (tmp_path / "p.png").is_file()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    assert _train(tmp_path, "--epochs", "1") == 2
    assert "already holds" in capsys.readouterr().err


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    assert _train(tmp_path, "--epochs", "2", "--resume", "--pool", "8") == 2
    assert "cannot change mid-run: --pool" in capsys.readouterr().err


def test_classifier_is_refused_with_the_segmentation_models_named(tmp_path, capsys):
    assert main(["segment", "train", "--model", "capsnet", "--dataset", "shapes",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "capsnet is a classifier" in err and "ucaps3d" in err


def test_predict_refuses_a_2d_image_and_a_non_nifti_file(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    assert main(["segment", "predict", str(tmp_path / "run" / "best"), str(tmp_path / "flat.nii"),
                 "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "2D" in capsys.readouterr().err
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume at all")
    assert main(["segment", "predict", str(tmp_path / "run" / "best"), str(tmp_path / "junk.nii.gz"),
                 "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "junk.nii.gz" in capsys.readouterr().err


def test_nifti_folder_trains(tmp_path, capsys):
    root = tmp_path / "task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        labels = np.zeros((16, 16, 16), np.uint8)
        labels[4:10, 4:10, 4:10] = 1
        image = labels * 1.0 + 0.2 * rng.standard_normal(labels.shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
                 str(root / "imagesTr" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "labelsTr" / f"case{i}.nii.gz"))
    args = [a if a != "shapes" else f"nifti:{root}" for a in TINY]
    assert main(["segment", "train", *args, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    assert "class 1" in capsys.readouterr().out


def test_nifti_folder_with_mismatched_label_map_names_the_file(tmp_path, capsys):
    root = tmp_path / "task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)),
                 str(root / "imagesTr" / f"c{i}.nii.gz"))
        shape = (16, 16, 12) if i == 1 else (16, 16, 16)
        nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4)),
                 str(root / "labelsTr" / f"c{i}.nii.gz"))
    args = [a if a != "shapes" else f"nifti:{root}" for a in TINY]
    assert main(["segment", "train", *args, "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "c1.nii.gz" in err and "shape" in err
