"""The affNIST and MultiMNIST suites end to end on the bundled data, with tiny models."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from torchcaps.cli import main
from torchcaps.data import random_shift
from torchcaps.evaluation.suites import (
    _pairs,
    build_affnist_data,
    format_suite_table,
    run_affnist_suite,
    run_multimnist_suite,
)
from torchcaps.train import CheckpointError

TINY_CAPS = {"conv_channels": 16, "primary_types": 4}
TINY_CNN = {"conv_channels": [8, 8, 4], "hidden": [16, 8]}
AFF_KEYS = {"suite", "model", "model_kwargs", "parameters", "dataset", "protocol", "stop_on",
            "target", "target_reached", "epochs", "steps", "train_minutes", "wall_minutes",
            "translated_test_accuracy", "affine_accuracy", "val_accuracy", "sizes", "seeds",
            "history", "command", "machine"}
MM_KEYS = {"suite", "model", "model_kwargs", "parameters", "dataset", "epochs", "steps",
           "train_minutes", "wall_minutes", "top2_accuracy", "error", "at_least_one", "sizes",
           "seeds", "history", "figure", "command", "machine", "paper_difference"}


def _affnist(tmp_path, **kw):
    args = dict(model_name="capsnet", data="mnist-mini", max_epochs=1, batch_size=16,
                out_dir=tmp_path / "aff", model_kwargs=TINY_CAPS, max_steps=2, threads=1,
                affine_size=64)
    args.update(kw)
    return run_affnist_suite(**args)


def test_affnist_suite_report_and_resume(tmp_path):
    r = _affnist(tmp_path)
    assert AFF_KEYS <= set(r)
    assert r["steps"] == 2 and r["target_reached"] is False
    assert r["sizes"] == {"train": 7000, "val": 1000, "translated_test": 2000, "affine_test": 64}
    assert 0 <= r["translated_test_accuracy"] <= 1 and 0 <= r["affine_accuracy"] <= 1
    assert r["model_kwargs"]["in_shape"] == [1, 40, 40]
    h = r["history"][-1]
    assert h["step"] == 2 and {"val_accuracy", "translated_test_accuracy"} <= set(h)
    saved = json.loads((tmp_path / "aff" / "report.json").read_text())
    assert saved["translated_test_accuracy"] == r["translated_test_accuracy"]
    assert (tmp_path / "aff" / "last.safetensors").is_file()
    # resume from the checkpoint with a larger budget: training continues where it stopped
    r2 = _affnist(tmp_path, max_steps=3, resume=True)
    assert r2["steps"] == 3 and len(r2["history"]) == 2
    with pytest.raises(CheckpointError, match="batch_size=16"):
        _affnist(tmp_path, batch_size=8, max_steps=4, resume=True)


@pytest.mark.parametrize("stop_on", ["test", "val"])
def test_affnist_stops_at_target_and_stays_stopped(tmp_path, stop_on):
    r = _affnist(tmp_path, target=0.01, stop_on=stop_on)
    assert r["target_reached"] and r["reached_at"]["step"] == 2 and r["stop_on"] == stop_on
    # a resumed run with more budget does not train past the stopping point
    r2 = _affnist(tmp_path, target=0.01, stop_on=stop_on, max_steps=5, resume=True)
    assert r2["steps"] == 2 and r2["target_reached"]


def test_affnist_data_geometry_and_determinism():
    splits, affine = build_affnist_data("mnist-mini", affine_size=40)
    _, affine2 = build_affnist_data("mnist-mini", affine_size=40)
    _, affine3 = build_affnist_data("mnist-mini", affine_size=40, test_seed=5)
    assert torch.equal(affine.images, affine2.images) and torch.equal(affine.labels, affine2.labels)
    assert not torch.equal(affine.images, affine3.images)
    assert affine.images.shape == (40, 1, 40, 40) and affine.images.dtype == torch.uint8
    from torchcaps.data import load_dataset

    base = load_dataset("mnist-mini")
    for split, src in ((splits.test, base.test), (splits.val, base.val), (splits.train, base.train)):
        assert split.images.shape[1:] == (1, 40, 40)
        # every digit lies wholly inside the canvas: all its ink is kept
        assert torch.equal(split.images.flatten(1).long().sum(1), src.images.flatten(1).long().sum(1))
        assert torch.equal(split.labels, src.labels)
    # translated test digits sit at different places, not all centred
    rows = (splits.test.images[:200, 0] > 0).any(2).float().argmax(1)  # first inked row
    assert rows.unique().numel() > 5
    # the training batches: centred digits shifted by up to 6 px keep every pixel of ink
    x, _ = splits.train.batch(slice(0, 64))
    g = torch.Generator().manual_seed(0)
    shifted = random_shift(x, 6, g)
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not torch.equal(shifted, x)


def test_multimnist_suite_capsnet_and_cnn(tmp_path):
    r = run_multimnist_suite("capsnet", data="mnist-mini", max_epochs=1, batch_size=16,
                             out_dir=tmp_path / "multimnist-capsnet", model_kwargs=TINY_CAPS,
                             max_steps=2,
                             threads=1, test_pairs=64, val_pairs=32, train_pairs=1000)
    assert MM_KEYS <= set(r)
    assert r["steps"] == 2 and r["error"] == pytest.approx(1 - r["top2_accuracy"])
    assert r["model_kwargs"]["in_shape"] == [1, 36, 36]
    assert "reconstruction" in r["loss"]
    png = tmp_path / "multimnist-capsnet" / "multimnist_reconstructions.png"
    assert r["figure"] == str(png) and png.stat().st_size > 1000
    saved = json.loads((tmp_path / "multimnist-capsnet" / "report.json").read_text())
    assert saved["error"] == r["error"]
    c = run_multimnist_suite("cnn_baseline", data="mnist-mini", max_epochs=1, batch_size=16,
                             out_dir=tmp_path / "multimnist-cnn_baseline", model_kwargs=TINY_CNN,
                             max_steps=2,
                             threads=1, test_pairs=64, val_pairs=32)
    assert c["model_kwargs"]["multi_label"] is True and c["figure"] is None
    assert 0 <= c["top2_accuracy"] <= 1 and "BCE" in c["loss"]
    table = format_suite_table([r, c])
    assert "multimnist" in table and "cnn_baseline" in table
    # benchmarks/robustness.py collects the reports; make_tables renders the README table
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import make_tables
        import robustness
    finally:
        sys.path.pop(0)
    out = tmp_path / "robustness.json"
    assert robustness.main(["--collect-only", "--suites", "multimnist", "--dataset", "mnist-mini",
                            "--runs-dir", str(tmp_path), "--json", str(out)]) == 0
    z = json.loads(out.read_text())
    assert [row["model"] for row in z["rows"]] == ["capsnet", "cnn_baseline"]
    assert {"commands", "machine"} <= set(z)
    md = make_tables.robustness_table(out)
    assert (f"| multimnist | capsnet | {r['parameters']:,} | - | - | {100 * r['error']:.2f}% | "
            "5.2% error |") in md
    assert "robustness.py --suites multimnist" in md and "--collect-only" not in md


def test_multimnist_pairs_deterministic():
    from torchcaps.data import load_dataset

    split = load_dataset("mnist-mini").test
    a, b = _pairs(split, 20, 3), _pairs(split, 20, 3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y, singles = a
    assert x.shape == (20, 1, 36, 36) and singles.shape == (20, 2, 1, 36, 36)
    assert bool((y[:, 0] != y[:, 1]).all())


def test_cli_suite_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["suite", "multimnist", "--dataset", "mnist-mini", "--model", "cnn_baseline",
            "--model-kwargs", json.dumps(TINY_CNN), "--max-steps", "2", "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--test-pairs", "32", "--out", str(out)]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "top-2" in text and "cnn_baseline" in text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["suite"] == "multimnist" and rep["command"].startswith("torchcaps suite multimnist")
    assert "--test-pairs 32" in rep["command"] and "--json" not in rep["command"]
    # the same command again would replace the run: refused, naming the choices
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a cnn_baseline run" in err and "--resume" in err and "--overwrite" in err
    # evaluate no longer runs suites: one error pointing to the new command
    with pytest.raises(SystemExit):
        main(["evaluate", "--suite", "multimnist", "--dataset", "mnist-mini", "--epochs", "1"])
    assert "torchcaps suite affnist|multimnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate"])
    assert "required: checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # each suite has only its own options
        main(["suite", "multimnist", "--target", "0.9"])
    assert "unrecognized arguments: --target" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(out / "last.json"), "--model", "capsnet"])
    assert "unrecognized arguments: --model" in capsys.readouterr().err


def test_multimnist_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    def run(out, steps, resume=False, batch_size=16):
        return run_multimnist_suite("cnn_baseline", data="mnist-mini", max_epochs=1,
                                    batch_size=batch_size, out_dir=tmp_path / out,
                                    model_kwargs=TINY_CNN, max_steps=steps, threads=1,
                                    test_pairs=32, val_pairs=32, train_pairs=200, resume=resume)

    straight = run("a", 3)
    run("b", 2)
    resumed = run("b", 3, resume=True)
    assert resumed["steps"] == straight["steps"] == 3 and len(resumed["history"]) == 2
    wa, wb = (load_file(tmp_path / d / "last.safetensors") for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.startswith("model."))
    with pytest.raises(CheckpointError, match="batch_size=16"):
        run("b", 4, resume=True, batch_size=8)


def test_robustness_match_target_and_per_model_epochs(tmp_path):
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import robustness
    finally:
        sys.path.pop(0)

    def parse(extra):
        ns = argparse.Namespace(
            runs_dir=str(tmp_path), dataset="mnist", affnist_epochs=4, multimnist_epochs=3,
            target=0.992, stop_on="test", max_steps=None, batch_size=128, threads=None,
            precision="fp32", device=None, model_kwargs={}, affine_size=None, train_pairs=None,
            test_pairs=None, match_target=None, epochs_for={})
        for k, v in extra.items():
            setattr(ns, k, v)
        return ns

    a = parse({"match_target": "capsnet", "epochs_for": {"cnn_baseline": 12}})
    with pytest.raises(SystemExit, match="no finished run"):
        robustness.suite_command("affnist", "cnn_baseline", a)
    (tmp_path / "affnist-capsnet").mkdir()
    (tmp_path / "affnist-capsnet" / "report.json").write_text(
        json.dumps({"translated_test_accuracy": 0.9896}))
    caps = robustness.suite_command("affnist", "capsnet", a)
    cnn = robustness.suite_command("affnist", "cnn_baseline", a)
    assert caps[caps.index("--target") + 1] == "0.992" and caps[caps.index("--epochs") + 1] == "4"
    assert cnn[cnn.index("--target") + 1] == "0.9896" and cnn[cnn.index("--epochs") + 1] == "12"
    done = {"suite": "affnist", "model": "cnn_baseline", "max_epochs": 12, "max_steps": None,
            "target": 0.9896, "dataset": "mnist", "batch_size": 128}
    assert robustness._same_budget(done, a)
    assert not robustness._same_budget({**done, "target": 0.992}, a)  # rerun (resumed)
    mm = robustness.suite_command("multimnist", "cnn_baseline", a)
    assert mm[mm.index("--epochs") + 1] == "3" and "--target" not in mm
    with pytest.raises(SystemExit):
        robustness.main(["--epochs-for", "cnn_baseline=0", "--collect-only"])


def test_cli_suite_seeds_report_mean_and_std_and_continue(tmp_path, capsys):
    out = tmp_path / "seeds"
    args = ["suite", "multimnist", "--dataset", "mnist-mini", "--model", "cnn_baseline",
            "--model-kwargs", json.dumps(TINY_CNN), "--max-steps", "1", "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--test-pairs", "32", "--out", str(out),
            "--seeds", "0", "1"]
    assert main(args) == 0
    assert "error:" in capsys.readouterr().out
    rep = json.loads((out / "seeds.json").read_text())
    errors = [r["report"]["error"] for r in rep["runs"]]
    assert [r["seed"] for r in rep["runs"]] == [0, 1]
    assert [r["report"]["seeds"]["seed"] for r in rep["runs"]] == [0, 1]
    assert rep["mean"]["error"] == pytest.approx(sum(errors) / 2)
    assert rep["std"]["error"] == pytest.approx(abs(errors[0] - errors[1]) / 2 ** 0.5)
    assert "--seeds 0 1" in rep["command"]
    # again: both seeds are finished and read back, nothing is trained
    mtime = (out / "seed-1" / "report.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "finished, skipped" in capsys.readouterr().err
    assert (out / "seed-1" / "report.json").stat().st_mtime_ns == mtime
    assert main([*args, "--resume"]) == 2
    assert "--seeds skips finished seeds" in capsys.readouterr().err
