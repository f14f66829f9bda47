"""Training and inference throughput and peak memory of a registered model.

    python benchmarks/throughput.py --model capsnet --batch-size 128 \
        --json benchmarks/results/throughput_capsnet.json

Each phase (train, infer) runs in a fresh process so that its peak memory is its own.
Method (see benchmarks/README.md): warm-up steps, then the median of several timed runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from torchcaps.bench import machine_info, measure_throughput


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="capsnet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="output path")
    p.add_argument("--phase", choices=["train", "infer"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    common = dict(batch_size=a.batch_size, warmup=a.warmup, repeats=a.repeats, steps=a.steps,
                  device=a.device)
    if a.phase:  # child process: one phase, print JSON
        print(json.dumps(measure_throughput(a.model, a.phase, **common)))
        return
    result = {"model": a.model, "batch_size": a.batch_size, "device": a.device,
              "command": "python " + " ".join(sys.argv), "machine": machine_info()}
    for phase in ("train", "infer"):
        cmd = [sys.executable, __file__, "--model", a.model, "--batch-size", str(a.batch_size),
               "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--steps", str(a.steps),
               "--device", a.device, "--phase", phase]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        result[phase] = r
        print(f"{a.model} {phase}: {r['images_per_s']:.1f} images/s (median of {a.repeats}), "
              f"peak memory {r['peak_memory_mb']:.0f} MB")
    result["train_images_per_s"] = result["train"]["images_per_s"]
    result["infer_images_per_s"] = result["infer"]["images_per_s"]
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
