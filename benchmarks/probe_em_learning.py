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
from torchcaps.data import DatasetSplits, Split, load_dataset
from torchcaps.runtime import configure_process
from torchcaps.train import ClassificationTask, TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kw", default="{}", help="em_capsnet arguments as JSON")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    configure_process(a.threads)
    torch.manual_seed(0)
    d = load_dataset("mnist")
    val500 = Split(d.val.images[:500], d.val.labels[:500])
    data = DatasetSplits("mnist-probe", d.train, val500, val500, d.num_classes)
    kw = json.loads(a.kw)
    m = torchcaps.create_model("em_capsnet", **kw)
    t0 = time.time()
    cfg = TrainConfig(model="em_capsnet", out=None, max_steps=a.steps, batch_size=a.batch,
                      lr=a.lr, lr_decay=1.0, log_every=50, eval_batch_size=100, progress=False)
    trainer = Trainer(ClassificationTask(data, m), cfg)
    trainer.fit()
    # the step log holds the epoch's running accuracy: difference it into blocks of 50 steps
    cum = [0.0] + [r["train_accuracy"] * r["step"] for r in trainer.step_log]
    blocks = [round((b - a_) / 50, 3) for a_, b in zip(cum, cum[1:])]
    print(json.dumps({"lr": a.lr, "batch": a.batch, "kw": kw, "train_acc_per50": blocks,
                      "val500": trainer.history[-1]["val_accuracy"],
                      "sec": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
