"""Robustness suites of Sabour, Frosst, Hinton 2017 (arXiv 1710.09829): affNIST and MultiMNIST.

Each suite builds its data from MNIST (``mnist`` or the bundled ``mnist-mini``), trains a
registered model, evaluates it, and writes ``report.json`` (plus checkpoints, and figures
for MultiMNIST) into ``out_dir``. ``torchcaps suite affnist|multimnist`` runs
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
* evaluation: top-2 accuracy on the test pairs of the weights that did best on the
  validation pairs (both top-scored classes must be the two true classes); the error is
  ``1 - top2_accuracy`` as in the paper. Models with a decoder also get
  ``multimnist_reconstructions.png``: inputs, the reconstructions from the two longest
  capsules separately, and both overlaid in red and green (paper Fig. 5).

Both suites are tasks on the training engine (:class:`AffnistTask`, :class:`MultiMNISTTask`):
the optimiser and schedule are the engine's (Adam, lr 1e-3 decayed by 0.96 every 2,000
steps, continuously), and so are checkpoints, resume, non-finite handling and the lock.

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
import os
import sys
import time
from pathlib import Path

import torch

from ..bench import machine_info
from ..data import (
    DatasetSplits,
    Split,
    load_dataset,
    make_affnist_test,
    make_multimnist,
    make_translated_mnist,
)
from ..models import create_model
from ..train import ClassificationTask, Task, TrainConfig, run_task
from ..train.checkpoint import CheckpointError
from ..train.evaluate import evaluate
from ..train.multimnist import (
    evaluate_multimnist,
    reconstruct_each,
    two_digit_reconstruction_loss,
    two_label_margin_loss,
)

__all__ = ["AffnistTask", "MultiMNISTTask", "build_affnist_data", "run_affnist_suite",
           "run_multimnist_suite", "multimnist_reconstruction_figure", "format_suite_table"]

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


# ============================================================================ affNIST


def _check_source(data: str, base: DatasetSplits) -> None:
    if base.in_shape != (1, _DIGIT, _DIGIT):
        raise ValueError(f"{data}: the suites place 1x28x28 grey images on a canvas, got "
                         f"{base.in_shape} (C, H, W)")


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
    _check_source(data, base)
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


class AffnistTask(ClassificationTask):
    """Classification on translated 40x40 digits with the paper's target-based stop.

    After every evaluation the translated test set is scored too (``translated_test_accuracy``
    in the engine's history); training stops once the watched accuracy (``stop_on``: the
    translated test set, as the paper, or validation) reaches ``target``.
    """

    def __init__(self, data: DatasetSplits, affine: Split, target: float, stop_on: str) -> None:
        super().__init__(data)
        self.affine, self.target, self.stop_on = affine, float(target), stop_on
        self.reached: dict | None = None  # the record where the target was first met

    def validate(self) -> dict:
        val = self.evaluate("val")
        test = self.evaluate("test")
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "translated_test_accuracy": test["accuracy"]}

    def should_stop(self, record: dict) -> bool:
        watched = record["translated_test_accuracy" if self.stop_on == "test" else "val_accuracy"]
        if self.reached is None and watched >= self.target:
            self.reached = {k: record[k] for k in ("epoch", "step", "complete_epoch",
                                                   "translated_test_accuracy", "val_accuracy")}
        print(f"  translated test acc {record['translated_test_accuracy']:.4f} (target "
              f"{self.target:.4f} on {self.stop_on}{', reached' if self.reached else ''})",
              file=sys.stderr)
        return self.reached is not None

    def state(self) -> dict:
        return {"target": self.target, "stop_on": self.stop_on, "reached": self.reached}

    def load_state(self, state: dict) -> None:
        self.reached = state.get("reached")

    def check_resume(self, manifest: dict) -> None:
        saved = (manifest.get("task_state") or {}).get("stop_on", self.stop_on)
        if saved != self.stop_on:
            raise CheckpointError(f"checkpoint stopped on {saved!r}, not {self.stop_on!r}")

    def summary(self, trainer) -> dict:  # the model at the stopping point, see the docstring
        translated = self.evaluate("test")
        return {"translated": translated, "affine": evaluate(self.model, self.affine,
                                                             self.cfg.eval_batch_size)}


def _suite_config(model_name, data, max_epochs, batch_size, seed, out_dir, model_kwargs,
                  max_steps, threads, precision, data_dir, device, progress, overwrite,
                  force_precision, **extra) -> TrainConfig:
    return TrainConfig(model=model_name, model_kwargs=dict(model_kwargs or {}), dataset=data,
                       data_dir=data_dir, epochs=max_epochs, batch_size=batch_size, seed=seed,
                       max_steps=max_steps, out=str(out_dir), progress=progress, device=device,
                       threads=threads, precision=precision, overwrite=overwrite,
                       force_precision=force_precision, **extra)


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
    overwrite: bool = False,
    force_precision: bool = False,
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
        overwrite: replace an earlier run in ``out_dir`` instead of refusing.
        command: the command line to record in the report.

    Returns:
        the report (also written to ``out_dir/report.json``).
    """
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"target must be an accuracy in (0, 1], got {target!r}")
    if stop_on not in ("test", "val"):
        raise ValueError(f"stop_on must be 'test' or 'val', got {stop_on!r}")
    cfg = _suite_config(model_name, data, max_epochs, batch_size, seed, out_dir, model_kwargs,
                        max_steps, threads, precision, data_dir, device, progress, overwrite,
                        force_precision, max_shift=(AFFNIST_CANVAS - _DIGIT) // 2)
    t_wall = time.perf_counter()
    splits, affine = build_affnist_data(data, data_dir, test_seed, affine_size=affine_size,
                                        affine_copies=affine_copies)
    task = AffnistTask(splits, affine, target, stop_on)
    trainer, summary = run_task(task, cfg, resume)
    history = [{k: h[k] for k in ("epoch", "step", "complete_epoch", "translated_test_accuracy",
                                  "val_accuracy")} for h in trainer.history]
    report = {
        "suite": "affnist",
        "model": model_name,
        "model_kwargs": task.model_kwargs,
        "parameters": _count(task.model),
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
        "target_reached": task.reached is not None,
        "reached_at": task.reached,
        "epochs": round(trainer.step / task.num_batches(), 3),
        "steps": trainer.step,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "train_minutes": round(summary["train_seconds"] / 60, 3),
        "wall_minutes": round((time.perf_counter() - t_wall) / 60, 3),
        "translated_test_accuracy": summary["translated"]["accuracy"],
        "affine_accuracy": summary["affine"]["accuracy"],
        "val_accuracy": history[-1]["val_accuracy"] if history else None,
        "sizes": {"train": len(splits.train), "val": len(splits.val),
                  "translated_test": len(splits.test), "affine_test": len(affine)},
        "seeds": {"seed": seed, "split_seed": 0, "translated_test_seed": test_seed,
                  "affine_seed": test_seed + 1, "val_placement_seed": test_seed + 2},
        "precision": precision,
        "threads": threads,
        "history": history,
        "checkpoint": str(Path(out_dir) / "last.json"),
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    was_training = model.training
    model.eval()
    out = model(images)
    classes = out.logits.topk(2, dim=1).indices  # (B, 2) predicted pair
    recon = reconstruct_each(model, images, classes, poses=out.poses)  # (B, 2, 1, C, C)
    model.train(was_training)
    n = images.shape[0]
    fig = Figure(figsize=(n * 1.1, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, n, squeeze=False)
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
    return path


class MultiMNISTTask(Task):
    """Overlapping digit pairs: two-label loss, top-2 accuracy (Sabour et al., Sec. 6)."""

    monitor, mode = "val_top2_accuracy", "max"

    def __init__(self, data: str, data_dir: str | None, model_name: str, model_kwargs: dict,
                 train_pairs: int, val_pairs: int, test_pairs: int, test_seed: int) -> None:
        self.data_name, self.data_dir, self.model_name = data, data_dir, model_name
        self.extra_kwargs = dict(model_kwargs)
        self.sizes = {"train_pairs": train_pairs, "val_pairs": val_pairs,
                      "test_pairs": test_pairs, "test_seed": test_seed}

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, s = cfg, self.sizes
        self.base = load_dataset(self.data_name, self.data_dir, None, 0)
        _check_source(self.data_name, self.base)
        self.val = _pairs(self.base.val, s["val_pairs"], s["test_seed"] + 1)[:2]
        self.test = _pairs(self.base.test, s["test_pairs"], s["test_seed"])[:2]
        self.model_kwargs = {"in_shape": [1, MULTIMNIST_CANVAS, MULTIMNIST_CANVAS],
                             "num_classes": self.base.num_classes, **self.extra_kwargs}
        if self.model_name == "cnn_baseline":
            self.model_kwargs["multi_label"] = True
        torch.manual_seed(cfg.seed)
        self.module = self.model = create_model(self.model_name, **self.model_kwargs)

    def spec(self) -> dict:
        return {"model": self.model_name, "model_kwargs": self.model_kwargs}

    def num_batches(self) -> int:
        return -(-self.sizes["train_pairs"] // self.cfg.batch_size)

    def batch(self, epoch: int, pos: int, generator: torch.Generator):
        b = self.cfg.batch_size
        n = min(b, self.sizes["train_pairs"] - pos * b)
        return _pairs(self.base.train, n, _batch_seed(self.cfg.seed, epoch, pos))

    def step(self, batch):
        x, labels_2, singles = batch
        loss, _ = _multimnist_loss(self.model, self.forward(x), x, labels_2, singles)
        yield "model", loss, {}

    def evaluate(self, split: str, module=None) -> dict:
        x, y = self.val if split == "val" else self.test
        return evaluate_multimnist(module or self.model, x, y, self.cfg.eval_batch_size)

    def validate(self) -> dict:
        return {"val_top2_accuracy": self.evaluate("val")["top2_accuracy"]}

    def state(self) -> dict:
        return dict(self.sizes)

    def check_resume(self, manifest: dict) -> None:
        saved = manifest.get("task_state") or {}
        for key in ("train_pairs", "test_seed"):
            if key in saved and saved[key] != self.sizes[key]:
                raise CheckpointError(f"checkpoint was trained with {key}={saved[key]!r}, not "
                                      f"{self.sizes[key]!r}; resume with the same settings")

    def summary(self, trainer) -> dict:
        self.best_model = trainer.best_module().to(trainer.device)
        return {"test": self.evaluate("test", self.best_model)}


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
    overwrite: bool = False,
    force_precision: bool = False,
    progress: bool = False,
    figure_examples: int = 8,
    command: str | None = None,
) -> dict:
    """Train ``model_name`` on MultiMNIST pairs and report top-2 accuracy and error.

    The test pairs are scored with the weights that did best on the validation pairs.

    Args:
        model_name: a registered capsule model, or ``cnn_baseline`` (built multi-label).
        data: ``"mnist"`` or ``"mnist-mini"`` (source digits).
        max_epochs: epochs of ``train_pairs`` freshly generated pairs each.
        max_steps: stop after this many optimisation steps in total.
        out_dir: run directory (checkpoints ``last``/``best``, ``metrics.jsonl``,
            ``report.json``, ``multimnist_reconstructions.png``).
        train_pairs: pairs per epoch; ``test_pairs`` / ``val_pairs``: fixed evaluation sets.
        test_seed: seed of the test pairs (validation: ``test_seed + 1``).
        resume: continue from ``out_dir/last``.
        overwrite: replace an earlier run in ``out_dir`` instead of refusing.
        command: the command line to record in the report.

    Returns:
        the report (also written to ``out_dir/report.json``).
    """
    for name, v in (("train_pairs", train_pairs), ("test_pairs", test_pairs),
                    ("val_pairs", val_pairs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    cfg = _suite_config(model_name, data, max_epochs, batch_size, seed, out_dir, model_kwargs,
                        max_steps, threads, precision, data_dir, device, progress, overwrite,
                        force_precision, lr=lr, lr_decay=lr_decay, lr_decay_steps=lr_decay_steps)
    t_wall = time.perf_counter()
    task = MultiMNISTTask(data, data_dir, model_name, model_kwargs or {}, train_pairs,
                          val_pairs, test_pairs, test_seed)
    trainer, summary = run_task(task, cfg, resume)
    test, best = summary["test"], task.best_model
    figure = None
    if getattr(best, "decoder", None) is not None and figure_examples > 0:
        k = min(figure_examples, test_pairs)
        x, y = task.test
        figure = str(multimnist_reconstruction_figure(
            best, x[:k].to(trainer.device), y[:k], Path(out_dir) / "multimnist_reconstructions.png"))
    history = [{k: h[k] for k in ("epoch", "step", "complete_epoch", "train_seconds", "train_loss",
                                  "val_top2_accuracy")} for h in trainer.history]
    report = {
        "suite": "multimnist",
        "model": model_name,
        "model_kwargs": task.model_kwargs,
        "parameters": _count(task.model),
        "dataset": data,
        "protocol": ("pairs of digits of different classes, each shifted up to 4 px, overlaid "
                     "on 36x36; two-label loss; error = 1 - top-2 accuracy on the test pairs "
                     "of the weights best on the validation pairs"),
        "paper_difference": (f"{train_pairs:,} freshly generated pairs per epoch for "
                             f"{max_epochs} epochs at most; the paper trains on 60M pairs"),
        "loss": ("sigmoid BCE on two-hot targets" if getattr(task.model, "multi_label", False)
                 else "two-label margin loss"
                 + (" + per-digit reconstruction" if getattr(task.model, "decoder", None)
                    is not None else "")),
        "epochs": round(trainer.step / task.num_batches(), 3),
        "steps": trainer.step,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "train_minutes": round(summary["train_seconds"] / 60, 3),
        "wall_minutes": round((time.perf_counter() - t_wall) / 60, 3),
        "top2_accuracy": test["top2_accuracy"],
        "error": test["error"],
        "at_least_one": test["at_least_one"],
        "val_top2_accuracy": history[-1]["val_top2_accuracy"] if history else None,
        "best": trainer.best,
        "sizes": {"train_pairs_per_epoch": train_pairs, "val_pairs": val_pairs,
                  "test_pairs": test_pairs},
        "seeds": {"seed": seed, "split_seed": 0, "test_seed": test_seed,
                  "val_seed": test_seed + 1},
        "precision": precision,
        "threads": threads,
        "history": history,
        "figure": figure,
        "checkpoint": str(Path(out_dir) / "best.json"),
        "command": command,
        "machine": machine_info(),
    }
    _write_json(Path(out_dir) / "report.json", report)
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

