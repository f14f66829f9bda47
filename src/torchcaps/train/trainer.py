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

from ..bench import autocast
from ..data import DatasetSplits, load_dataset, random_shift
from ..data.augment import efficient_capsnet_augment
from ..models import CapsuleModel, create_model
from ..runtime import keep_freed_memory
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from .evaluate import evaluate
from .lock import RunLock, RunLockedError

__all__ = ["TrainConfig", "Trainer", "train", "build_model_from_checkpoint", "RunLockedError",
           "NonFiniteError"]

_DEFAULT_EPOCHS = {"mnist-mini": 3, "mnist": 10}


def _no_progress() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


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
    max_shift: int = 2  # random shift augmentation, pixels (augment="shift" only)
    # "shift": random shift of up to max_shift px (Sabour et al.); "efficient": the
    # Efficient-CapsNet rotate/shift/squish/erase pipeline (torchcaps.data.augment)
    augment: str = "shift"
    lr_staircase: bool = False  # decay in whole steps of lr_decay_steps (Keras per-epoch)
    lr_min: float = 0.0  # floor of the learning rate (Efficient-CapsNet: 5e-5)
    # step decay on top of the exponential one: the rate is multiplied by lr_gamma once for
    # every milestone (a count of completed steps, increasing) already reached
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0  # model init, data order, augmentation
    max_steps: int | None = None  # stop after this many optimisation steps in total
    out: str = "runs/capsnet"  # run directory
    eval_batch_size: int | None = None  # evaluation batch (default: batch_size; bounds memory)
    checkpoint_every: int = 0  # also save `last` every N steps (0: at epoch ends only)
    progress: bool = True  # show a progress bar
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or "auto" (CUDA when available)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    threads: int | None = None  # torch intra-op threads (bitwise resume needs the same count)
    precision: str = "fp32"  # "bf16": bfloat16 autocast for forward and loss (CPU or CUDA)
    # torch.compile the training forward pass (static shapes; the first step of each batch
    # size compiles, about a minute). Same maths, fewer kernel launches: worth it on a GPU
    compile: bool = False
    nonfinite: str = "stop"  # on a NaN/Inf loss or gradient: "stop", or "skip" the batch

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = _DEFAULT_EPOCHS.get(self.dataset, 10)
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        if isinstance(self.lr_milestones, list):  # as read back from a JSON manifest
            self.lr_milestones = tuple(self.lr_milestones)
        ms = self.lr_milestones
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr), "lr_decay": 0 < self.lr_decay <= 1,
            "lr_decay_steps": self.lr_decay_steps >= 1, "max_shift": self.max_shift >= 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "eval_batch_size": self.eval_batch_size >= 1, "checkpoint_every": self.checkpoint_every >= 0,
            "nonfinite": self.nonfinite in ("stop", "skip"),
            "threads": self.threads is None or self.threads >= 1,
            "precision": self.precision in ("fp32", "bf16"),
            "augment": self.augment in ("shift", "efficient"),
            "lr_min": 0 <= self.lr_min <= self.lr,
            "lr_milestones": isinstance(ms, tuple)
            and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms)
            and all(a < b for a, b in zip(ms, ms[1:])),
            "lr_gamma": 0 < self.lr_gamma <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            listed = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ValueError(f"invalid training settings: {listed}")


