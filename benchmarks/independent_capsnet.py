"""torchcaps' capsnet against a plain, independent CapsNet written the way most ports are.

    python benchmarks/independent_capsnet.py --json benchmarks/results/independent_capsnet.json
    python benchmarks/independent_capsnet.py --baseline-src BASE/src --json ...

The independent model (``PlainCapsNet`` below) is Sabour et al.'s network in ordinary PyTorch:
``nn.Conv2d`` layers, votes as one broadcast ``W @ u`` over ``(B, 1152, 10, 16, 8)``, routing
as softmax / weighted sum / agreement over the ``(B, 1152, 10, 16)`` votes with autograd
through every iteration, margin loss plus 0.0005 x the summed squared reconstruction error
of a 512-1024-784 decoder on the masked class capsules. Both models take the same training
step (Adam, random images of 28x28 and labels) in a fresh process each, the two alternating
``--rounds`` times per thread count so that both see the same machine; the figure is the
median images/s of ``--repeats`` timed runs of ``--steps`` steps after ``--warmup`` steps,
then the median over rounds. ``--baseline-src DIR`` adds the library in ``DIR`` (the ``src``
folder of another version) as a third contender. The machine entry names the CPU capability.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def plain_capsnet():
    import torch
    from torch import nn

    def squash(s, dim=-1):
        sq = (s * s).sum(dim, keepdim=True)
        return sq / (1 + sq) * s / torch.sqrt(sq + 1e-8)

    class PlainCapsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 256, 9)
            self.primary = nn.Conv2d(256, 32 * 8, 9, stride=2)
            self.W = nn.Parameter(0.01 * torch.randn(1, 1152, 10, 16, 8))
            self.decoder = nn.Sequential(nn.Linear(160, 512), nn.ReLU(), nn.Linear(512, 1024),
                                         nn.ReLU(), nn.Linear(1024, 784), nn.Sigmoid())

        def forward(self, x, y):
            b = x.shape[0]
            h = torch.relu(self.conv1(x))
            p = self.primary(h).view(b, 32, 8, 6, 6).permute(0, 1, 3, 4, 2).reshape(b, 1152, 8)
            u = squash(p)
            u_hat = (self.W @ u[:, :, None, :, None]).squeeze(-1)  # (B, 1152, 10, 16)
            logits = torch.zeros(b, 1152, 10)
            for it in range(3):
                c = torch.softmax(logits, dim=2)
                v = squash((c.unsqueeze(-1) * u_hat).sum(dim=1))  # (B, 10, 16)
                if it < 2:
                    logits = logits + (u_hat * v.unsqueeze(1)).sum(-1)
            lengths = v.norm(dim=-1)
            onehot = torch.nn.functional.one_hot(y, 10).float()
            margin = (onehot * torch.relu(0.9 - lengths) ** 2
                      + 0.5 * (1 - onehot) * torch.relu(lengths - 0.1) ** 2).sum(1).mean()
            recon = self.decoder((v * onehot.unsqueeze(-1)).reshape(b, -1))
            return margin + 0.0005 * ((recon - x.view(b, -1)) ** 2).sum(1).mean()

    return PlainCapsNet()


def measure(which: str, batch: int, warmup: int, repeats: int, steps: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if which == "independent":
        model = plain_capsnet()

        def loss():
            return model(x, y)
    else:
        from torchcaps import create_model

        model = create_model("capsnet")

        def loss():
            return model.loss(model(x, y), x, y)[0]
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return {"model": which, "images_per_s": statistics.median(rates), "runs": rates}


def _child(which: str, src: Path | None, threads: int, a) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [sys.executable, __file__, "--child", which, "--threads", str(threads),
           "--batch-size", str(a.batch_size), "--warmup", str(a.warmup),
           "--repeats", str(a.repeats), "--steps", str(a.steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline-src", type=Path, default=None, metavar="DIR")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads[0])
        print(json.dumps(measure(a.child, a.batch_size, a.warmup, a.repeats, a.steps)))
        return 0
    from torchcaps.bench import machine_info, save_result

    contenders = [("independent", None), ("torchcaps", SRC)]
    if a.baseline_src:
        contenders.append(("torchcaps baseline", a.baseline_src.resolve()))
    rows = []
    for threads in a.threads:
        runs: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for _ in range(a.rounds):
            for name, src in contenders:
                which = "independent" if name == "independent" else "torchcaps"
                runs[name].append(_child(which, src, threads, a)["images_per_s"])
        row = {"threads": threads, "batch_size": a.batch_size,
               **{f"{name} images/s": statistics.median(v) for name, v in runs.items()},
               "rounds": runs}
        row["torchcaps / independent"] = row["torchcaps images/s"] / row["independent images/s"]
        if a.baseline_src:
            row["torchcaps baseline / independent"] = (row["torchcaps baseline images/s"]
                                                       / row["independent images/s"])
        rows.append(row)
        print(f"{threads} thread(s), batch {a.batch_size}: " + ", ".join(
            f"{name} {row[f'{name} images/s']:.1f} images/s" for name, _ in contenders)
            + f"; torchcaps / independent = {row['torchcaps / independent']:.2f}x")
    result = {"command": "python benchmarks/independent_capsnet.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "rows": rows}
    if a.json:
        save_result(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
