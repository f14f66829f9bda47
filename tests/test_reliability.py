"""Crash safety, non-finite values, locking, I/O failures and determinism of training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from torchcaps.cli import main
from torchcaps.train import (
    ClassificationTask,
    NonFiniteError,
    RunLock,
    TrainConfig,
    Trainer,
    load_checkpoint,
)

SMALL = {"conv_channels": 32, "primary_types": 8}
# one thread everywhere: bitwise equality needs the same reduction order in every process
CLI_SMALL = ["--batch-size", "16", "--no-progress", "--threads", "1", "--model-kwargs", json.dumps(SMALL)]


def _cfg(tmp_path, **kw):
    return TrainConfig(out=str(tmp_path / "run"), model_kwargs=SMALL, batch_size=16,
                       progress=False, **kw)


def _weights(path):
    return {k: v for k, v in load_file(path).items() if k.startswith(("model.", "optim."))}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    steps = "30"
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), "--max-steps", steps, *CLI_SMALL]) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torchcaps.cli", "train", "--out", str(run), "--max-steps", steps,
           "--checkpoint-every", "1", *CLI_SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads((run / "last.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 5:
            proc.send_signal(signal.SIGKILL)  # a real signal, not a simulated one
            killed_at = step
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    meta, _ = load_checkpoint(run / "last")  # whatever survived is a consistent checkpoint
    assert 5 <= meta["step"] < 30 and (run / ".lock").exists()  # stale lock of the dead process

    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    a, b = _weights(ref / "last.safetensors"), _weights(run / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((run / "last.json").read_text())["step"] == 30
    # the interrupted epoch's record covers all 30 steps, not only those after the resume
    ref_rec = json.loads((ref / "last.json").read_text())["history"][-1]
    rec = json.loads((run / "last.json").read_text())["history"][-1]
    assert rec["train_loss"] == ref_rec["train_loss"]
    assert rec["train_accuracy"] == ref_rec["train_accuracy"]


def _poison_loss_at(trainer, step):
    original = trainer.module.loss

    def loss(out, x, y):
        total, parts = original(out, x, y)
        if trainer.step + 1 == step:
            total = total * float("nan")
        return total, parts

    trainer.module.loss = loss


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    t = Trainer(ClassificationTask(), _cfg(tmp_path, max_steps=6, checkpoint_every=1))
    _poison_loss_at(t, 4)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 4 .*last.json"):
        t.fit()
    meta, _ = load_checkpoint(tmp_path / "run" / "last")
    assert meta["step"] == 3  # the last good state, loadable
    assert not (tmp_path / "run" / ".lock").exists()


def test_nan_gradient_detected(tmp_path):
    t = Trainer(ClassificationTask(), _cfg(tmp_path, max_steps=3))
    p = next(t.module.parameters())
    p.register_hook(lambda g: g * float("inf") if t.step == 1 else g)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm .* at step 2"):
        t.fit()


def test_skip_nonfinite_counts_batches(tmp_path):
    t = Trainer(ClassificationTask(), _cfg(tmp_path, max_steps=5, nonfinite="skip"))
    _poison_loss_at(t, 2)
    summary = t.fit()
    assert summary["skipped_batches"] == 1 and summary["steps"] == 5
    assert all(torch.isfinite(p).all() for p in t.module.parameters())


def test_lock_refuses_a_directory_in_use(tmp_path):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        other = subprocess.run(
            [sys.executable, "-m", "torchcaps.cli", "train", "--out", str(tmp_path / "run"),
             "--max-steps", "1", *CLI_SMALL], capture_output=True, text=True)
        assert other.returncode == 2
        assert "is in use by a running training (pid" in other.stderr
    # a stale lock (dead pid) is taken over
    (tmp_path / "run" / ".lock").write_text("999999999\n")
    with RunLock(tmp_path / "run"):
        pass


def test_unwritable_output_directory_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "run"), "--max-steps", "1", *CLI_SMALL]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "file" in err


def test_deterministic_runs_give_identical_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", "--out", str(out), "--max-steps", "3", "--deterministic",
                     *CLI_SMALL]) == 0
        rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        for r in rec:
            r.pop("train_seconds")
            r.pop("train_images_per_s")
        runs.append(rec)
    assert runs[0] == runs[1]
    torch.use_deterministic_algorithms(False)


def test_bad_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device"):
        Trainer(ClassificationTask(), _cfg(tmp_path, device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(ClassificationTask(), _cfg(tmp_path, device="cuda"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="nonfinite='sometimes'"):
        TrainConfig(nonfinite="sometimes")
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX")
def test_cli_nonfinite_flag_parses():
    with pytest.raises(SystemExit):
        main(["train", "--nonfinite", "maybe"])


def test_bf16_autocast_training_runs(tmp_path):
    summary = Trainer(ClassificationTask(), _cfg(tmp_path, max_steps=2, precision="bf16",
                                                   force_precision=True)).fit()
    assert summary["steps"] == 2 and 0 <= summary["test_accuracy"] <= 1
