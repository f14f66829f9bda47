"""The training engine: one loop for every task (see :mod:`torchcaps.train.task`).

Reproducibility: the task's modules are initialised from ``seed``; a task draws batch
``pos`` of epoch ``e`` as a pure function of ``(seed, e, pos)`` and of the augmentation
generator, whose state is checkpointed with the optimisers and torch's RNG. A run resumed
from any checkpoint therefore replays exactly the batches it would have seen.

Distributed data parallelism. Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed`
joins the process group (gloo on CPU, nccl on CUDA) and the engine wraps the task's module
in :class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` is the *global* batch:
every rank draws the same global batch and keeps its contiguous share of it (sizes differ
by at most one), so an epoch sees every example exactly once across ranks, and each rank's
loss is weighted by its share so that the averaged gradient is the gradient of the global
batch mean. A run on N ranks therefore follows the single-process run of the same global
batch up to floating-point round-off, and a checkpoint written by either resumes in the
other. Every rank evaluates the whole validation split (the same weights give the same
decision everywhere); only rank 0 writes checkpoints, metrics and logs, and holds the lock.
What does not carry over: batch-norm statistics are per rank (their running averages are
rank 0's), and routing is per example, so it parallelises like any other layer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._validate import NonFiniteValueError
from ..precision import autocast, check_precision
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from .config import TrainConfig
from .lock import RunLock
from .task import Task

__all__ = ["Trainer", "NonFiniteError", "RunExistsError", "DistributedError", "resolve_device",
           "create_optimizer", "init_distributed", "rank_share"]

_RUN_FILES = ("last", "best")
# settings a resumed run must share with its checkpoint (the others may change mid-run)
_FIXED = ("dataset", "val_size", "split_seed", "batch_size", "optimizer", "optimizer_kwargs", "lr",
          "lr_decay", "lr_decay_steps", "lr_staircase", "lr_min", "lr_milestones", "lr_gamma",
          "max_shift", "augment", "seed", "precision")


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


class NonFiniteError(FloatingPointError):
    """A NaN or Inf loss, gradient or activation appeared during training."""


class RunExistsError(FileExistsError):
    """The output directory holds an earlier run and neither resume nor overwrite was asked."""


class DistributedError(RuntimeError):
    """A rank of a distributed run failed or lost contact with the others."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked, not coerced.

    In a distributed CUDA run, ``"auto"`` and ``"cuda"`` mean the rank's own GPU
    (``LOCAL_RANK``).
    """
    if name in ("auto", "cuda") and torch.cuda.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
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


def create_optimizer(name: str, params, lr: float, kwargs: dict | None = None):
    """Any ``torch.optim`` optimiser by (case-insensitive) class name, e.g. ``"adamw"``."""
    classes = {n.lower(): c for n, c in vars(torch.optim).items()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
               and c is not torch.optim.Optimizer}
    cls = classes.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; torch.optim has {', '.join(sorted(classes))}")
    try:
        return cls(params, lr=lr, **(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"optimizer {cls.__name__} does not accept {kwargs}: {e}") from None


def init_distributed(device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes; ``False`` outside ``torchrun``.

    gloo on CPU, nccl on CUDA. Idempotent. The caller owns the group (see
    :func:`torchcaps.train.train`, which also tears it down).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous part of a global batch of ``n`` that ``rank`` trains on."""
    return n * rank // world, n * (rank + 1) // world


