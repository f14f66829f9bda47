"""Sparse unsupervised capsules as a task on the engine, and :func:`train_sparse_capsules`.

:class:`SparseCapsuleTask` trains :class:`~torchcaps.models.sparse_capsnet.SparseCapsNet`
(Rawlinson, Ahmed, Kowadlo 2018, arXiv 1804.06094) by reconstruction alone, on the data of
the affNIST protocol (:func:`torchcaps.evaluation.suites.build_affnist_data`, the same
sets as ``torchcaps suite affnist``):

* training: the MNIST training digits (minus the validation carve) centred on a 40x40
  canvas and moved by the engine's random shift of up to ``max_shift = 6`` px per axis, so
  every epoch places each digit afresh, uniformly at one of the 13 x 13 positions that keep
  it inside the canvas (the release writes all 169 shifts of every digit, ``--shift=6
  --pad=6``: the same distribution). Labels are never used for training.
* validation: the validation digits placed once at random (seed ``test_seed + 2``).
* translated test: the MNIST test digits placed once at random (seed ``test_seed``).
* affine test: :func:`torchcaps.data.make_affnist_test` on the MNIST test digits (seed
  ``test_seed + 1``), a *regenerated* affNIST-style set, not the official affNIST files.
* probe digits: ``max(probe_train, summary_train)`` training digits chosen once (seed
  ``test_seed + 3``) and placed once at random (seed ``test_seed + 4``), or centred
  (``probe_placement="centre"``, as the release encodes its training digits: its encoder
  reads the training set with the shift set to 0). The validation probe uses the first
  ``probe_train`` of them, the summary the first ``summary_train``.

Selection. The loss (the model's per-image sum of squared errors) says nothing about how
useful the codes are, so after every epoch a *probe* classifier (``probe``, linear by
default) is fitted on the codes of the ``probe_train`` probe digits and scored on the
codes of the validation digits: ``val_probe_accuracy`` selects the checkpoint (higher is
better). ``val_reconstruction_loss`` is recorded beside it.

Summary. The selected checkpoint's codes of the ``summary_train`` probe digits fit each
classifier of ``summary_probes``; each is scored on the translated and on the affine test
set, side by side. The classifiers (:data:`PROBES`, scikit-learn):

* ``"logistic"``: the release's logistic regression (L2, ``C=100``, liblinear, one
  versus rest, ``tol=1e-3``), a linear probe;
* ``"linear_svm"``: standardised codes, ``LinearSVC`` (``C=1``), a linear probe;
* ``"svm"``: the release's classifier, ``SVC`` with an RBF kernel (``C=100``,
  ``gamma=0.1``, ``tol=1e-3``), on the codes as they are; the paper's 90% on affNIST is
  this classifier's, fitted on the codes of the 60,000 centred MNIST training digits.

Shapes: images ``(N, 1, 40, 40)`` uint8 (stored) / float in ``[0, 1]`` (seen); codes
``(N, J * D)`` float32; labels ``(N,)`` int64.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import DatasetSplits, Split, augment_batch
from ..models.sparse_capsnet import SparseCapsNet, sparse_capsnet
from .checkpoint import CheckpointError
from .config import TrainConfig
from .task import Task

__all__ = ["SparseCapsuleSettings", "SparseCapsuleTask", "train_sparse_capsules",
           "sparse_capsule_config", "load_sparse_capsnet", "encode_images", "make_probe",
           "probe_accuracy", "export_codes", "PROBES", "MODEL_NAME", "CODE_SPLITS"]

#: the name checkpoints record for :class:`~torchcaps.models.sparse_capsnet.SparseCapsNet`
MODEL_NAME = "sparse_capsnet"
#: the probe classifiers (see the module docstring)
PROBES = ("logistic", "linear_svm", "svm")
PLACEMENTS = ("random", "centre")
#: the sets :func:`export_codes` encodes
CODE_SPLITS = ("train", "val", "test", "affine")
_DIGIT = 28  # MNIST digits are 28x28


@dataclass
class SparseCapsuleSettings:
    """What a sparse-capsule job adds to :class:`~torchcaps.train.TrainConfig`.

    Attributes:
        probe: the classifier of the validation probe that selects the checkpoint.
        probe_train: probe digits the validation probe is fitted on.
        probe_val: validation digits it is scored on (``None``: all).
        summary_train: probe digits the summary's classifiers are fitted on.
        summary_probes: the classifiers the summary fits and scores.
        probe_placement: ``"random"`` (placed once at random) or ``"centre"`` (centred, as
            the release encodes training digits).
        affine_size: test digits warped into the affine test set (``None``: all).
        affine_copies: random warps per affine-test digit.
        test_seed: seed of the placements (translated test; affine ``+1``, validation
            ``+2``, probe choice ``+3``, probe placement ``+4``).
    """

    probe: str = "logistic"
    probe_train: int = 1000
    probe_val: int | None = None
    summary_train: int = 10000
    summary_probes: tuple[str, ...] = ("logistic", "svm")
    probe_placement: str = "random"
    affine_size: int | None = None
    affine_copies: int = 1
    test_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.summary_probes, (list, str)):  # as read back from JSON / typed
            self.summary_probes = ((self.summary_probes,) if isinstance(self.summary_probes, str)
                                   else tuple(self.summary_probes))

        def pos(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        bad = [f"{k}={getattr(self, k)!r}" for k in ("probe_train", "summary_train", "affine_copies")
               if not pos(getattr(self, k))]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("probe_val", "affine_size")
                if getattr(self, k) is not None and not pos(getattr(self, k))]
        if self.probe not in PROBES:
            bad.append(f"probe={self.probe!r} (one of {', '.join(PROBES)})")
        if not self.summary_probes or any(p not in PROBES for p in self.summary_probes):
            bad.append(f"summary_probes={self.summary_probes!r} (some of {', '.join(PROBES)})")
        if self.probe_placement not in PLACEMENTS:
            bad.append(f"probe_placement={self.probe_placement!r} (one of {', '.join(PLACEMENTS)})")
        if not (isinstance(self.test_seed, int) and 0 <= self.test_seed < 2**32 - 8):
            bad.append(f"test_seed={self.test_seed!r}")
        if bad:
            raise ValueError(f"invalid sparse-capsule settings: {', '.join(bad)}")

    def as_json(self) -> dict:
        """The settings as the manifest stores them (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------- probes


def make_probe(kind: str):
    """An unfitted scikit-learn classifier ``kind`` (see :data:`PROBES`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind == "logistic":
        return OneVsRestClassifier(LogisticRegression(C=100.0, solver="liblinear", tol=1e-3,
                                                      random_state=0))
    if kind == "linear_svm":
        return make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=10_000, random_state=0))
    if kind == "svm":
        return SVC(kernel="rbf", C=100.0, gamma=0.1, tol=1e-3)
    raise ValueError(f"unknown probe {kind!r}; choose from {', '.join(PROBES)}")


def probe_accuracy(kind: str, train_codes: torch.Tensor, train_labels: torch.Tensor,
                   tests: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Fit probe ``kind`` on ``(codes, labels)`` and return its accuracy on each named test."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    probe = make_probe(kind)
    with warnings.catch_warnings():  # a short run's codes may not separate: still a score
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_codes.numpy(), train_labels.numpy())
    return {name: float(np.mean(probe.predict(c.numpy()) == y.numpy()))
            for name, (c, y) in tests.items()}


@torch.inference_mode()
def encode_images(model: SparseCapsNet, images: torch.Tensor, batch_size: int = 256,
                  with_loss: bool = False) -> tuple[torch.Tensor, float]:
    """Codes ``(N, J * D)`` float32 on the CPU of ``images`` (uint8 or float in ``[0, 1]``),
    and (``with_loss``) the mean reconstruction loss; the model is left in its mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    codes, total = [], 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = (x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()).to(device)
        if with_loss:
            out = model(x)
            total += float(model.loss(out, x)) * len(x)
            poses = out.poses
        else:
            poses = model.latent_capsules(x)[0]
        codes.append(poses.flatten(1).float().cpu())  # (b, J * D)
    model.train(was_training)
    return torch.cat(codes), total / max(len(images), 1)


# ----------------------------------------------------------------------------- the task


def _crop_digits(canvas_images: torch.Tensor) -> torch.Tensor:
    """The 28x28 digits centred on canvases ``(N, 1, H, W)`` -> ``(N, 1, 28, 28)``."""
    h, w = canvas_images.shape[-2:]
    top, left = (h - _DIGIT) // 2, (w - _DIGIT) // 2
    return canvas_images[:, :, top:top + _DIGIT, left:left + _DIGIT]


class SparseCapsuleTask(Task):
    """Train sparse unsupervised capsules; select on a validation probe (module docstring).

    Args:
        settings: the task's settings (default :class:`SparseCapsuleSettings()`).
        data: ``(splits, affine)`` as :func:`~torchcaps.evaluation.suites.build_affnist_data`
            returns them (default: built from ``cfg.dataset`` and the settings).
    """

    monitor, mode = "val_probe_accuracy", "max"

    def __init__(self, settings: SparseCapsuleSettings | None = None,
                 data: tuple[DatasetSplits, Split] | None = None) -> None:
        self.settings = settings or SparseCapsuleSettings()
        self.data, self.affine = data if data is not None else (None, None)
        self._order: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        s, self.cfg = self.settings, cfg
        if cfg.model != MODEL_NAME:
            raise ValueError(f"the sparse-capsule task trains {MODEL_NAME!r}, not {cfg.model!r}; "
                             "build the config with sparse_capsule_config()")
        if "in_shape" in cfg.model_kwargs:
            raise ValueError("model_kwargs sets in_shape: the image shape comes from the data")
        if self.data is None:
            from ..evaluation.suites import build_affnist_data

            self.data, self.affine = build_affnist_data(
                cfg.dataset, cfg.data_dir, s.test_seed, cfg.split_seed, cfg.val_size,
                s.affine_size, s.affine_copies)
        _, h, w = self.data.in_shape
        margin = (min(h, w) - _DIGIT) // 2
        if cfg.augment != "shift" or not 0 <= cfg.max_shift <= margin:
            raise ValueError(f"the digits are moved on the {h}x{w} canvas by the random shift: "
                             f"set augment='shift' and max_shift <= {margin} ({margin}: the "
                             "affNIST protocol), e.g. with sparse_capsule_config()")
        self.model_kwargs = {"in_shape": list(self.data.in_shape), **cfg.model_kwargs}
        torch.manual_seed(cfg.seed)
        self.model = sparse_capsnet(**self.model_kwargs)
        self.module = self.model
        self._probe_digits()

    def _probe_digits(self) -> None:
        """The fixed probe digits: a seeded choice of training digits, placed once."""
        from ..data import make_translated_mnist

        s, train = self.settings, self.data.train
        g = torch.Generator().manual_seed(s.test_seed + 3)
        n = min(max(s.probe_train, s.summary_train), len(train))
        idx = torch.randperm(len(train), generator=g)[:n]
        images, labels = train.images[idx], train.labels[idx]  # centred on the canvas
        if s.probe_placement == "random":
            placed, labels = make_translated_mnist(_crop_digits(images)[:, 0], labels,
                                                   seed=s.test_seed + 4,
                                                   canvas=train.images.shape[-1])
            images = placed[:, None]  # (n, 1, C, C)
        self.probe_images, self.probe_labels = images, labels

    def spec(self) -> dict:
        return {"model": MODEL_NAME, "model_kwargs": self.model_kwargs}

    # ------------------------------------------------------------------ batches
    def num_batches(self) -> int:
        return -(-len(self.data.train) // self.cfg.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training split for ``epoch`` (seeded by seed and epoch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data.train), generator=g))
        return self._order[1]

    def batch(self, epoch: int, pos: int, generator: torch.Generator):
        b, train = self.cfg.batch_size, self.data.train
        x, _ = train.raw(self.order(epoch)[pos * b:(pos + 1) * b])  # (B, 1, C, C), centred
        return (augment_batch("shift", x, train.shape[1:], generator, self.cfg.max_shift),)

    def step(self, batch):
        (x,) = batch
        out = self.forward(x)
        yield "model", self.model.loss(out, x), {}

    # ------------------------------------------------------------------ evaluation
    def _images(self, split: str) -> Split:
        if split == "val":
            n = self.settings.probe_val
            val = self.data.val
            return val if n is None or n >= len(val) else Split(val.images[:n], val.labels[:n])
        if split == "test":
            return self.data.test
        if split == "affine":
            return self.affine
        raise ValueError(f"split must be 'val', 'test' or 'affine', got {split!r}")

    def _batch_size(self) -> int:
        return self.cfg.eval_batch_size

    def evaluate(self, split: str, module=None) -> dict:
        """Reconstruction loss and the probe's accuracy on ``split`` (``"val"``, ``"test"``
        or ``"affine"``), the probe fitted on the first ``probe_train`` probe digits."""
        model = module or self.model
        data = self._images(split)
        n = self.settings.probe_train
        train_codes, _ = encode_images(model, self.probe_images[:n], self._batch_size())
        codes, loss = encode_images(model, data.images, self._batch_size(), with_loss=True)
        acc = probe_accuracy(self.settings.probe, train_codes, self.probe_labels[:n],
                             {split: (codes, data.labels)})
        return {"reconstruction_loss": loss, "probe_accuracy": acc[split]}

    # ------------------------------------------------------------------ resume
    def state(self) -> dict:
        return {"sparse_capsules": self.settings.as_json(),
                "boost": self.model.boost.tolist(), "win_rate": self.model.win_rate.tolist()}

    def check_resume(self, manifest: dict) -> None:
        saved = (manifest.get("task_state") or {}).get("sparse_capsules")
        mine = self.settings.as_json()
        if saved is not None and saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise CheckpointError(f"the checkpoint was trained with other sparse-capsule settings "
                                  f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                                  "resume with the same settings")

    # ------------------------------------------------------------------ report
    def summary(self, trainer) -> dict:
        """The selected checkpoint's probes on the translated and affine test sets."""
        s = self.settings
        t0 = time.perf_counter()
        best = trainer.best_module().to(trainer.device)
        n = min(s.summary_train, len(self.probe_images))
        bs = self._batch_size()
        train_codes, _ = encode_images(best, self.probe_images[:n], bs)
        tests, losses = {}, {}
        for name, split in (("translated", self.data.test), ("affine", self.affine)):
            codes, losses[name] = encode_images(best, split.images, bs, with_loss=True)
            tests[name] = (codes, split.labels)
        probes = {}
        for kind in s.summary_probes:
            t1 = time.perf_counter()
            probes[kind] = probe_accuracy(kind, train_codes, self.probe_labels[:n], tests)
            probes[kind]["seconds"] = round(time.perf_counter() - t1, 2)
        return {
            "dataset": self.cfg.dataset,
            "parameters": best.parameter_counts(),
            "sparsening": best.sparsening,
            "boosting": best.boosting,
            "settings": s.as_json(),
            "probes": probes,
            "reconstruction_loss": losses,
            "boost": best.boost.tolist(),
            "win_rate": best.win_rate.tolist(),
            "test_win_share": self._win_share(best, self.data.test.images, bs),
            "sizes": {"train": len(self.data.train), "val": len(self._images("val")),
                      "probe_train": s.probe_train, "summary_train": n,
                      "translated_test": len(self.data.test), "affine_test": len(self.affine)},
            "affine_set": ("regenerated from MNIST test digits with affNIST-style ranges "
                           "(torchcaps.data.make_affnist_test), not the official affNIST files"),
            "checkpoint": str(trainer.out / "best.json") if trainer.out else None,
            "probe_seconds": round(time.perf_counter() - t0, 2),
        }

    @staticmethod
    @torch.inference_mode()
    def _win_share(model: SparseCapsNet, images: torch.Tensor, batch_size: int) -> list[float] | None:
        """Share of ``images`` each latent capsule wins (rank 0 under the current boosts)."""
        if not model.sparsening:
            return None
        model.eval()
        device = next(model.parameters()).device
        wins = torch.zeros(model.latent_caps, dtype=torch.float64)
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].float().div_(255.0).to(device)
            _, ranks, _ = model.sparsen(model.latent_capsules(x)[1])
            wins += (ranks == 0).double().sum(0).cpu()
        return (wins / max(len(images), 1)).tolist()


# ----------------------------------------------------------------------------- jobs


def sparse_capsule_config(**kwargs) -> TrainConfig:
    """A :class:`TrainConfig` for this task: the release's recipe unless overridden.

    Model ``sparse_capsnet``; digits moved by up to 6 px on the 40x40 canvas (``augment=
    "shift"``, ``max_shift=6``); Adam at 1e-3 decayed continuously by 0.96 every 2,000
    steps, floor 1e-6; batch 128; out ``runs/sparse-capsules``.
    """
    defaults = {"model": MODEL_NAME, "augment": "shift", "max_shift": 6, "lr": 1e-3,
                "lr_decay": 0.96, "lr_decay_steps": 2000, "lr_min": 1e-6, "batch_size": 128,
                "out": "runs/sparse-capsules"}
    return TrainConfig(**{**defaults, **kwargs})


def train_sparse_capsules(config: TrainConfig, settings: SparseCapsuleSettings | None = None,
                          resume: bool = False, changes: dict | None = None,
                          data: tuple[DatasetSplits, Split] | None = None) -> dict:
    """Train (or resume) sparse unsupervised capsules; returns the summary (probe accuracies
    on the translated and affine test sets). ``changes`` records settings changed on resume."""
    from .classification import run_task

    return run_task(SparseCapsuleTask(settings, data), config, resume, changes)[1]


def load_sparse_capsnet(path, device: str | torch.device = "cpu") -> tuple[SparseCapsNet, dict]:
    """The model of a sparse-capsule checkpoint (eval mode, boosts restored) and its manifest."""
    from .checkpoint import load_checkpoint, load_model_weights

    meta, tensors = load_checkpoint(path)
    if meta.get("model") != MODEL_NAME:
        raise ValueError(f"{path} holds {meta.get('model')!r}, not a {MODEL_NAME} checkpoint")
    kwargs = meta.get("model_kwargs")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: model_kwargs missing from the manifest")
    model = sparse_capsnet(**kwargs)
    load_model_weights(model, tensors, str(path))
    return model.to(device).eval(), meta


def export_codes(checkpoint, split: str = "test", dataset: str | None = None,
                 placement: str = "random", seed: int = 0, limit: int | None = None,
                 data_dir: str | None = None, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> dict:
    """Codes and labels of one set, encoded by a sparse-capsule checkpoint.

    Args:
        checkpoint: the checkpoint (``.json``, ``.safetensors`` or their prefix).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"affine"``.
        dataset: a dataset name (default: the run's). 28x28 digits are placed on the
            model's canvas as the run placed them: validation, translated test and affine
            test with the run's seeds (so ``"test"`` and ``"affine"`` are the sets of the
            run's summary); training digits at random (seed ``seed``) or centred
            (``placement``). A dataset whose images already have the model's shape is
            encoded as it is (no ``"affine"``).
        limit: encode only the first ``limit`` images.

    Returns:
        ``{"codes": (N, J * D) float32 array, "labels": (N,) int64 array, "info": dict}``.
    """
    from ..data import load_dataset, make_translated_mnist

    if split not in CODE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CODE_SPLITS)}, got {split!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if limit is not None and not (isinstance(limit, int) and limit > 0):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    model, meta = load_sparse_capsnet(checkpoint, device)
    cfg = meta.get("config") or {}
    settings = SparseCapsuleSettings(**((meta.get("task_state") or {}).get("sparse_capsules")
                                        or {}))
    dataset = dataset or cfg.get("dataset", "mnist")
    data_dir = data_dir if data_dir is not None else cfg.get("data_dir")
    base = load_dataset(dataset, data_dir, cfg.get("val_size"), cfg.get("split_seed", 0))
    how = "as stored"
    if tuple(base.in_shape) == model.in_shape:
        if split == "affine":
            raise ValueError(f"{dataset} already has the model's image shape {model.in_shape}: "
                             "there are no digits to warp into an affine test set")
        images, labels = getattr(base, split).images, getattr(base, split).labels
    elif split == "train":
        images, labels = base.train.images, base.train.labels
        images, labels = (images[:limit], labels[:limit]) if limit else (images, labels)
        canvas = model.in_shape[-1]
        if placement == "random":
            placed, labels = make_translated_mnist(images[:, 0], labels, seed=seed, canvas=canvas)
            images, how = placed[:, None], f"placed at random on {canvas}x{canvas} (seed {seed})"
        else:
            pad = (canvas - images.shape[-1]) // 2
            images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            how = f"centred on {canvas}x{canvas}"
    else:
        from ..evaluation.suites import build_affnist_data

        size = settings.affine_size if split == "affine" else 1
        splits, affine = build_affnist_data(dataset, data_dir, settings.test_seed,
                                            cfg.get("split_seed", 0), cfg.get("val_size"),
                                            size, settings.affine_copies)
        chosen = affine if split == "affine" else getattr(splits, split)
        images, labels = chosen.images, chosen.labels
        how = {"val": f"placed at random (seed {settings.test_seed + 2})",
               "test": f"placed at random (seed {settings.test_seed})",
               "affine": f"regenerated affine warps (seed {settings.test_seed + 1})"}[split]
    if limit:
        images, labels = images[:limit], labels[:limit]
    if tuple(images.shape[1:]) != model.in_shape:
        raise ValueError(f"{dataset} {split} images are {tuple(images.shape[1:])}; the model "
                         f"takes {model.in_shape} (or 28x28 digits to place on its canvas)")
    codes, _ = encode_images(model, images, batch_size)
    info = {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "images": how,
            "count": len(labels), "code_shape": [model.latent_caps, model.latent_dim],
            "sparsening": model.sparsening, "step": meta.get("step")}
    return {"codes": codes.numpy(), "labels": labels.numpy().astype(np.int64), "info": info}
