"""The training loop: paper defaults, validation-based model selection, exact resume.

Reproducibility: the model is initialised from ``seed``; the order of epoch ``e`` is
a permutation drawn from a generator seeded with ``(seed, e)``; augmentation draws
from its own generator whose state is checkpointed. A run resumed from any
checkpoint therefore replays exactly the batches and shifts it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import DatasetSplits, load_dataset, random_shift
from ..models import CapsuleModel, create_model
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from .evaluate import evaluate

__all__ = ["TrainConfig", "Trainer", "train", "build_model_from_checkpoint"]

_DEFAULT_EPOCHS = {"mnist-mini": 3, "mnist": 10}


@dataclass
class TrainConfig:
    model: str = "capsnet"  # registered model name
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments
    dataset: str = "mnist-mini"  # see torchcaps.data.list_datasets()
    data_dir: str | None = None  # cache directory (default $TORCHCAPS_HOME or ~/.cache/torchcaps)
    val_size: int | None = None  # validation images carved from training (dataset default)
    split_seed: int = 0  # seed of the train/validation carve
    epochs: int | None = None  # dataset default when None
    batch_size: int = 128  # Sabour et al.
    lr: float = 1e-3  # Adam, Sabour et al.
    lr_decay: float = 0.96  # exponential decay factor ...
    lr_decay_steps: int = 2000  # ... per this many steps (continuous, as the official code)
    max_shift: int = 2  # random shift augmentation, pixels
    seed: int = 0  # model init, data order, augmentation
    max_steps: int | None = None  # stop after this many optimisation steps in total
    out: str = "runs/capsnet"  # run directory
    eval_batch_size: int = 500
    checkpoint_every: int = 0  # also save `last` every N steps (0: at epoch ends only)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = _DEFAULT_EPOCHS.get(self.dataset, 10)
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr), "lr_decay": 0 < self.lr_decay <= 1,
            "lr_decay_steps": self.lr_decay_steps >= 1, "max_shift": self.max_shift >= 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "eval_batch_size": self.eval_batch_size >= 1, "checkpoint_every": self.checkpoint_every >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


def build_model_from_checkpoint(path: str | os.PathLike) -> tuple[CapsuleModel, dict]:
    """Rebuild the model recorded in a checkpoint and load its weights."""
    meta, tensors = load_checkpoint(path)
    model = create_model(meta["model"], **meta["model_kwargs"])
    try:
        model.load_state_dict(model_state(tensors))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r}: {e}") from None
    model.eval()
    return model, meta


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, data: DatasetSplits | None = None) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.data = data or load_dataset(config.dataset, config.data_dir, config.val_size,
                                         config.split_seed)
        self.model_kwargs = {"in_shape": list(self.data.in_shape),
                             "num_classes": self.data.num_classes, **config.model_kwargs}
        torch.manual_seed(config.seed)
        self.model = create_model(config.model, **self.model_kwargs)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.aug_gen = torch.Generator().manual_seed(config.seed + 1)
        self.epoch, self.pos, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.best: dict | None = None

    # -------------------------------------------------------------- checkpointing
    def _manifest(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs,
                "config": asdict(self.cfg), "epoch": self.epoch, "pos": self.pos,
                "step": self.step, "history": self.history, "best": self.best,
                "torch_version": torch.__version__}

    def _rng(self) -> dict[str, torch.Tensor]:
        return {"augment": self.aug_gen.get_state(), "torch": torch.get_rng_state()}

    def save(self, name: str) -> Path:
        return save_checkpoint(self.out / name, self.model, self._manifest(), self.optimizer,
                               self._rng())

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Restore model, optimizer, RNG states, counters and history from a checkpoint."""
        meta, tensors = load_checkpoint(path or self.out / "last")
        if meta["model"] != self.cfg.model or meta["model_kwargs"] != self.model_kwargs:
            raise CheckpointError(f"checkpoint is for model {meta['model']} {meta['model_kwargs']}, "
                                  f"not {self.cfg.model} {self.model_kwargs}")
        self.model.load_state_dict(model_state(tensors))
        self.optimizer.load_state_dict(optimizer_state(meta, tensors))
        rng = rng_state(tensors)
        self.aug_gen.set_state(rng["augment"])
        torch.set_rng_state(rng["torch"])
        self.epoch, self.pos, self.step = meta["epoch"], meta.get("pos", 0), meta["step"]
        self.history, self.best = meta.get("history", []), meta.get("best")

    # -------------------------------------------------------------- loop
    def _lr(self) -> float:
        c = self.cfg
        return c.lr * c.lr_decay ** (self.step / c.lr_decay_steps)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.data.train), generator=g)

    def _done(self) -> bool:
        c = self.cfg
        return self.epoch >= c.epochs or (c.max_steps is not None and self.step >= c.max_steps)

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        tmp = self.out / ".metrics.jsonl.tmp"
        tmp.write_text(lines)
        os.replace(tmp, self.out / "metrics.jsonl")

    def fit(self) -> dict:
        """Train to the configured budget, then report test accuracy of the best checkpoint."""
        c, n = self.cfg, len(self.data.train)
        self.out.mkdir(parents=True, exist_ok=True)
        batches = math.ceil(n / c.batch_size)
        while not self._done():
            order = self._epoch_order(self.epoch)
            self.model.train()
            sums = {"loss": 0.0, "correct": 0, "seen": 0}
            t0 = time.perf_counter()
            bar = tqdm(total=batches, initial=self.pos, desc=f"epoch {self.epoch + 1}/{c.epochs}",
                       disable=not c.progress, file=sys.stderr, leave=True, dynamic_ncols=True)
            while self.pos < batches and not (c.max_steps is not None and self.step >= c.max_steps):
                idx = order[self.pos * c.batch_size:(self.pos + 1) * c.batch_size]
                x, y = self.data.train.batch(idx)
                x = random_shift(x, c.max_shift, self.aug_gen)
                for g in self.optimizer.param_groups:
                    g["lr"] = self._lr()
                out = self.model(x, y)
                loss, _ = self.model.loss(out, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; "
                                             f"last good checkpoint: {self.out / 'last.json'}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                self.pos += 1
                sums["loss"] += float(loss.detach()) * len(y)
                sums["correct"] += int((out.logits.argmax(1) == y).sum())
                sums["seen"] += len(y)
                rate = sums["seen"] / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                                acc=f"{sums['correct'] / sums['seen']:.4f}", img_s=f"{rate:.0f}")
                bar.update(1)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.pos < batches:
                    self.save("last")
            bar.close()
            train_time = time.perf_counter() - t0
            epoch_done = self.pos >= batches
            self._end_of_epoch(sums, train_time, epoch_done)
        return self.finish()

    def _end_of_epoch(self, sums: dict, train_time: float, epoch_done: bool) -> None:
        val = evaluate(self.model, self.data.val, self.cfg.eval_batch_size)
        rec = {"epoch": self.epoch + 1, "step": self.step, "complete_epoch": epoch_done,
               "lr": self._lr(), "train_seconds": round(train_time, 2),
               "train_images_per_s": round(sums["seen"] / max(train_time, 1e-9), 1),
               "train_loss": sums["loss"] / max(sums["seen"], 1),
               "train_accuracy": sums["correct"] / max(sums["seen"], 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        self.history.append(rec)
        improved = self.best is None or val["accuracy"] > self.best["val_accuracy"]
        if epoch_done:
            self.epoch, self.pos = self.epoch + 1, 0
        if improved:
            self.best = {"epoch": rec["epoch"], "step": self.step, "val_accuracy": val["accuracy"],
                         "val_loss": val["loss"]}
            self.save("best")
        self.save("last")
        self._write_metrics()
        print(f"epoch {rec['epoch']} step {self.step}: train loss {rec['train_loss']:.4f} "
              f"acc {rec['train_accuracy']:.4f} | val loss {val['loss']:.4f} "
              f"acc {val['accuracy']:.4f}{' (best)' if improved else ''} | "
              f"{rec['train_images_per_s']:.0f} img/s", file=sys.stderr)

    def finish(self) -> dict:
        """Evaluate the best checkpoint (chosen on validation) on the test set."""
        best_model, meta = build_model_from_checkpoint(self.out / "best")
        test = evaluate(best_model, self.data.test, self.cfg.eval_batch_size)
        summary = {"model": self.cfg.model, "dataset": self.cfg.dataset, "steps": self.step,
                   "best": meta["best"], "test_accuracy": test["accuracy"],
                   "test_loss": test["loss"], "test_correct": test["correct"],
                   "test_total": test["total"],
                   "train_seconds": round(sum(h["train_seconds"] for h in self.history), 2),
                   "checkpoint": str(self.out / "best.safetensors")}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) and return the summary dict (``test_accuracy`` etc.)."""
    trainer = Trainer(config)
    if resume:
        trainer.resume()
    return trainer.fit()
