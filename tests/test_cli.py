"""CLI smoke tests: real runs of a few steps on the bundled data."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from torchcaps.cli import main

SMALL = ["--batch-size", "16", "--no-progress", "--model-kwargs",
         '{"conv_channels": 32, "primary_types": 8}']


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["train", "--out", str(out), *SMALL, *extra])
    assert rc == 0
    return out


def test_train_evaluate(tmp_path, capsys):
    out = _train(tmp_path, "run", "--max-steps", "3")
    text = capsys.readouterr().out
    # the last lines say what the number is and how to get the full result
    assert "on the bundled 2,000-image MNIST test subset after 3 steps" in text
    assert "`torchcaps data mnist` and `--dataset mnist`" in text.splitlines()[-1]
    for f in ("best.safetensors", "best.json", "last.safetensors", "last.json", "metrics.jsonl",
              "summary.json"):
        assert (out / f).is_file(), f
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 3 and "val_accuracy" in rec[-1]
    assert rec[-1]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # where it ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["test_accuracy"] <= 1

    rc = main(["evaluate", str(out / "best.json"), "--json", str(tmp_path / "ev.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test accuracy:" in text and "true\\pred" in text
    figs = out / "eval-test"
    assert (figs / "reconstructions.png").stat().st_size > 1000
    assert (figs / "perturbation.png").stat().st_size > 1000
    assert f"wrote {figs / 'reconstructions.png'}" in text and f"wrote {tmp_path / 'ev.json'}" in text
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert len(ev["confusion"]) == 10


@pytest.mark.slow  # about 25 s: four evaluations of a trained run
def test_evaluations_write_into_folders_named_after_the_data(tmp_path, capsys):
    import numpy as np

    from torchcaps.data import load_dataset

    out = _train(tmp_path, "run", "--max-steps", "1")
    d = load_dataset("mnist-mini")
    np.savez(tmp_path / "digits.npz", images=d.test.images[-8:, 0].numpy(),
             labels=d.test.labels[-8:].numpy())
    ck = str(out / "best.json")
    assert main(["evaluate", ck]) == 0
    test_fig = out / "eval-test" / "reconstructions.png"
    before = test_fig.read_bytes()
    capsys.readouterr()
    assert main(["evaluate", ck, "--data", str(tmp_path / "digits.npz")]) == 0
    text = capsys.readouterr().out
    data_fig = out / "eval-digits" / "reconstructions.png"
    assert f"wrote {data_fig}" in text and "digits.npz accuracy:" in text
    assert data_fig.read_bytes() != before and test_fig.read_bytes() == before  # both kept
    assert main(["evaluate", ck, "--data", str(tmp_path / "digits.npz"), "--pad"]) == 0
    assert (out / "eval-digits-pad" / "reconstructions.png").is_file()
    # another dataset of the same shape: scikit-learn's digits resized to 28x28
    capsys.readouterr()
    assert main(["evaluate", ck, "--dataset", "digits+resize28", "--no-plots"]) == 0
    assert "digits+resize28 test accuracy:" in capsys.readouterr().out
    assert main(["evaluate", ck, "--dataset", "digits", "--no-plots"]) == 2
    assert "has images (1, 8, 8) and 10 classes; the model takes (1, 28, 28)" in \
        capsys.readouterr().err


def test_resume_continues_exactly(tmp_path):
    full = _train(tmp_path, "full", "--max-steps", "4")
    part = _train(tmp_path, "part", "--max-steps", "2")
    assert main(["train", "--out", str(part), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("model.", "optim.")):
            assert (a[k] == b[k]).all(), k
    assert json.loads((part / "last.json").read_text())["step"] == 4


def test_checkpoint_every_mid_epoch_resume(tmp_path):
    out = _train(tmp_path, "mid", "--max-steps", "2", "--checkpoint-every", "1")
    meta = json.loads((out / "last.json").read_text())
    assert meta["pos"] == 2 and meta["epoch"] == 0


def test_compile_matches_eager_and_keeps_plain_checkpoint_names(tmp_path):
    """--compile changes how the forward runs, not what is trained or saved: the same weights
    (to float tolerance) under the same checkpoint names, which a resume can load."""
    eager = _train(tmp_path, "eager", "--max-steps", "2")
    comp = _train(tmp_path, "comp", "--max-steps", "2", "--compile")
    a, b = load_file(eager / "last.safetensors"), load_file(comp / "last.safetensors")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        if k.startswith("model."):
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-4), k
    assert json.loads((comp / "last.json").read_text())["config"]["compile"] is True
    assert main(["train", "--out", str(comp), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert json.loads((comp / "last.json").read_text())["step"] == 3


def test_train_refuses_to_replace_an_earlier_run(tmp_path, capsys):
    out = _train(tmp_path, "run", "--max-steps", "1")
    manifest = (out / "last.json").read_bytes()
    assert main(["train", "--out", str(out), *SMALL, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a capsnet run at step 1 (last.json, best.json)" in err
    assert "--resume" in err and "another --out" in err and "--overwrite" in err
    assert (out / "last.json").read_bytes() == manifest  # nothing was touched
    assert main(["train", "--out", str(out), *SMALL, "--max-steps", "2", "--overwrite"]) == 0
    assert json.loads((out / "last.json").read_text())["step"] == 2
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_resume_applies_budget_flags_and_refuses_the_others(tmp_path, capsys):
    out = _train(tmp_path, "run", "--max-steps", "1", "--optimizer", "SGD",
                 "--optimizer-kwargs", '{"momentum": 0.9}', "--lr", "0.01")
    cfg = json.loads((out / "last.json").read_text())["config"]
    assert cfg["optimizer"].lower() == "sgd" and cfg["optimizer_kwargs"] == {"momentum": 0.9}
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.001", "--batch-size", "32",
                 "--optimizer", "adam", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--resume continues the run recorded in {out}; these flags cannot change mid-run: " in err
    for refused in ("--batch-size 32 (recorded: 16)", "--optimizer adam (recorded: ",
                    "--lr 0.001 (recorded: 0.01)"):
        assert refused in err, refused
    assert "--max-steps" not in err  # a budget flag may change
    assert json.loads((out / "last.json").read_text())["step"] == 1  # refused before running
    # flags equal to the recorded values are no change; budget flags are applied and reported
    assert main(["train", "--out", str(out), "--resume", "--batch-size", "16", "--optimizer", "sgd",
                 "--max-steps", "2", "--patience", "5", "--log-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "resume: applying --max-steps 2 (was 1)" in err
    assert "resume: applying --patience 5 (was not set)" in err
    assert "resume: applying --log-every 1 (was 0)" in err and "--batch-size" not in err
    meta = json.loads((out / "last.json").read_text())
    assert meta["step"] == 2 and meta["config"]["max_steps"] == 2 and meta["config"]["patience"] == 5
    assert meta["resumes"][-1]["changes"] == {"max_steps": [1, 2], "patience": [None, 5],
                                              "log_every": [0, 1]}


def test_argument_bounds_are_checked_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "never"
    for flag, value, message in [("--seed", str(2**70), "expected a seed in [0, 4294967295]"),
                                 ("--seed", "-1", "expected a seed"),
                                 ("--lr", "1e38", "expected a positive number <= 1000"),
                                 ("--lr", "nan", "expected a positive number <= 1000"),
                                 ("--max-shift", "65", "expected a shift in pixels in [0, 64]"),
                                 ("--lr-decay", "1.5", "expected a factor in (0, 1]")]:
        with pytest.raises(SystemExit):
            main(["train", "--out", str(out), flag, value])
        assert message in capsys.readouterr().err, flag
    assert main(["train", "--out", str(out), "--optimizer", "adamm"]) == 2
    assert "unknown optimizer 'adamm'; did you mean 'adam'" in capsys.readouterr().err
    assert not out.exists()


def test_help_and_argument_errors_import_no_torch():
    """The command parses before it imports torch: --help and usage errors are immediate."""
    code = """if True:
        import sys
        from torchcaps.cli import main
        for argv in (["--help"], ["train", "--help"], ["suite", "affnist", "--help"],
                     ["train", "--epochs", "0"], ["evaluate", "--suite", "affnist"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == (0 if "--help" in argv else 2), (argv, e.code)
        assert "torch" not in sys.modules, "torch was imported"
        import torchcaps
        assert "torch" not in sys.modules and "create_model" in dir(torchcaps)
        assert torchcaps.create_model("capsnet") is not None and "torch" in sys.modules
        from torchcaps import squash, routing
        assert callable(squash) and callable(routing.create_routing)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: torchcaps train" in proc.stdout and "--resume" in proc.stdout


def test_train_flags_default_to_the_train_config():
    """A flag's default is what TrainConfig does when the flag is absent."""
    import dataclasses

    from torchcaps.cli import _args, build_parser
    from torchcaps.cli.train import FIELDS, RESUMABLE
    from torchcaps.train import TrainConfig
    from torchcaps.train import config as train_config

    ns = _args.subcommands(build_parser())["train"].parse_args([])
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(FIELDS) <= set(fields) and set(RESUMABLE) <= set(FIELDS)
    for name in FIELDS:
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert getattr(ns, name) == default, name
    assert _args.SEED_LIMIT == train_config.SEED_LIMIT and _args.LR_LIMIT == train_config.LR_LIMIT


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "capsnet" in text and "8,215,568" in text and "dynamic" in text


def test_bad_arguments(tmp_path, capsys):
    assert main(["train", "--model", "capsnett", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'capsnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--lr", "abc"])
    assert "expected a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.json")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert main(["train", "--model-kwargs", '{"bogus": 1}', "--out", str(tmp_path / "y")]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the suites moved to `torchcaps suite`
        main(["evaluate", "--suite", "affnist", "--model", "capsnet", "--epochs", "4"])
    err = capsys.readouterr().err
    assert "torchcaps evaluate: error:" in err and "torchcaps suite affnist|multimnist" in err
    assert "unrecognized" not in err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchcaps.cli", "models"], capture_output=True,
                          text=True, check=True)
    assert "capsnet" in proc.stdout


def test_data_command_bundled(capsys):
    assert main(["data", "mnist-mini"]) == 0
    assert "verified" in capsys.readouterr().out


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--steps", "1",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "images/s" in text and "GFLOP/s" in text
    r = json.loads(out.read_text())
    for w in r["warnings"]:  # what makes the figures unrepresentative, said on stderr
        assert f"warning: {w}" in captured.err
    for key in ("train_images_per_s", "infer_images_per_s", "peak_memory_mb", "precision",
                "batch_size", "torch_version", "machine", "machine_limits",
                "train_fraction_of_matmul_rate", "routing_alone"):
        assert key in r, key
    assert r["train"]["flops_per_step"] > 0


def test_bench_bf16_runs(tmp_path):
    assert main(["bench", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--steps", "1",
                 "--precision", "bf16", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["precision"] == "bf16"


def test_evaluate_on_a_labelled_npz_file(tmp_path, capsys):
    import numpy as np

    from torchcaps.data import load_dataset

    out = _train(tmp_path, "run", "--max-steps", "1")
    d = load_dataset("mnist-mini")
    imgs, labels = d.test.images[:20, 0].numpy(), d.test.labels[:20].numpy()
    np.savez(tmp_path / "ok.npz", images=imgs, labels=labels)
    np.savez(tmp_path / "small.npz", images=imgs[:, 2:26, 2:26], labels=labels)
    np.savez(tmp_path / "big.npz", images=np.pad(imgs, ((0, 0), (2, 2), (2, 2))), labels=labels)
    np.savez(tmp_path / "float.npz", images=imgs.astype(np.float32), labels=labels)
    ck = str(out / "best.json")

    assert main(["evaluate", ck, "--data", str(tmp_path / "ok.npz"), "--json",
                 str(tmp_path / "ev.json"), "--out", str(tmp_path / "figs")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["total"] == 20 and ev["split"] == "ok.npz"
    for name in ("capsule_lengths.png", "routing_map.png", "reconstructions.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000, name
    capsys.readouterr()
    assert main(["evaluate", ck, "--data", str(tmp_path / "small.npz"), "--no-plots"]) == 2
    assert "24x24 but the model expects 28x28" in capsys.readouterr().err
    assert main(["evaluate", ck, "--data", str(tmp_path / "small.npz"), "--pad", "--no-plots"]) == 0
    assert main(["evaluate", ck, "--data", str(tmp_path / "big.npz"), "--resize", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["evaluate", ck, "--data", str(tmp_path / "float.npz"), "--no-plots"]) == 2
    assert "uint8" in capsys.readouterr().err
    assert main(["evaluate", ck, "--pad", "--no-plots"]) == 2
    assert "only with --data" in capsys.readouterr().err
