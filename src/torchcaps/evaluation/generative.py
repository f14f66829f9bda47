"""Scores of generated images in the feature space of a frozen classifier.

Letter legend: ``N`` real samples, ``M`` generated samples, ``F`` features, ``k``
neighbours.

* Frechet distance (Heusel et al. 2017): the distance between Gaussians fitted to the
  features of real and generated images,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``, computed by torchmetrics'
  ``FrechetInceptionDistance`` with a custom feature module (:class:`PrecomputedFeatures`,
  the features being computed once by the classifier), in float64. Called FD here, not
  FID: the features are not Inception's, so values are comparable only between runs that
  use the same classifier.
* Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models"): each sample set approximates its manifold by the
  union of balls around its points, the radius of a ball being the distance to the
  point's ``k``-th nearest neighbour within its own set (``k = 3`` in the paper).
  Precision is the share of generated samples inside the real manifold, recall the share
  of real samples inside the generated one.
* Confident share: the share of generated images the classifier labels with softmax
  probability >= 0.9; for a class-conditional generator also the share labelled as the
  class asked for (``label_agreement``).

The feature classifier (:func:`feature_classifier`) is a small ``cnn_baseline`` trained by
:func:`torchcaps.train.train` on the dataset itself, once, and cached as a checkpoint under
the data directory (``feature-classifiers/<dataset>-cnn_baseline-<settings digest>``,
with ``classifier.json`` recording its settings, test accuracy and the equivalent
``torchcaps train`` command); its features are the activations of the last hidden layer.
Default network (``FEATURE_CLASSIFIER_KWARGS``): three 5x5 convolutions of 16, 16 and 8
channels, hidden layers of 128 and 64 units (64 features), 3 epochs of Adam at 1e-3,
batch 128, no augmentation, seed 0 (on the bundled mnist-mini: 93.4% test accuracy, about
a minute on one CPU thread).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "FEATURE_CLASSIFIER_KWARGS",
    "FeatureClassifier",
    "PrecomputedFeatures",
    "feature_classifier",
    "classifier_dir",
    "frechet_distance",
    "knn_radii",
    "precision_recall",
    "confident_share",
    "score_features",
    "save_image_grid",
    "save_training_curves",
]

#: the feature classifier's ``cnn_baseline`` arguments (64 features)
FEATURE_CLASSIFIER_KWARGS = {"conv_channels": [16, 16, 8], "hidden": [128, 64]}
_CLASSIFIER_TRAINING = {"lr": 1e-3, "batch_size": 128, "augment": "none"}
CONFIDENT = 0.9  # softmax probability at which a label counts as confident


# ---------------------------------------------------------------------- feature classifier
class FeatureClassifier(nn.Module):
    """A frozen classifier seen as a feature extractor (always in eval mode).

    Args:
        model: a trained :class:`~torchcaps.models.CNNBaseline`.
        finish: the dataset's normalisation of ``[0, 1]`` images (``Split.finish``), or None.
        info: what :func:`feature_classifier` records about it (checkpoint, accuracy, command).

    Shape:
        images ``(N, C, H, W)`` in ``[0, 1]`` -> features ``(N, F)`` (``forward``) or
        logits ``(N, K)`` (:meth:`logits`).
    """

    def __init__(self, model: nn.Module, finish=None, info: dict | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.finish = finish
        self.info = dict(info or {})
        self.num_features = int(model.hidden[-2].out_features if len(model.hidden)
                                else model.classifier.in_features)

    def train(self, mode: bool = True) -> FeatureClassifier:
        return super().train(False)  # frozen: batch statistics and dropout never change

    def _hidden(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self.finish is None else self.finish(images)
        x = self.model.features(x)  # (N, C3, H, W)
        return self.model.hidden(x.flatten(1))  # (N, F)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._hidden(images)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self._hidden(images))  # dropout is off in eval mode

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(N, F)`` and class probabilities ``(N, K)`` of ``[0, 1]`` images, in
        batches, on the classifier's device; returned on the CPU."""
        device = next(self.model.parameters()).device
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            h = self._hidden(x)
            feats.append(h.float().cpu())
            probs.append(torch.softmax(self.model.classifier(h), dim=1).float().cpu())
        f = feats[0].new_empty(0, self.num_features) if not feats else torch.cat(feats)
        return f, (torch.cat(probs) if probs else torch.empty(0, self.model.num_classes))


