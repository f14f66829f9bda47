"""How fast em_capsnet starts learning under a given recipe (EM iterations, learning rate).

    python benchmarks/probe_em_learning.py --steps 200 --lr 3e-3 --kw '{"iterations": 2}'

Full MNIST, shifts of 2 px, seed 0, Adam. Prints one JSON line: training accuracy averaged
over each block of 50 steps, and accuracy on the first 500 validation images.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import torchcaps
from _probe import adam_steps  # benchmarks/_probe.py
from torchcaps.data import load_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kw", default="{}", help="em_capsnet arguments as JSON")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    d = load_dataset("mnist")
    kw = json.loads(a.kw)
    m = torchcaps.create_model("em_capsnet", **kw)
    t0 = time.time()
    acc = adam_steps(m, d.train, a.steps, a.batch, a.lr)
    blocks = [round(sum(acc[i:i + 50]) / 50, 3) for i in range(0, len(acc) - 49, 50)]
    m.eval()
    xv, yv = d.val.batch(slice(0, 500))
    with torch.no_grad():
        correct = sum(int((m(xv[i:i + 100]).logits.argmax(1) == yv[i:i + 100]).sum())
                      for i in range(0, 500, 100))
    print(json.dumps({"lr": a.lr, "batch": a.batch, "kw": kw, "train_acc_per50": blocks,
                      "val500": correct / 500, "sec": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