class NonFiniteError(FloatingPointError):
    """A NaN or Inf loss or gradient appeared during training."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked, not coerced."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported (use cpu or cuda)")
    return dev


def build_model_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CapsuleModel, dict]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode)."""
    meta, tensors = load_checkpoint(path)
    try:
        model = create_model(meta["model"], **meta["model_kwargs"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot build model {meta['model']!r} "
                              f"with {meta['model_kwargs']}: {e}") from None
    try:
        model.load_state_dict(model_state(tensors))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r}: {e}") from None
    model.to(device).eval()
    return model, meta


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, data: DatasetSplits | None = None) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        keep_freed_memory()  # faster, same results; TORCHCAPS_KEEP_MEMORY=0 disables it
        if config.deterministic:
            # CUDA also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts
            torch.use_deterministic_algorithms(True)
        self.data = data or load_dataset(config.dataset, config.data_dir, config.val_size,
                                         config.split_seed)
        self.model_kwargs = {"in_shape": list(self.data.in_shape),
                             "num_classes": self.data.num_classes, **config.model_kwargs}
        torch.manual_seed(config.seed)
        self.model = create_model(config.model, **self.model_kwargs).to(self.device)
        # checkpoints and evaluation use self.model, so weights keep their plain names
        self.forward = torch.compile(self.model, dynamic=False) if config.compile else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.aug_gen = torch.Generator().manual_seed(config.seed + 1)
        self.epoch, self.pos, self.step = 0, 0, 0
        self.skipped = 0  # batches skipped for non-finite values (nonfinite="skip")
        self.history: list[dict] = []
        self.best: dict | None = None
        # running sums of the epoch in progress, checkpointed mid-epoch so that a resumed
        # epoch reports the loss, accuracy and training seconds of all its steps
        self.partial = _no_progress()

    # -------------------------------------------------------------- checkpointing
    def _manifest(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs,
                "config": asdict(self.cfg), "epoch": self.epoch, "pos": self.pos,
                "step": self.step, "skipped": self.skipped, "history": self.history,
                "partial": self.partial,
                "best": self.best, "torch_version": torch.__version__}

    def _rng(self) -> dict[str, torch.Tensor]:
        return {"augment": self.aug_gen.get_state(), "torch": torch.get_rng_state()}

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` atomically; an I/O failure leaves the previous one intact."""
        try:
            return save_checkpoint(self.out / name, self.model, self._manifest(), self.optimizer,
                                   self._rng())
        except OSError as e:
            raise OSError(f"could not write checkpoint {self.out / name} ({e.strerror or e}); "
                          f"the previous checkpoint there is intact") from e

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Restore model, optimizer, RNG states, counters and history from a checkpoint."""
        meta, tensors = load_checkpoint(path or self.out / "last")
        if meta["model"] != self.cfg.model or meta["model_kwargs"] != self.model_kwargs:
            raise CheckpointError(f"checkpoint is for model {meta['model']} {meta['model_kwargs']}, "
                                  f"not {self.cfg.model} {self.model_kwargs}")
        try:
            self.model.load_state_dict(model_state(tensors))
            self.optimizer.load_state_dict(optimizer_state(meta, tensors))
            rng = rng_state(tensors)
            self.aug_gen.set_state(rng["augment"])
            torch.set_rng_state(rng["torch"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {path or self.out / 'last'}: {e}") from None
        self.epoch, self.pos, self.step = meta["epoch"], meta.get("pos", 0), meta["step"]
        self.skipped = meta.get("skipped", 0)
        self.history, self.best = meta.get("history", []), meta.get("best")
        self.partial = meta.get("partial") or _no_progress()

    # -------------------------------------------------------------- loop
    def _lr(self) -> float:
        c = self.cfg
        if c.lr_staircase:
            lr = c.lr * c.lr_decay ** (self.step // c.lr_decay_steps)
        else:
            lr = c.lr * c.lr_decay ** (self.step / c.lr_decay_steps)
        lr *= c.lr_gamma ** sum(self.step >= m for m in c.lr_milestones)
        return max(lr, c.lr_min) if c.lr_min else lr

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

    def _grad_norm(self) -> torch.Tensor:
        norms = [torch.linalg.vector_norm(p.grad) for p in self.model.parameters()
                 if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def _nonfinite(self, what: str, value: float) -> bool:
        """Handle a NaN/Inf: raise (``stop``) or count and skip the batch (``skip``)."""
        if self.cfg.nonfinite == "skip":
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            print(f"step {self.step}: non-finite {what} ({value}); batch skipped "
                  f"({self.skipped} so far)", file=sys.stderr)
            return True
        raise NonFiniteError(
            f"non-finite {what} ({value}) at step {self.step + 1} (epoch {self.epoch + 1}, "
            f"batch {self.pos + 1}); training stopped. The last good checkpoint is "
            f"{self.out / 'last.json'}; rerun with --nonfinite skip to skip such batches")

    def fit(self) -> dict:
        """Train to the configured budget, then report test accuracy of the best checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out):
            return self._fit()

    def _fit(self) -> dict:
        c, n, dev = self.cfg, len(self.data.train), self.device
        batches = math.ceil(n / c.batch_size)
        if self.step == 0 and not (self.out / "last.json").exists():
            self.save("last")  # a resumable starting point before the first step
        while not self._done():
            order = self._epoch_order(self.epoch)
            self.model.train()
            sums = dict(self.partial)
            carried = sums.pop("seconds")  # training time of this epoch before a resume
            t0 = time.perf_counter()
            bar = tqdm(total=batches, initial=self.pos, desc=f"epoch {self.epoch + 1}/{c.epochs}",
                       disable=not c.progress, file=sys.stderr, leave=True, dynamic_ncols=True)
            while self.pos < batches and not (c.max_steps is not None and self.step >= c.max_steps):
                idx = order[self.pos * c.batch_size:(self.pos + 1) * c.batch_size]
                x, y = self.data.train.batch(idx)
                if c.augment == "efficient":
                    x = efficient_capsnet_augment(x, self.aug_gen)
                else:
                    x = random_shift(x, c.max_shift, self.aug_gen)
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True)
                for g in self.optimizer.param_groups:
                    g["lr"] = self._lr()
                with autocast(self.device, c.precision):
                    out = self.forward(x, y)
                    loss, _ = self.model.loss(out, x, y)
                loss_value = float(loss.detach())
                skip = not math.isfinite(loss_value) and self._nonfinite("loss", loss_value)
                if not skip:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = float(self._grad_norm())
                    skip = not math.isfinite(gnorm) and self._nonfinite("gradient norm", gnorm)
                if not skip:
                    self.optimizer.step()
                    sums["loss"] += loss_value * len(y)
                    sums["correct"] += int((out.logits.argmax(1) == y).sum())
                    sums["seen"] += len(y)
                self.step += 1
                self.pos += 1
                rate = sums["seen"] / (carried + time.perf_counter() - t0)
                bar.set_postfix(loss=f"{sums['loss'] / max(sums['seen'], 1):.4f}",
                                acc=f"{sums['correct'] / max(sums['seen'], 1):.4f}",
                                img_s=f"{rate:.0f}")
                bar.update(1)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.pos < batches:
                    self.partial = {**sums, "seconds": carried + time.perf_counter() - t0}
                    self.save("last")
            bar.close()
            train_time = carried + time.perf_counter() - t0
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
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "skipped_batches": self.skipped, "device": str(self.device)}
        self.history.append(rec)
        self.partial = _no_progress()  # this record holds everything since the previous one
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
        best_model, meta = build_model_from_checkpoint(self.out / "best", self.device)
        test = evaluate(best_model, self.data.test, self.cfg.eval_batch_size)
        summary = {"model": self.cfg.model, "dataset": self.cfg.dataset, "steps": self.step,
                   "best": meta["best"], "test_accuracy": test["accuracy"],
                   "test_loss": test["loss"], "test_correct": test["correct"],
                   "test_total": test["total"], "skipped_batches": self.skipped,
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
