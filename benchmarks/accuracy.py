"""Train a model with `torchcaps train` and record its test accuracy and time as JSON.

    python benchmarks/accuracy.py --name capsnet-mnist-1epoch -- \
        --model capsnet --dataset mnist --epochs 1

Everything after ``--`` goes to ``torchcaps train`` unchanged. The test accuracy is
that of the checkpoint chosen on the validation split; the JSON records the exact
command, the wall-clock minutes and the machine. With ``--seeds`` among the arguments the
result is the sweep's (``OUT/seeds.json``): every seed's test accuracy, training minutes
and best epoch, and their mean and sample standard deviation::

    python benchmarks/accuracy.py --name seeds-capsnet-mnist-1epoch -- \
        --model capsnet --dataset mnist --epochs 1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from torchcaps.bench import machine_info

RESULTS = Path(__file__).parent / "results"


def _record_seeds(a, args: list[str], out: Path, minutes: float | None) -> None:
    report = json.loads((out / "seeds.json").read_text())
    runs = []
    for r in report["runs"]:
        s = r["summary"]
        run_dir = out / f"seed-{r['seed']}"  # as torchcaps.train.seed_dir names it
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs.append({"seed": r["seed"], "test_accuracy": s["test_accuracy"], "best": s["best"],
                     "train_minutes": round(s["train_seconds"] / 60, 2), "steps": s["steps"],
                     "epochs": history[-1]["epoch"] if history else 0})
    first = report["runs"][0]["summary"]
    result = {"name": a.name, "command": shlex.join(["torchcaps", "train", *args]),
              "wall_minutes": minutes, "note": a.note, "model": first["model"],
              "dataset": first["dataset"], "seeds": report["seeds"], "runs": runs,
              "test_accuracy_mean": report["mean"]["test_accuracy"],
              "test_accuracy_std": report["std"]["test_accuracy"],
              "train_minutes_mean": round(sum(r["train_minutes"] for r in runs) / len(runs), 2),
              "machine": machine_info()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{a.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    std = result["test_accuracy_std"]
    print(f"{a.name}: test accuracy {100 * result['test_accuracy_mean']:.2f}% "
          f"+- {100 * std if std is not None else float('nan'):.2f} over seeds {report['seeds']} "
          f"(wrote {path})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="result name (file benchmarks/results/NAME.json)")
    p.add_argument("--out", default=None, help="run directory (default runs/NAME)")
    p.add_argument("--record-only", action="store_true",
                   help="do not train: record the finished run in --out, made by the given arguments")
    p.add_argument("--note", default="", help="a remark stored with the result")
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = [x for x in a.train_args if x != "--"]
    out = a.out or f"runs/{a.name}"
    minutes = None
    if not a.record_only:
        cmd = ["torchcaps", "train", *args, "--out", out, "--no-progress"]
        print("running:", shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        # same as the `torchcaps` console script, without depending on PATH
        subprocess.run([sys.executable, "-m", "torchcaps.cli", *cmd[1:]], check=True)
        minutes = round((time.perf_counter() - t0) / 60, 2)
    if "--seeds" in args:
        return _record_seeds(a, args, Path(out), minutes)
    summary = json.loads((Path(out) / "summary.json").read_text())
    history = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    result = {"name": a.name, "command": shlex.join(["torchcaps", "train", *args]),
              "wall_minutes": minutes, "note": a.note,
              "train_minutes": round(summary["train_seconds"] / 60, 2),
              "test_accuracy": summary["test_accuracy"], "best": summary["best"],
              "model": summary["model"], "dataset": summary["dataset"], "steps": summary["steps"],
              "epochs": history[-1]["epoch"] if history else 0, "history": history,
              "machine": machine_info()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{a.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{a.name}: test accuracy {100 * result['test_accuracy']:.2f}% "
          f"after {result['train_minutes']:.1f} training minutes (wrote {path})")


if __name__ == "__main__":
    sys.exit(main())
