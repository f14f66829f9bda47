"""Robustness suites of Sabour, Frosst, Hinton 2017 (arXiv 1710.09829): affNIST and MultiMNIST.

Each suite builds its data from MNIST (``mnist`` or the bundled ``mnist-mini``), trains a
registered model, evaluates it, and writes ``report.json`` (plus checkpoints, and figures
for MultiMNIST) into ``out_dir``. ``torchcaps evaluate --suite affnist|multimnist`` runs
them from the command line.

affNIST (paper Sec. 5.2)
------------------------

Data, all on a 40x40 canvas:

* training: the MNIST training split minus a validation part (``load_dataset``'s carve).
  Each 28x28 digit is zero-padded by 6 px to 40x40 and the trainer's random-shift
  augmentation with ``max_shift=6`` moves it by ``[-6, 6]`` px per axis, so every batch
  places each digit uniformly at random at one of the 13 x 13 positions that keep it
  inside the canvas, drawn afresh every epoch (the same distribution as
  :func:`torchcaps.data.affnist.place_on_canvas`; the authors' released generator does the
  same with ``pad=6, shift=6``). The shift generator is the trainer's, so runs resume exactly.
* validation: the validation digits placed once at random (``make_translated_mnist``,
  seed ``test_seed + 2``).
* translated test: the MNIST test digits placed once at random (seed ``test_seed``).
* affine test: :func:`torchcaps.data.make_affnist_test` on the MNIST test digits (seed
  ``test_seed + 1``): a *regenerated* affNIST-style set (rotation within 20 degrees, shear,
  per-axis scale 0.8-1.2, translation inside the canvas), not the official affNIST files.

Stopping rule. The paper trains "until it reached 99.23% accuracy on the expanded MNIST
test set" and then reports accuracy on affNIST, i.e. it stops on the *translated test set*.
``stop_on="test"`` (the default) follows that protocol: after every epoch the model is
evaluated on the translated test set and training stops as soon as its accuracy reaches
``target`` (or at ``max_epochs`` / ``max_steps``). ``stop_on="val"`` applies the same rule
to the translated validation set instead, which keeps the test set out of the stopping
decision. Either way the report records both accuracies after every epoch, and the model
evaluated at the end is the model *at the stopping point* (the ``last`` checkpoint), not
the trainer's best-on-validation checkpoint. ``target_reached`` says whether the target was
hit; a run that ends on its budget without reaching it is not the paper's protocol and the
table must say so. The check runs at epoch ends (and when ``max_steps`` ends a partial
epoch), so the stopping point has a granularity of one epoch; the paper does not say how
often it checked. Each check costs one pass over the translated test set (10,000 images)
on top of the trainer's validation pass. The trainer's ``best`` checkpoint (best
validation accuracy) is written too but not used by the report.

MultiMNIST (paper Sec. 6)
-------------------------

* training pairs are generated on the fly with :func:`torchcaps.data.make_multimnist` (two
  digits of different classes, each shifted by up to 4 px, overlaid on 36x36) from the
  training digits: ``train_pairs`` fresh pairs per epoch, each batch drawn from a generator
  seeded by ``(seed, epoch, batch)``, so a resumed run sees the same pairs. The paper uses
  1,000 pairs per digit (60M examples); the default here (60,000 per epoch) is far smaller.
* validation pairs (from the validation digits) and test pairs (from the MNIST test
  digits, ``test_pairs`` of them, 10,000 by default) are generated once from fixed seeds.
* loss: for capsule models, the two-label margin loss (Eq. 4 with both digits as
  positives) on the class-capsule lengths, plus, when the model has a decoder, the
  reconstruction of each digit separately from its own (true-class) capsule against that
  digit alone, weighted by the model's ``recon_weight`` (0.0005)
  (:mod:`torchcaps.train.multimnist`). ``cnn_baseline`` is built with ``multi_label=True``
  and trained with its sigmoid binary cross-entropy on the two-hot target.
* evaluation: top-2 accuracy on the test pairs (both top-scored classes must be the two
  true classes); the error is ``1 - top2_accuracy`` as in the paper. Models with a decoder
  also get ``multimnist_reconstructions.png``: inputs, the reconstructions from the two
  longest capsules separately, and both overlaid in red and green (paper Fig. 5).

The optimiser and schedule are the trainer's: Adam, lr 1e-3 decayed by 0.96 every 2,000
steps (continuously).

Shapes (letter legend: ``N`` examples, ``B`` batch, ``K`` classes):

    ==========================  =======================  ==========================
    affNIST train / tests       (N, 1, 40, 40) uint8      labels (N,) int64
    MultiMNIST images           (B, 1, 36, 36) float      labels (B, 2) int64
    MultiMNIST singles          (B, 2, 1, 36, 36) float   each digit alone
    logits                      (B, K)                    capsule lengths or scores
    ==========================  =======================  ==========================
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..bench import autocast, machine_info
from ..data import (
    DatasetSplits,
    Split,
    load_dataset,
    make_affnist_test,
    make_multimnist,
    make_translated_mnist,
)
from ..models import create_model
from ..train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from ..train.evaluate import evaluate
from ..train.lock import RunLock
from ..train.multimnist import (
    evaluate_multimnist,
    reconstruct_each,
    two_digit_reconstruction_loss,
    two_label_margin_loss,
)
from ..train.trainer import TrainConfig, Trainer, resolve_device

__all__ = ["build_affnist_data", "run_affnist_suite", "run_multimnist_suite",
           "multimnist_reconstruction_figure", "format_suite_table"]

AFFNIST_CANVAS = 40
MULTIMNIST_CANVAS = 36
_DIGIT = 28


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_common(batch_size: int, max_epochs: int, max_steps: int | None, threads: int | None,
                  precision: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive int, got {max_epochs!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


# ============================================================================ affNIST


def _pad_to_canvas(images: torch.Tensor, canvas: int) -> torch.Tensor:
    """Centre uint8 digits ``(N, 1, 28, 28)`` on a zero ``(N, 1, canvas, canvas)`` canvas."""
    n, c, h, w = images.shape
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out = torch.zeros(n, c, canvas, canvas, dtype=images.dtype)
    out[:, :, top:top + h, left:left + w] = images  # (N, 1, 28, 28) into the centre
    return out


def _translated(split: Split, seed: int, canvas: int) -> Split:
    placed, labels = make_translated_mnist(split.images[:, 0], split.labels, seed=seed,
                                           canvas=canvas)
    return Split(placed[:, None], labels)  # (N, 1, canvas, canvas)


def build_affnist_data(data: str = "mnist", data_dir: str | None = None, test_seed: int = 0,
                       split_seed: int = 0, val_size: int | None = None,
                       affine_size: int | None = None, affine_copies: int = 1
                       ) -> tuple[DatasetSplits, Split]:
    """The affNIST-protocol data: ``(splits, affine)``; see the module docstring.

    ``splits.train`` holds the digits centred on 40x40 (to be shifted by up to 6 px while
    training); ``splits.val`` and ``splits.test`` are placed at random once (fixed seeds);
    ``affine`` warps the first ``affine_size`` test digits (all when None), ``affine_copies``
    warps of each.
    """
    base = load_dataset(data, data_dir, val_size, split_seed)
    if base.in_shape[1:] != (_DIGIT, _DIGIT):
        raise ValueError(f"{data}: expected 28x28 digits, got {base.in_shape}")
    n_test = len(base.test)
    if affine_size is not None and not (isinstance(affine_size, int) and 1 <= affine_size):
        raise ValueError(f"affine_size must be a positive int or None, got {affine_size!r}")
    k = n_test if affine_size is None else min(affine_size, n_test)
    splits = DatasetSplits(
        name=f"{data}-translated{AFFNIST_CANVAS}",
        train=Split(_pad_to_canvas(base.train.images, AFFNIST_CANVAS), base.train.labels),
        val=_translated(base.val, test_seed + 2, AFFNIST_CANVAS),
        test=_translated(base.test, test_seed, AFFNIST_CANVAS),
        num_classes=base.num_classes,
    )
    warped, labels = make_affnist_test(base.test.images[:k, 0], base.test.labels[:k],
                                       seed=test_seed + 1, copies=affine_copies,
                                       canvas=AFFNIST_CANVAS)
    return splits, Split(warped[:, None], labels)


class _AffnistTrainer(Trainer):
    """The generic trainer plus a translated-test evaluation and a target-based stop."""

    def __init__(self, config: TrainConfig, data: DatasetSplits, target: float,
                 stop_on: str) -> None:
        super().__init__(config, data)
        self.target, self.stop_on = target, stop_on
        self.reached: dict | None = None  # the epoch record where the target was first met
        self.suite_history: list[dict] = []  # per evaluation: translated-test accuracy

    def _manifest(self) -> dict:
        return {**super()._manifest(), "suite": {"target": self.target, "stop_on": self.stop_on,
                                                 "reached": self.reached,
                                                 "history": self.suite_history}}

    def resume(self, path=None) -> None:
        super().resume(path)
        meta, _ = load_checkpoint(path or self.out / "last")
        saved = meta.get("config") or {}
        for key in ("dataset", "batch_size", "seed", "max_shift"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise CheckpointError(f"checkpoint was trained with {key}={saved[key]!r}, "
                                      f"not {getattr(self.cfg, key)!r}; resume with the same "
                                      "settings")
        suite = meta.get("suite") or {}
        if suite.get("stop_on", self.stop_on) != self.stop_on:
            raise CheckpointError(f"checkpoint stopped on {suite['stop_on']!r}, "
                                  f"not {self.stop_on!r}")
        self.reached = suite.get("reached")
        self.suite_history = suite.get("history", [])

    def _done(self) -> bool:
        return super()._done() or self.reached is not None

    def _end_of_epoch(self, sums: dict, train_time: float, epoch_done: bool) -> None:
        # translated-test accuracy first, so the checkpoints written by super() record it;
        # super() evaluates the validation split and appends it to self.history
        test = evaluate(self.model, self.data.test, self.cfg.eval_batch_size)
        rec = {"epoch": self.epoch + 1, "step": self.step, "complete_epoch": epoch_done,
               "translated_test_accuracy": test["accuracy"]}
        self.suite_history.append(rec)
        if self.stop_on == "test" and self.reached is None and test["accuracy"] >= self.target:
            self.reached = dict(rec)
        super()._end_of_epoch(sums, train_time, epoch_done)
        val_acc = self.history[-1]["val_accuracy"]
        if self.stop_on == "val" and self.reached is None and val_acc >= self.target:
            self.reached = {**rec, "val_accuracy": val_acc}
            self.save("last")  # so that a resumed run knows it has stopped
        print(f"  translated test acc {test['accuracy']:.4f} (target {self.target:.4f} on "
              f"{self.stop_on}{', reached' if self.reached else ''})", file=sys.stderr)

    def merged_history(self) -> list[dict]:
        """Per evaluation: epoch, step, validation and translated-test accuracy."""
        return [{**s, "val_accuracy": h["val_accuracy"]}
                for s, h in zip(self.suite_history, self.history)]

    def finish(self) -> dict:  # the suite reports itself; see run_affnist_suite
        return {}


def run_affnist_suite(
    model_name: str = "capsnet",
    data: str = "mnist",
    target: float = 0.992,
    max_epochs: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/affnist-capsnet",
    model_kwargs: dict | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    affine_size: int | None = None,
    *,
    stop_on: str = "test",
    test_seed: int = 0,
    affine_copies: int = 1,
    data_dir: str | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool = False,
    command: str | None = None,
) -> dict:
    """Train ``model_name`` on translated 40x40 MNIST, test on translated and affine digits.

    Args:
        model_name: a registered model (built with ``in_shape=(1, 40, 40)``).
        data: ``"mnist"`` or ``"mnist-mini"``.
        target: stop once the watched accuracy reaches this (paper: 99.23%).
        max_epochs, max_steps: the budget when the target is not reached.
        batch_size: training (and evaluation) batch.
        seed: model initialisation, data order and shifts.
        out_dir: run directory (checkpoints ``last``/``best``, ``metrics.jsonl``,
            ``report.json``).
        model_kwargs: extra builder arguments.
        threads: torch intra-op threads.
        precision: ``"fp32"`` or ``"bf16"`` autocast.
        affine_size: affine-test digits (first N test digits; all when None).
        stop_on: ``"test"`` (translated test set, the paper's protocol) or ``"val"``.
        test_seed: seed of the translated test placements (affine: ``+1``, validation: ``+2``).
        affine_copies: random warps per affine-test digit.
        resume: continue the run in ``out_dir`` from its ``last`` checkpoint.
        command: the command line to record in the report.

    Returns:
        the report (also written to ``out_dir/report.json``).
    """
    _check_common(batch_size, max_epochs, max_steps, threads, precision)
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"target must be an accuracy in (0, 1], got {target!r}")
    if stop_on not in ("test", "val"):
        raise ValueError(f"stop_on must be 'test' or 'val', got {stop_on!r}")
    t_wall = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    splits, affine = build_affnist_data(data, data_dir, test_seed, affine_size=affine_size,
                                        affine_copies=affine_copies)
    cfg = TrainConfig(model=model_name, model_kwargs=dict(model_kwargs or {}), dataset=data,
                      data_dir=data_dir, epochs=max_epochs, batch_size=batch_size,
                      max_shift=(AFFNIST_CANVAS - _DIGIT) // 2, seed=seed, max_steps=max_steps,
                      out=str(out_dir), progress=progress, device=device, threads=threads,
                      precision=precision)
    trainer = _AffnistTrainer(cfg, splits, float(target), stop_on)
    if resume:
        trainer.resume()
    trainer.fit()
    model = trainer.model  # the model at the stopping point (== checkpoint `last`)
    translated = evaluate(model, splits.test, cfg.eval_batch_size)
    affine_res = evaluate(model, affine, cfg.eval_batch_size)
    batches = math.ceil(len(splits.train) / batch_size)
    history = trainer.merged_history()
    last = history[-1] if history else {}
    report = {
        "suite": "affnist",
        "model": model_name,
        "model_kwargs": trainer.model_kwargs,
        "parameters": _count(model),
        "dataset": data,
        "protocol": ("train on MNIST digits placed at random on 40x40 (fresh positions every "
                     "epoch); stop when accuracy on the "
                     + ("translated test set (paper's protocol)" if stop_on == "test"
                        else "translated validation set") +
                     f" reaches {target}; evaluate the model at the stopping point"),
        "affine_set": ("regenerated from MNIST test digits with affNIST-style ranges "
                       "(torchcaps.data.make_affnist_test), not the official affNIST files"),
        "stop_on": stop_on,
        "target": float(target),
        "target_reached": trainer.reached is not None,
        "reached_at": trainer.reached,
        "epochs": round(trainer.step / batches, 3),
        "steps": trainer.step,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "train_minutes": round(sum(h["train_seconds"] for h in trainer.history) / 60, 3),
        "wall_minutes": round((time.perf_counter() - t_wall) / 60, 3),
        "translated_test_accuracy": translated["accuracy"],
        "affine_accuracy": affine_res["accuracy"],
        "val_accuracy": last.get("val_accuracy"),
        "sizes": {"train": len(splits.train), "val": len(splits.val),
                  "translated_test": len(splits.test), "affine_test": len(affine)},
        "seeds": {"seed": seed, "split_seed": 0, "translated_test_seed": test_seed,
                  "affine_seed": test_seed + 1, "val_placement_seed": test_seed + 2},
        "precision": precision,
        "threads": threads,
        "history": history,
        "checkpoint": str(Path(out_dir) / "last.safetensors"),
        "command": command,
        "machine": machine_info(),
    }
    _write_json(Path(out_dir) / "report.json", report)
    return report


# ============================================================================ MultiMNIST


def _pairs(split: Split, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` MultiMNIST examples: float images (n, 1, 36, 36), labels (n, 2), singles."""
    mm = make_multimnist(split.images, split.labels, n, seed=seed, canvas=MULTIMNIST_CANVAS)
    x = mm.images[:, None].float().div_(255.0)  # (n, 1, C, C)
    singles = mm.singles[:, :, None].float().div_(255.0)  # (n, 2, 1, C, C)
    return x, mm.labels, singles


def _batch_seed(seed: int, epoch: int, pos: int) -> int:
    return (seed * 1_000_003 + epoch) * 100_003 + pos


def _multimnist_loss(model, out, x, labels_2, singles) -> tuple[torch.Tensor, dict]:
    """Two-label margin (+ per-digit reconstruction) for capsule models, BCE for the CNN."""
    if getattr(model, "multi_label", False):
        loss, parts = model.loss(out, x, labels_2)
        return loss, {k: float(v) for k, v in parts.items()}
    if out.poses is None:
        raise ValueError(f"{type(model).__name__} has no class capsules; MultiMNIST needs a "
                         "capsule model or cnn_baseline (multi_label=True)")
    # losses in float32 even under bf16 autocast (sums over 2 x 36 x 36 pixels)
    margin = two_label_margin_loss(out.logits.float(), labels_2)
    parts = {"margin": float(margin.detach())}
    loss = margin
    if getattr(model, "decoder", None) is not None:
        recon = reconstruct_each(model, x, labels_2, poses=out.poses)  # (B, 2, 1, C, C)
        weight = float(getattr(model, "recon_weight", 0.0005))
        rl = two_digit_reconstruction_loss(recon.float(), singles, weight)
        parts["reconstruction"] = float(rl.detach())
        loss = loss + rl
    return loss, parts


@torch.inference_mode()
def multimnist_reconstruction_figure(model, images: torch.Tensor, labels_2: torch.Tensor,
                                     path: str | os.PathLike) -> Path:
    """Inputs, the reconstructions from the two longest capsules, and their overlay (PNG).

    Rows: the input pair; the digit decoded from the longest capsule alone; the digit
    decoded from the second longest alone; both overlaid (red: first, green: second).
    """
    from ..viz.figures import plt

    was_training = model.training
    model.eval()
    out = model(images)
    classes = out.logits.topk(2, dim=1).indices  # (B, 2) predicted pair
    recon = reconstruct_each(model, images, classes, poses=out.poses)  # (B, 2, 1, C, C)
    model.train(was_training)
    n = images.shape[0]
    fig, axes = plt.subplots(4, n, figsize=(n * 1.1, 4.8), squeeze=False)
    for i in range(n):
        a, b = recon[i, 0, 0].float().cpu(), recon[i, 1, 0].float().cpu()  # (C, C)
        overlay = torch.stack([a, b, torch.zeros_like(a)], -1).clamp(0, 1)  # (C, C, 3)
        panels = (images[i, 0].float().cpu(), a, b, overlay)
        for r, img in enumerate(panels):
            ax = axes[r, i]
            ax.imshow(img.numpy(), cmap=None if img.dim() == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        t, p = labels_2[i].tolist(), classes[i].tolist()
        axes[0, i].set_title(f"{t[0]},{t[1]}->{p[0]},{p[1]}", fontsize=7)
    for r, name in enumerate(("input", "capsule 1", "capsule 2", "overlay")):
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_multimnist_suite(
    model_name: str = "capsnet",
    data: str = "mnist",
    max_epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/multimnist-capsnet",
    model_kwargs: dict | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    *,
    train_pairs: int = 60_000,
    test_pairs: int = 10_000,
    val_pairs: int = 1_000,
    test_seed: int = 0,
    lr: float = 1e-3,
    lr_decay: float = 0.96,
    lr_decay_steps: int = 2000,
    data_dir: str | None = None,
    device: str = "auto",
    resume: bool = False,
    figure_examples: int = 8,
    command: str | None = None,
) -> dict:
    """Train ``model_name`` on MultiMNIST pairs and report top-2 accuracy and error.

    Args:
        model_name: a registered capsule model, or ``cnn_baseline`` (built multi-label).
        data: ``"mnist"`` or ``"mnist-mini"`` (source digits).
        max_epochs: epochs of ``train_pairs`` freshly generated pairs each.
        max_steps: stop after this many optimisation steps in total.
        out_dir: run directory (checkpoint ``last``, ``metrics.jsonl``, ``report.json``,
            ``multimnist_reconstructions.png``).
        train_pairs: pairs per epoch; ``test_pairs`` / ``val_pairs``: fixed evaluation sets.
        test_seed: seed of the test pairs (validation: ``test_seed + 1``).
        resume: continue from ``out_dir/last``.
        command: the command line to record in the report.

    Returns:
        the report (also written to ``out_dir/report.json``).
    """
    _check_common(batch_size, max_epochs, max_steps, threads, precision)
    for name, v in (("train_pairs", train_pairs), ("test_pairs", test_pairs),
                    ("val_pairs", val_pairs)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    t_wall = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    out = Path(out_dir)
    base = load_dataset(data, data_dir, None, 0)
    val_x, val_y, _ = _pairs(base.val, val_pairs, test_seed + 1)
    test_x, test_y, _ = _pairs(base.test, test_pairs, test_seed)

    kwargs = {"in_shape": [1, MULTIMNIST_CANVAS, MULTIMNIST_CANVAS],
              "num_classes": base.num_classes, **(model_kwargs or {})}
    if model_name == "cnn_baseline":
        kwargs["multi_label"] = True
    torch.manual_seed(seed)
    model = create_model(model_name, **kwargs).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    config = {"model": model_name, "model_kwargs": kwargs, "dataset": data, "seed": seed,
              "batch_size": batch_size, "max_epochs": max_epochs, "max_steps": max_steps,
              "train_pairs": train_pairs, "test_pairs": test_pairs, "val_pairs": val_pairs,
              "test_seed": test_seed, "lr": lr, "lr_decay": lr_decay,
              "lr_decay_steps": lr_decay_steps, "precision": precision}
    state = {"epoch": 0, "pos": 0, "step": 0, "history": [], "train_seconds": 0.0}

    def save() -> None:
        manifest = {"model": model_name, "model_kwargs": kwargs, "config": config,
                    "suite": "multimnist", "torch_version": torch.__version__, **state}
        save_checkpoint(out / "last", model, manifest, opt, {"torch": torch.get_rng_state()})

    batches = math.ceil(train_pairs / batch_size)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        if resume:
            meta, tensors = load_checkpoint(out / "last")
            if meta.get("model") != model_name or meta.get("model_kwargs") != kwargs:
                raise CheckpointError(f"checkpoint is for {meta.get('model')} "
                                      f"{meta.get('model_kwargs')}, not {model_name} {kwargs}")
            saved = meta.get("config") or {}
            for key in ("dataset", "batch_size", "seed", "train_pairs", "test_seed"):
                if key in saved and saved[key] != config[key]:
                    raise CheckpointError(f"checkpoint was trained with {key}={saved[key]!r}, "
                                          f"not {config[key]!r}; resume with the same settings")
            model.load_state_dict(model_state(tensors))
            opt.load_state_dict(optimizer_state(meta, tensors))
            torch.set_rng_state(rng_state(tensors)["torch"])
            for k in state:
                state[k] = meta.get(k, state[k])
        elif not (out / "last.json").exists():
            save()

        def done() -> bool:
            return state["epoch"] >= max_epochs or (
                max_steps is not None and state["step"] >= max_steps)

        while not done():
            model.train()
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "seen": 0}
            while state["pos"] < batches and not (max_steps is not None
                                                   and state["step"] >= max_steps):
                n = min(batch_size, train_pairs - state["pos"] * batch_size)
                x, y2, singles = _pairs(base.train, n,
                                        _batch_seed(seed, state["epoch"], state["pos"]))
                x, y2, singles = x.to(dev), y2.to(dev), singles.to(dev)
                for g in opt.param_groups:
                    g["lr"] = lr * lr_decay ** (state["step"] / lr_decay_steps)
                with autocast(dev, precision):
                    o = model(x)
                    loss, _ = _multimnist_loss(model, o, x, y2, singles)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"non-finite loss ({value}) at step {state['step'] + 1}; the last good "
                        f"checkpoint is {out / 'last.json'}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["loss"] += value * n
                sums["seen"] += n
                state["step"] += 1
                state["pos"] += 1
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            epoch_done = state["pos"] >= batches
            val = evaluate_multimnist(model, val_x, val_y, batch_size)
            rec = {"epoch": state["epoch"] + 1, "step": state["step"],
                   "complete_epoch": epoch_done, "train_seconds": round(seconds, 2),
                   "train_loss": sums["loss"] / max(sums["seen"], 1),
                   "val_top2_accuracy": val["top2_accuracy"]}
            state["history"].append(rec)
            if epoch_done:
                state["epoch"], state["pos"] = state["epoch"] + 1, 0
            save()
            (out / "metrics.jsonl").write_text(
                "".join(json.dumps(h) + "\n" for h in state["history"]))
            print(f"multimnist epoch {rec['epoch']} step {rec['step']}: train loss "
                  f"{rec['train_loss']:.4f} | val top-2 acc {val['top2_accuracy']:.4f}",
                  file=sys.stderr)

    test = evaluate_multimnist(model, test_x, test_y, batch_size)
    figure = None
    if getattr(model, "decoder", None) is not None and figure_examples > 0:
        k = min(figure_examples, test_pairs)
        figure = str(multimnist_reconstruction_figure(
            model, test_x[:k].to(dev), test_y[:k], out / "multimnist_reconstructions.png"))
    report = {
        "suite": "multimnist",
        "model": model_name,
        "model_kwargs": kwargs,
        "parameters": _count(model),
        "dataset": data,
        "protocol": ("pairs of digits of different classes, each shifted up to 4 px, overlaid "
                     "on 36x36; two-label loss; error = 1 - top-2 accuracy on the test pairs"),
        "paper_difference": (f"{train_pairs:,} freshly generated pairs per epoch for "
                             f"{max_epochs} epochs at most; the paper trains on 60M pairs"),
        "loss": ("sigmoid BCE on two-hot targets" if getattr(model, "multi_label", False)
                 else "two-label margin loss"
                 + (" + per-digit reconstruction" if getattr(model, "decoder", None) is not None
                    else "")),
        "epochs": round(state["step"] / batches, 3),
        "steps": state["step"],
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "train_minutes": round(state["train_seconds"] / 60, 3),
        "wall_minutes": round((time.perf_counter() - t_wall) / 60, 3),
        "top2_accuracy": test["top2_accuracy"],
        "error": test["error"],
        "at_least_one": test["at_least_one"],
        "val_top2_accuracy": state["history"][-1]["val_top2_accuracy"] if state["history"] else None,
        "sizes": {"train_pairs_per_epoch": train_pairs, "val_pairs": val_pairs,
                  "test_pairs": test_pairs},
        "seeds": {"seed": seed, "split_seed": 0, "test_seed": test_seed,
                  "val_seed": test_seed + 1},
        "precision": precision,
        "threads": threads,
        "history": state["history"],
        "figure": figure,
        "checkpoint": str(out / "last.safetensors"),
        "command": command,
        "machine": machine_info(),
    }
    _write_json(out / "report.json", report)
    return report


# ============================================================================ table


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def format_suite_table(reports: list[dict]) -> str:
    """A short fixed-width table of suite reports (affNIST and/or MultiMNIST rows)."""
    head = (f"{'suite':<11}{'model':<14}{'params':>12}{'epochs':>8}{'minutes':>9}"
            f"{'translated':>12}{'affine':>9}{'target':>8}{'top-2':>9}{'error':>8}")
    lines = [head, "-" * len(head)]
    for r in reports:
        aff = r["suite"] == "affnist"
        reached = ("yes" if r["target_reached"] else "no") if aff else "-"
        lines.append(
            f"{r['suite']:<11}{r['model']:<14}{r['parameters']:>12,}{r['epochs']:>8.2f}"
            f"{r['train_minutes']:>9.2f}"
            f"{_pct(r.get('translated_test_accuracy')) if aff else '-':>12}"
            f"{_pct(r.get('affine_accuracy')) if aff else '-':>9}{reached:>8}"
            f"{'-' if aff else _pct(r['top2_accuracy']):>9}"
            f"{'-' if aff else _pct(r['error']):>8}")
    return "\n".join(lines)

