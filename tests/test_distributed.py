"""Distributed data parallel training on torchrun: 2 gloo processes on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchcaps.train import load_checkpoint

SMALL = json.dumps({"conv_channels": 16, "primary_types": 4})
ARGS = ["--batch-size", "32", "--threads", "1", "--no-progress", "--model-kwargs", SMALL,
        "--lr-decay", "1.0"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def _torchrun(*args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "torchcaps", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, **kw)


def _single(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchcaps", "train", *args],
                          capture_output=True, text=True)


def _weights(run: Path) -> dict:
    _, tensors = load_checkpoint(run / "last")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x 16 images per step == 1 process x 32 images per step, to round-off."""
    one = _single("--out", str(tmp_path / "one"), "--max-steps", "6", *ARGS)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("--out", str(tmp_path / "two"), "--max-steps", "6", *ARGS)
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # Adam steps of 1e-3: round-off in the gradient mean only
    meta = load_checkpoint(tmp_path / "two" / "last")[0]
    assert meta["world_size"] == 2 and meta["history"][-1]["ranks"] == 2
    # logs and checkpoints from rank 0 only: one epoch line, one summary
    assert out.count("epoch 1 step 6:") == 1
    # a distributed checkpoint resumes in one process (and continues the same schedule)
    more = _single("--out", str(tmp_path / "two"), "--resume", "--max-steps", "8",
                   "--no-progress")
    assert more.returncode == 0, more.stderr[-3000:]
    assert load_checkpoint(tmp_path / "two" / "last")[0]["step"] == 8


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_killed_rank_ends_the_job_and_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    job = _torchrun("--out", str(run), "--max-steps", "40", "--checkpoint-every", "1", *ARGS)
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and job.poll() is None and killed is None:
        try:
            step = json.loads((run / "last.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        workers = [p for p in _children(job.pid)
                   if b"torchcaps" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if step >= 3 and len(workers) == 2:
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)  # one rank dies; the other must not hang
        time.sleep(0.05)
    out, _ = job.communicate(timeout=240)
    assert killed is not None and job.returncode != 0
    assert "FAILED" in out or "failed" in out, out[-3000:]
    step = load_checkpoint(run / "last")[0]["step"]
    assert 3 <= step < 40
    again = _torchrun("--out", str(run), "--resume", "--max-steps", "12", "--no-progress")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"resuming {run / 'last'}" in out
    assert load_checkpoint(run / "last")[0]["step"] == max(12, step)