class Trainer:
    """Runs one training job: a :class:`Task` under a :class:`TrainConfig`."""

    def __init__(self, task: Task, config: TrainConfig) -> None:
        self.task, self.cfg = task, config
        self.out = Path(config.out) if config.out else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device)
        task.setup(config, self.device)
        self.module = task.module.to(self.device)
        forward = self.module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # checkpoints and evaluation use self.module, so weights keep their plain names
        task.forward = torch.compile(forward, dynamic=False) if config.compile else forward
        self.optimizers = {name: create_optimizer(config.optimizer, task.parameters(name),
                                                  config.lr, config.optimizer_kwargs)
                           for name in task.optimizers}
        self.aug_gen = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = self.pos = self.step = self.skipped = self.since_best = 0
        self.history: list[dict] = []  # one record per evaluation
        self.step_log: list[dict] = []  # every log_every steps (steps.jsonl)
        self.resumes: list[dict] = []  # where the run was resumed and what changed then
        self.best: dict | None = None
        self.best_state: dict | None = None  # best weights when nothing is written to disk
        self.resumed = False
        self.stopped = False  # a task rule or early stopping ended the run; resume keeps it so
        # running sums of the epoch in progress, checkpointed mid-epoch so that a resumed
        # epoch reports the loss, metrics and training seconds of all its steps
        self.partial: dict = {"seconds": 0.0}

    # -------------------------------------------------------------- checkpointing
    def _manifest(self) -> dict:
        return {**self.task.spec(), "task": type(self.task).__name__,
                "task_state": self.task.state(), "config": asdict(self.cfg),
                "epoch": self.epoch, "pos": self.pos, "step": self.step,
                "skipped": self.skipped, "since_best": self.since_best, "stopped": self.stopped,
                "history": self.history,
                "step_log": self.step_log, "resumes": self.resumes, "partial": self.partial,
                "best": self.best, "world_size": self.world, "torch_version": torch.__version__}

    def _optimizer_arg(self):
        return self.optimizers["model"] if list(self.optimizers) == ["model"] else self.optimizers

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` atomically (rank 0; nothing when ``out`` is None)."""
        if self.out is None:
            if name == "best":
                self.best_state = copy.deepcopy(self.module.state_dict())
            return
        if not self.is_main:
            return
        rng = {"augment": self.aug_gen.get_state(), "torch": torch.get_rng_state()}
        try:
            save_checkpoint(self.out / name, self.module, self._manifest(), self._optimizer_arg(),
                            rng)
        except OSError as e:
            raise OSError(f"could not write checkpoint {self.out / name} ({e.strerror or e}); "
                          f"the previous checkpoint there is intact") from e

    def resume(self, path: str | os.PathLike | None = None, changes: dict | None = None) -> None:
        """Restore weights, optimisers, RNG states, counters and history from a checkpoint.

        ``changes`` (setting -> ``[old, new]``) records settings changed for the rest of
        the run; they are kept in the manifest's ``resumes`` list and printed.
        """
        if path is None and self.out is None:
            raise ValueError("resume needs a checkpoint path when the run has no out directory")
        path = Path(path) if path is not None else self.out / "last"
        meta, tensors = load_checkpoint(path)
        spec = self.task.spec()
        if meta.get("model") != spec["model"] or meta.get("model_kwargs") != spec["model_kwargs"]:
            raise CheckpointError(f"{path}: checkpoint is for model {meta.get('model')} "
                                  f"{meta.get('model_kwargs')}, not {spec['model']} "
                                  f"{spec['model_kwargs']}")
        saved = meta.get("config") or {}
        fixed = [k for k in _FIXED if k in saved and saved[k] != _jsonable(getattr(self.cfg, k))]
        if fixed:
            listed = ", ".join(f"{k}={saved[k]!r}, not {getattr(self.cfg, k)!r}" for k in fixed)
            raise CheckpointError(f"{path}: checkpoint was trained with {listed}; these settings "
                                  "cannot change mid-run (resume with the same settings)")
        self.task.check_resume(meta)
        try:
            load_model_weights(self.module, tensors, str(path))
            for name, opt in self.optimizers.items():
                opt.load_state_dict(optimizer_state(meta, tensors, None if name == "model"
                                                    and len(self.optimizers) == 1 else name))
            rng = rng_state(tensors)
            self.aug_gen.set_state(rng["augment"])
            torch.set_rng_state(rng["torch"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None
        for key in ("epoch", "pos", "step", "skipped", "since_best"):
            setattr(self, key, int(meta.get(key, 0)))
        self.history, self.best = meta.get("history", []), meta.get("best")
        self.step_log, self.resumes = meta.get("step_log", []), meta.get("resumes", [])
        self.partial = meta.get("partial") or {"seconds": 0.0}
        self.stopped = bool(meta.get("stopped", False))
        self.task.load_state(meta.get("task_state") or {})
        self.resumed = True
        self.resumes.append({"step": self.step, "changes": changes or {}})
        if self.is_main:
            best = (f"best {self.task.monitor} {self.best[self.task.monitor]:.4f} at epoch "
                    f"{self.best['epoch']}" if self.best else "no evaluation yet")
            print(f"resuming {path}: {spec['model']}, epoch {self.epoch + 1} of {self.cfg.epochs}, "
                  f"step {self.step}, {best}", file=sys.stderr)

    # -------------------------------------------------------------- loop
    def _lr(self) -> float:
        c = self.cfg
        if c.lr_staircase:
            lr = c.lr * c.lr_decay ** (self.step // c.lr_decay_steps)
        else:
            lr = c.lr * c.lr_decay ** (self.step / c.lr_decay_steps)
        lr *= c.lr_gamma ** sum(self.step >= m for m in c.lr_milestones)
        return max(lr, c.lr_min) if c.lr_min else lr

    def _budget_left(self) -> bool:
        c = self.cfg
        return c.max_steps is None or self.step < c.max_steps

    def _local(self, batch: tuple) -> tuple[tuple, float]:
        """This rank's share of the global batch on the device, and its loss weight."""
        n = len(batch[0])
        if self.world > 1:
            if n < self.world:
                raise ValueError(f"a batch of {n} cannot be split across {self.world} ranks; "
                                 "choose a batch size whose last batch is at least that large")
            lo, hi = rank_share(n, self.rank, self.world)
            batch = tuple(t[lo:hi] for t in batch)
        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        return batch, len(batch[0]) * self.world / n

    def _agree(self, value: float) -> float:
        """The mean of a per-rank value over ranks (NaN anywhere gives NaN everywhere)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def _nonfinite(self, what: str, detail) -> None:
        """Apply the ``nonfinite`` policy: raise (``stop``) or count the batch as skipped."""
        if self.cfg.nonfinite == "skip":
            self.skipped += 1
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if self.is_main:
                print(f"step {self.step + 1}: non-finite {what} ({detail}); batch skipped "
                      f"({self.skipped} so far)", file=sys.stderr)
            return
        last = self.out / "last.json" if self.out else "none (no run directory)"
        raise NonFiniteError(
            f"non-finite {what} ({detail}) at step {self.step + 1} (epoch {self.epoch + 1}, "
            f"batch {self.pos + 1}); training stopped. The last good checkpoint is {last}; "
            "rerun with --nonfinite skip to skip such batches")

    def _grad_norm(self, params) -> float:
        norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _train_step(self, batch: tuple, weight: float, sums: dict) -> None:
        """One step: every (optimizer, loss) the task yields; sums grow unless skipped."""
        n, added = len(batch[0]), {}
        steps = self.task.step(batch)
        while True:
            error = None
            try:
                with autocast(self.device, self.cfg.precision):
                    item = next(steps, None)
            except NonFiniteValueError as e:  # a layer's input check inside the network
                item, error = None, str(e)
            if item is None and error is None:
                break
            value = float(item[1].detach()) if error is None else float("nan")
            if not math.isfinite(self._agree(value)):
                steps.close()
                return self._nonfinite("activation" if error else "loss", error or value)
            name, loss, counts = item
            opt = self.optimizers[name]
            opt.zero_grad(set_to_none=True)
            (loss * weight if weight != 1 else loss).backward()
            params = list(self.task.parameters(name))
            gnorm = self._grad_norm(params)
            if not math.isfinite(gnorm):
                steps.close()
                return self._nonfinite("gradient norm", gnorm)
            opt.step()
            key = "loss" if name == "model" else f"{name}_loss"
            added[key] = added.get(key, 0.0) + value * n
            for k, v in counts.items():
                added[k] = added.get(k, 0) + v
        for k, v in added.items():
            sums[k] = sums.get(k, 0) + v
        sums["seen"] = sums.get("seen", 0) + n

    def fit(self) -> dict:
        """Train to the configured budget, then return the task's summary."""
        check_precision(self.device, self.cfg.precision, force=self.cfg.force_precision)
        if self.out is None or not self.is_main:
            return self._fit()
        self.out.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out):
            if not self.resumed:
                self._claim_directory()
            return self._fit()

    def _claim_directory(self) -> None:
        found = [f"{n}.json" for n in _RUN_FILES if (self.out / f"{n}.json").exists()]
        if not found:
            return
        if not self.cfg.overwrite:
            try:
                meta = json.loads((self.out / found[0]).read_text())
                what = f"a {meta.get('model')} run at step {meta.get('step')}"
            except (OSError, ValueError, AttributeError):
                what = "an unreadable run"
            raise RunExistsError(
                f"{self.out} already holds {what} ({', '.join(found)}); continue it with "
                "--resume, choose another --out, or pass --overwrite to replace it")
        for p in self.out.iterdir():
            if p.name.startswith(_RUN_FILES) or p.name in ("metrics.jsonl", "steps.jsonl",
                                                            "summary.json"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _fit(self) -> dict:
        c = self.cfg
        if not self.resumed:
            self.save("last")  # a resumable starting point before the first step
        while not self.stopped and self.epoch < c.epochs and self._budget_left():
            batches = self.task.num_batches()
            self.module.train()
            sums = dict(self.partial)
            carried = sums.pop("seconds")  # training time of this epoch before a resume
            t0 = time.perf_counter()
            bar = tqdm(total=batches, initial=self.pos, desc=f"epoch {self.epoch + 1}/{c.epochs}",
                       disable=not (c.progress and self.is_main), file=sys.stderr, leave=True,
                       dynamic_ncols=True)
            while self.pos < batches and self._budget_left():
                batch, weight = self._local(self.task.batch(self.epoch, self.pos, self.aug_gen))
                for opt in self.optimizers.values():
                    for g in opt.param_groups:
                        g["lr"] = self._lr()
                self._train_step(batch, weight, sums)
                self.step += 1
                self.pos += 1
                seen = max(sums.get("seen", 0), 1)
                rate = sums.get("seen", 0) * self.world / (carried + time.perf_counter() - t0)
                bar.set_postfix(loss=f"{sums.get('loss', 0.0) / seen:.4f}", img_s=f"{rate:.0f}")
                bar.update(1)
                if c.log_every and self.step % c.log_every == 0:
                    self.step_log.append({"step": self.step, "epoch": self.epoch + 1,
                                          "lr": self._lr(), **self._train_record(sums)})
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.pos < batches:
                    self.partial = {**sums, "seconds": carried + time.perf_counter() - t0}
                    self.save("last")
            bar.close()
            self.stopped = self._end_of_epoch(sums, carried + time.perf_counter() - t0,
                                              self.pos >= batches)
        return self.finish()

    def _train_record(self, sums: dict) -> dict:
        seen = max(sums.get("seen", 0), 1)
        rec = {f"train_{k}": v / seen for k, v in sums.items() if k.endswith("loss")}
        return {**rec, **self.task.train_metrics(sums)}

    def _reduce(self, sums: dict) -> dict:
        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        old = self.best[self.task.monitor]
        return value > old if self.task.mode == "max" else value < old

    def _end_of_epoch(self, sums: dict, train_time: float, epoch_done: bool) -> bool:
        """Evaluate, select, checkpoint and log; ``True`` when training should stop."""
        sums = self._reduce(sums)
        seen = sums.get("seen", 0)
        rec = {"epoch": self.epoch + 1, "step": self.step, "complete_epoch": epoch_done,
               "lr": self._lr(), "train_seconds": round(train_time, 2),
               "train_images_per_s": round(seen / max(train_time, 1e-9), 1),
               **self._train_record(sums), **self.task.validate(),
               "skipped_batches": self.skipped, "device": str(self.device), "ranks": self.world}
        self.history.append(rec)
        self.partial = {"seconds": 0.0}  # this record holds everything since the previous one
        improved = self._better(rec[self.task.monitor])
        self.since_best = 0 if improved else self.since_best + 1
        if epoch_done:
            self.epoch, self.pos = self.epoch + 1, 0
        patience = self.cfg.patience is not None and self.since_best >= self.cfg.patience
        stop = self.task.should_stop(rec) or patience
        self.stopped = stop
        if improved:
            self.best = {"epoch": rec["epoch"], "step": self.step,
                         **{k: v for k, v in rec.items() if k.startswith("val_")}}
            self.save("best")
        self.save("last")
        if self.out is not None and self.is_main:
            _write_lines(self.out / "metrics.jsonl", self.history)
            if self.step_log:
                _write_lines(self.out / "steps.jsonl", self.step_log)
        if self.is_main:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in rec.items()
                               if k.startswith(("train_", "val_")) and isinstance(v, float)
                               and k not in ("train_images_per_s", "train_seconds"))
            print(f"epoch {rec['epoch']} step {self.step}: {shown}{' (best)' if improved else ''}"
                  f" | {rec['train_images_per_s']:.0f} img/s"
                  + (f" | no improvement for {self.since_best} evaluations: stop" if patience else ""),
                  file=sys.stderr)
        if self.world > 1:
            dist.barrier()  # checkpoints are complete before any rank reads them
        return stop

    def best_module(self) -> torch.nn.Module:
        """A copy of the module with the best weights (chosen on validation), in eval mode."""
        module = copy.deepcopy(self.module)
        if self.out is not None:
            load_model_weights(module, load_checkpoint(self.out / "best")[1], "best checkpoint")
        elif self.best_state is not None:
            module.load_state_dict(self.best_state)
        return module.eval()

    def finish(self) -> dict:
        """The task's report plus the run's counters, written to ``summary.json``."""
        summary = {"task": type(self.task).__name__, **self.task.spec(), "steps": self.step,
                   "best": self.best, "skipped_batches": self.skipped,
                   "train_seconds": round(sum(h["train_seconds"] for h in self.history), 2),
                   "ranks": self.world, **self.task.summary(self)}
        if self.out is not None and self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _write_lines(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