def _settings_digest(dataset: str, epochs: int, max_steps: int | None, model_kwargs: dict,
                     seed: int) -> str:
    key = json.dumps({"dataset": dataset, "epochs": epochs, "max_steps": max_steps,
                      "model_kwargs": model_kwargs, "seed": seed, **_CLASSIFIER_TRAINING},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def classifier_dir(data_dir=None, dataset: str = "mnist-mini", epochs: int = 3,
                   max_steps: int | None = None, model_kwargs: dict | None = None,
                   seed: int = 0) -> Path:
    """Where :func:`feature_classifier` keeps the classifier of these settings."""
    from ..data import cache_dir

    kwargs = FEATURE_CLASSIFIER_KWARGS if model_kwargs is None else model_kwargs
    name = re.sub(r"[^A-Za-z0-9+_.-]", "_", dataset)[:40]
    digest = _settings_digest(dataset, epochs, max_steps, kwargs, seed)
    return cache_dir(data_dir) / "feature-classifiers" / f"{name}-cnn_baseline-{digest}"


def _command(dataset, data_dir, epochs, max_steps, kwargs, seed, out) -> str:
    t = _CLASSIFIER_TRAINING
    parts = ["torchcaps", "train", "--model", "cnn_baseline", "--model-kwargs",
             f"'{json.dumps(kwargs)}'", "--dataset", dataset, "--epochs", str(epochs),
             "--lr", f"{t['lr']:g}", "--batch-size", str(t["batch_size"]), "--augment",
             t["augment"], "--seed", str(seed), "--out", str(out)]
    if max_steps is not None:
        parts += ["--max-steps", str(max_steps)]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    return " ".join(parts)


def _finish_of(dataset: str, data_dir, data=None):
    from ..data import load_dataset

    train = (data if data is not None else load_dataset(dataset, data_dir)).train
    plain = train.mean is None and not train.standardize
    return None if plain else train.finish


def feature_classifier(data_dir=None, dataset: str = "mnist-mini", *, epochs: int = 3,
                       max_steps: int | None = None, model_kwargs: dict | None = None,
                       seed: int = 0, threads: int | None = None, device: str = "cpu",
                       progress: bool = False, data=None) -> FeatureClassifier:
    """The frozen feature classifier of ``dataset``: trained on first use, then loaded.

    Trains ``cnn_baseline`` (``model_kwargs``, default :data:`FEATURE_CLASSIFIER_KWARGS`)
    with :func:`torchcaps.train.train` for ``epochs`` (and at most ``max_steps`` steps) on
    the dataset's training split, the checkpoint chosen on its validation split, and keeps
    it in :func:`classifier_dir`; an interrupted training is resumed. Later calls load the
    checkpoint (``best``). The call that trained it and the test accuracy are in
    ``.info`` (and ``classifier.json``). ``data``: the loaded splits of ``dataset``, if at
    hand (only their normalisation is read).
    """
    from ..train import TrainConfig, build_model_from_checkpoint, train
    from ..train.checkpoint import CheckpointError

    kwargs = dict(FEATURE_CLASSIFIER_KWARGS if model_kwargs is None else model_kwargs)
    out = classifier_dir(data_dir, dataset, epochs, max_steps, kwargs, seed)
    record = out / "classifier.json"
    if not (record.is_file() and (out / "best.json").is_file()):
        t = _CLASSIFIER_TRAINING
        cfg = TrainConfig(model="cnn_baseline", model_kwargs=kwargs, dataset=dataset,
                          data_dir=None if data_dir is None else str(data_dir), epochs=epochs,
                          max_steps=max_steps, batch_size=t["batch_size"], lr=t["lr"],
                          augment=t["augment"], seed=seed, out=str(out), progress=progress,
                          threads=threads, device=device,
                          overwrite=not (out / "last.json").is_file())
        summary = train(cfg, resume=(out / "last.json").is_file())
        info = {"dataset": dataset, "model": "cnn_baseline", "model_kwargs": kwargs,
                "epochs": epochs, "max_steps": max_steps, "seed": seed, **t,
                "test_accuracy": summary["test_accuracy"],
                "checkpoint": str(out / "best.json"),
                "command": _command(dataset, data_dir, epochs, max_steps, kwargs, seed, out)}
        record.write_text(json.dumps(info, indent=2) + "\n")
    info = json.loads(record.read_text())
    try:
        model, _ = build_model_from_checkpoint(out / "best", device)
    except CheckpointError as e:
        raise CheckpointError(f"the cached feature classifier in {out} is unreadable ({e}); "
                              "delete that directory to train it again") from None
    return FeatureClassifier(model, _finish_of(dataset, data_dir, data), info)


# ---------------------------------------------------------------------- scores
class PrecomputedFeatures(nn.Module):
    """The feature module handed to torchmetrics when features are already computed:
    ``(N, F)`` -> ``(N, F)``, with ``num_features = F``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (N, F)")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    return x


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, F)``, ``(M, F)``,
    by torchmetrics' ``FrechetInceptionDistance`` (float64) with a custom feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _check_features(real_features, "real_features").double().cpu()
    fake = _check_features(fake_features, "fake_features").double().cpu()
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    # tiny negative values are round-off of a zero distance
    return max(float(metric.compute()), 0.0)


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """Rows of ``cdist(a, b)`` in chunks of ``chunk`` rows: yields ``(start, (n, M))``."""
    for i in range(0, len(a), chunk):
        yield i, torch.cdist(a[i:i + chunk], b)


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each sample to its ``k``-th nearest neighbour in the same set ``(N,)``
    (the sample itself excluded)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, {n - 1}] for {n} samples, got {k}")
    out = features.new_empty(n)
    for i, d in _pairwise(features, features, chunk):
        out[i:i + len(d)] = d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the sample itself
    return out


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of ``points`` within ``radii[j]`` of some ``centres[j]``."""
    inside = 0
    for _, d in _pairwise(points, centres, chunk):  # (n, M)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated samples.

    Returns:
        ``(precision, recall)``: the share of generated samples within the ``k``-NN balls
        of the real samples, and the share of real samples within those of the generated.
    """
    real = _check_features(real_features, "real_features")
    fake = _check_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(real.dtype, fake.dtype), torch.float32)
    real, fake = real.to(dtype), fake.to(dtype)  # float64 stays float64
    precision = _coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def confident_share(probs: torch.Tensor, threshold: float = CONFIDENT) -> float:
    """Share of rows of class probabilities ``(M, K)`` whose largest entry is >= ``threshold``."""
    if probs.shape[0] == 0:
        return math.nan
    return float((probs.max(dim=1).values >= threshold).float().mean())


def score_features(real_features: torch.Tensor, fake_features: torch.Tensor,
                   fake_probs: torch.Tensor, k: int = 3, labels: torch.Tensor | None = None) -> dict:
    """All scores of generated samples: ``fd``, ``precision``, ``recall``, ``confident``
    and, given the classes the samples were generated for, ``label_agreement`` (the
    share the classifier labels as asked)."""
    precision, recall = precision_recall(real_features, fake_features, k)
    out = {"fd": frechet_distance(real_features, fake_features), "precision": precision,
           "recall": recall, "confident": confident_share(fake_probs)}
    if labels is not None:
        out["label_agreement"] = float((fake_probs.argmax(1) == labels.cpu()).float().mean())
    return out


# ---------------------------------------------------------------------- pictures
def save_image_grid(path, images: torch.Tensor, nrow: int = 8, scale: int = 2) -> Path:
    """Write ``[0, 1]`` images ``(N, C, H, W)`` as one PNG grid (``nrow`` per row, 1 px gaps,
    each pixel ``scale`` x ``scale``); grey for one channel, RGB for three."""
    from matplotlib.image import imsave

    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to draw")
    cols = min(nrow, n)
    rows = -(-n // cols)
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c == 3:
        imsave(path, canvas.permute(1, 2, 0).numpy())
    else:
        imsave(path, canvas.mean(0).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    return path


def save_training_curves(path, history: list[dict], title: str = "") -> Path:
    """Plot the engine's per-evaluation records: the two training losses and the validation
    Frechet distance against the step, side by side."""
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    for key, name in (("train_discriminator_loss", "discriminator"),
                      ("train_generator_loss", "generator")):
        vals = [h.get(key, math.nan) for h in history]
        left.plot(steps, vals, marker="o", label=name)
    left.set_xlabel("step")
    left.set_ylabel("training loss (epoch mean)")
    left.legend()
    right.plot(steps, [h.get("val_fd", math.nan) for h in history], marker="o", color="C2")
    right.set_xlabel("step")
    right.set_ylabel("validation Frechet distance")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
