"""How many of cnn_baseline's ReLU units die in the first Adam steps, per learning rate.

    python benchmarks/probe_cnn_dead_relu.py --steps 80 --lr 1e-3 3e-4 1e-4

Full MNIST, batch 128, shifts of 2 px, seed 0. A unit is dead when it is never positive on
the first 300 validation images. Prints one JSON line per learning rate.
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
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    configure_process(a.threads)
    d = load_dataset("mnist")
    xv, yv = d.val.batch(slice(0, 300))
    val300 = Split(d.val.images[:300], d.val.labels[:300])
    data = DatasetSplits("mnist-probe", d.train, val300, val300, d.num_classes)
    for lr in a.lr:
        torch.manual_seed(0)
        m = torchcaps.create_model("cnn_baseline")
        t0 = time.time()
        cfg = TrainConfig(model="cnn_baseline", out=None, max_steps=a.steps, batch_size=128,
                          lr=lr, lr_decay=1.0, log_every=a.steps - 20, progress=False)
        trainer = Trainer(ClassificationTask(data, m), cfg)
        trainer.fit()
        # running epoch accuracy after steps-20 and after all steps -> the last 20 steps
        first = trainer.step_log[0]
        last20 = (trainer.history[-1]["train_accuracy"] * a.steps
                  - first["train_accuracy"] * first["step"]) / (a.steps - first["step"])
        m.eval()
        with torch.no_grad():
            f = m.features(xv)  # (300, C3, H, W)
            h1 = m.hidden[1](m.hidden[0](f.flatten(1)))  # fc1 after ReLU
            val = (m(xv).logits.argmax(1) == yv).float().mean().item()
        print(json.dumps({"lr": lr, "dead_conv3": int((f.amax(dim=(0, 2, 3)) <= 0).sum()),
                          "dead_fc1": int((h1.amax(0) <= 0).sum()),
                          "train_acc_last20": round(last20, 3),
                          "val300": round(val, 3), "sec": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
