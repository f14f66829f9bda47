"""The share of a training step spent in the layers' non-finite input checks.

    python benchmarks/check_finite_cost.py --model capsnet --batch-size 128 --steps 5 \
        --json benchmarks/results/check_finite_cost.json

Times full training steps (forward, loss, backward, Adam) and, inside the same steps, the time
spent in ``torchcaps._validate.check_finite`` (each call is timed, including the host sync it
forces), so that other work on the machine slows both alike. Reports the median share over
the steps, and the median step time with the checks replaced by a no-op for comparison.
Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import torchcaps
import torchcaps._validate as validate
from torchcaps.bench import machine_info
from torchcaps.runtime import configure_process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="capsnet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    configure_process(a.threads)
    torch.manual_seed(0)
    model = torchcaps.create_model(a.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(a.batch_size, *model.in_shape)
    y = torch.randint(0, model.num_classes, (a.batch_size,))
    real = validate.check_finite
    calls = {"n": 0, "seconds": 0.0}

    def counted(t, name):
        calls["n"] += 1
        t0 = time.perf_counter()
        out = real(t, name)
        calls["seconds"] += time.perf_counter() - t0
        return out

    def step():
        loss, _ = model.loss(model(x, y), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    validate.check_finite = counted
    step()  # warm-up, and count the checks of one step
    per_step = calls["n"]
    on, off, shares = [], [], []
    for _ in range(a.steps):
        validate.check_finite = counted
        calls["seconds"] = 0.0
        on.append(timed(step))
        shares.append(calls["seconds"] / on[-1])
        validate.check_finite = lambda t, name: t
        off.append(timed(step))
    validate.check_finite = real
    r = {"model": a.model, "batch_size": a.batch_size, "checks_per_step": per_step,
         "share_of_step": statistics.median(shares),
         "step_s_with_checks": statistics.median(on), "step_s_without": statistics.median(off)}
    r["machine"] = machine_info()
    r["command"] = "python benchmarks/check_finite_cost.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)
    print(json.dumps({k: v for k, v in r.items() if k != "machine"}))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
