"""The settings of one training job, shared by every task."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["TrainConfig"]

_DEFAULT_EPOCHS = {"mnist-mini": 3, "mnist": 10}
SEED_LIMIT = 2**32  # seeds are combined with epoch and batch numbers in 64-bit integers
LR_LIMIT = 1e3  # above this every optimiser diverges at once; refuse rather than overflow
AUGMENT_CHOICES = ("shift", "efficient", "none", "cifar", "norb")  # torchcaps.data.recipes


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclass
class TrainConfig:
    model: str = "capsnet"  # registered model name
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments
    dataset: str = "mnist-mini"  # see torchcaps.data.list_datasets()
    data_dir: str | None = None  # cache directory (default $TORCHCAPS_HOME or ~/.cache/torchcaps)
    val_size: int | None = None  # validation images carved from training (dataset default)
    split_seed: int = 0  # seed of the train/validation carve
    epochs: int | None = None  # dataset default when None
    # the global batch: split evenly across ranks in a distributed run (Sabour et al.: 128)
    batch_size: int = 128
    optimizer: str = "adam"  # any torch.optim class, by name (case-insensitive)
    optimizer_kwargs: dict = field(default_factory=dict)  # e.g. {"momentum": 0.9} for sgd
    lr: float = 1e-3  # Adam, Sabour et al.
    lr_decay: float = 0.96  # exponential decay factor ...
    lr_decay_steps: int = 2000  # ... per this many steps (continuous, as the official code)
    lr_staircase: bool = False  # decay in whole steps of lr_decay_steps (Keras per-epoch)
    lr_min: float = 0.0  # floor of the learning rate (Efficient-CapsNet: 5e-5)
    # step decay on top of the exponential one: the rate is multiplied by lr_gamma once for
    # every milestone (a count of completed steps, increasing) already reached
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    max_shift: int = 2  # random shift augmentation, pixels (augment="shift" only)
    # training augmentation recipe (torchcaps.data.recipes): "shift": random shift of up to
    # max_shift px (Sabour et al.); "efficient": the Efficient-CapsNet pipeline; "none";
    # "cifar": pad-4 random crop + flip; "norb": random crop + brightness/contrast (EM paper)
    augment: str = "shift"
    seed: int = 0  # model init, data order, augmentation
    max_steps: int | None = None  # stop after this many optimisation steps in total
    patience: int | None = None  # stop after this many evaluations without improvement
    out: str | None = "runs/capsnet"  # run directory; None: nothing written to disk
    overwrite: bool = False  # replace an earlier run in `out` instead of refusing
    eval_batch_size: int | None = None  # evaluation batch (default: batch_size; bounds memory)
    checkpoint_every: int = 0  # also save `last` every N steps (0: at epoch ends only)
    log_every: int = 0  # also log training metrics every N steps to steps.jsonl (0: off)
    progress: bool = True  # show a progress bar
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or "auto" (CUDA when available)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) (applied by train())
    threads: int | None = None  # torch intra-op threads (applied by train(); resume needs the same)
    precision: str = "fp32"  # "bf16": bfloat16 autocast for forward and loss (CPU or CUDA)
    force_precision: bool = False  # run bf16 even where the CPU has no native bf16 (slow)
    # torch.compile the training forward pass (static shapes; the first step of each batch
    # size compiles, about a minute). Same maths, fewer kernel launches: worth it on a GPU
    compile: bool = False
    nonfinite: str = "stop"  # on a NaN/Inf loss, gradient or activation: "stop" or "skip"

    @classmethod
    def from_recipe(cls, model: str, **overrides) -> TrainConfig:
        """A config for ``model`` with its registered training recipe, then ``overrides``.

        The recipe is ``torchcaps.models.get_model_cfg(model).recipe``; each override replaces
        the recipe's value (``model_kwargs`` as a whole), and fields neither sets keep this
        class's defaults. ``out`` defaults to ``runs/MODEL``, as on the command line::

            cfg = TrainConfig.from_recipe("efficient_capsnet", dataset="mnist", epochs=20)
            cfg.batch_size, cfg.augment   # (16, "efficient"), from Mazzia et al.'s code
        """
        from ..models import get_model_cfg

        settings = {"out": f"runs/{model}", **get_model_cfg(model).recipe_kwargs(), **overrides}
        return cls(model=model, **settings)

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = _DEFAULT_EPOCHS.get(self.dataset, 10)
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        if isinstance(self.lr_milestones, list):  # as read back from a JSON manifest
            self.lr_milestones = tuple(self.lr_milestones)
        ms = self.lr_milestones

        def finite(v, low, high):
            return isinstance(v, (int, float)) and math.isfinite(v) and low < v <= high

        checks = {
            "epochs": _is_int(self.epochs, 1), "batch_size": _is_int(self.batch_size, 1),
            "lr": finite(self.lr, 0, LR_LIMIT), "lr_decay": finite(self.lr_decay, 0, 1),
            "lr_decay_steps": _is_int(self.lr_decay_steps, 1), "max_shift": _is_int(self.max_shift),
            "max_steps": self.max_steps is None or _is_int(self.max_steps, 1),
            "patience": self.patience is None or _is_int(self.patience, 1),
            "eval_batch_size": _is_int(self.eval_batch_size, 1),
            "checkpoint_every": _is_int(self.checkpoint_every),
            "log_every": _is_int(self.log_every),
            "nonfinite": self.nonfinite in ("stop", "skip"),
            "threads": self.threads is None or _is_int(self.threads, 1),
            "precision": self.precision in ("fp32", "bf16"),
            "augment": self.augment in AUGMENT_CHOICES,
            "lr_min": isinstance(self.lr_min, (int, float)) and 0 <= self.lr_min <= self.lr,
            "lr_milestones": isinstance(ms, tuple) and all(_is_int(m, 1) for m in ms)
            and all(a < b for a, b in zip(ms, ms[1:])),
            "lr_gamma": finite(self.lr_gamma, 0, 1),
            "seed": _is_int(self.seed) and self.seed < SEED_LIMIT,
            "split_seed": _is_int(self.split_seed) and self.split_seed < SEED_LIMIT,
            "optimizer": isinstance(self.optimizer, str) and bool(self.optimizer),
            "optimizer_kwargs": isinstance(self.optimizer_kwargs, dict),
            "model_kwargs": isinstance(self.model_kwargs, dict),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            listed = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            hint = ""
            if "seed" in bad or "split_seed" in bad:
                hint = f" (seeds are integers in [0, {SEED_LIMIT - 1}])"
            elif "lr" in bad:
                hint = f" (the learning rate must be a finite number in (0, {LR_LIMIT:g}])"
            raise ValueError(f"invalid training settings: {listed}{hint}")
