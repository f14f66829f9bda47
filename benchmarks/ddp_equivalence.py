"""A 2-rank torchrun run against a 1-process run with the same global batch and seed.

    python benchmarks/ddp_equivalence.py --steps 20 --batch-size 32 \
        --json benchmarks/results/ddp_equivalence.json

Trains a small capsnet on the bundled MNIST subset twice (gloo on CPU for the 2-rank run) and
prints, per step count, the largest absolute weight difference and the validation accuracy of
each run. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from torchcaps.bench import machine_info
from torchcaps.train import load_checkpoint


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    common = ["train", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--threads", "1", "--no-progress", "--model-kwargs",
              '{"conv_channels": 32, "primary_types": 8}']
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp, "one"), Path(tmp, "two")
        _run([sys.executable, "-m", "torchcaps", *common, "--out", str(one)])
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              "2", "-m", "torchcaps", *common, "--out", str(two)])
        (ma, ta), (mb, tb) = load_checkpoint(one / "last"), load_checkpoint(two / "last")
    weights = [k for k in ta if k.startswith("model.")]
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in weights)
    scale = max(float(ta[k].abs().max()) for k in weights)
    r = {"steps": a.steps, "global_batch": a.batch_size, "ranks": [1, 2],
         "max_abs_weight_difference": diff, "max_abs_weight": scale,
         "val_accuracy": [ma["history"][-1]["val_accuracy"], mb["history"][-1]["val_accuracy"]],
         "train_loss": [ma["history"][-1]["train_loss"], mb["history"][-1]["train_loss"]],
         "command": f"python benchmarks/ddp_equivalence.py --steps {a.steps} "
                    f"--batch-size {a.batch_size}",
         "machine": machine_info()}
    print(json.dumps({k: v for k, v in r.items() if k != "machine"}))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
