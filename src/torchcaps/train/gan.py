"""Generative adversarial training as a task on the engine, and :func:`train_gan`.

:class:`GANTask` trains a registered generative pair (``list_models(task="generation")``,
:mod:`torchcaps.models.gan`) with two optimisers, ``"discriminator"`` and ``"generator"``,
both built by the engine from the config (same optimiser, rate and schedule; the DCGAN
defaults of ``torchcaps gan train`` are Adam at 2e-4 with betas (0.5, 0.999)).

One training step (``d_steps = s``):

    s times: fakes G(z_i) (no graph but for the last), discriminator update on
             D(x) against D(G(z_i).detach())                       -> "discriminator"
    once:    generator update on D(G(z_s)), the last fakes reused,
             scored by the just-updated discriminator              -> "generator"

The discriminator step leaves the generator's parameters unchanged and the generator step
the discriminator's (each optimiser owns its half of the pair; the engine zeroes that
optimiser's gradients before each backward). Batch-norm running statistics of both halves
follow every forward pass in training mode, as in DCGAN.

Batches. Batch ``pos`` of epoch ``e`` holds the real images of that position in a seeded
permutation of the training split (seed, epoch), scaled from ``[0, 1]`` to the generators'
``[-1, 1]``, their labels (used by conditional models for both real and generated images),
and the latents ``z (B, s, Z) ~ N(0, I)`` drawn from the engine's generator: a pure function
of ``(epoch, pos)`` and that generator's state, so a resumed run replays the same batches.

Selection and scores. After every epoch the generator (in eval mode) makes
``score_samples`` images from latents fixed by ``eval_seed`` (for a conditional model, the
classes in turn); ``val_fd``, the Frechet distance of their features to those of as many
validation images in the feature space of the frozen classifier
(:func:`torchcaps.evaluation.generative.feature_classifier`), selects the checkpoint
(lower is better). The summary scores the chosen checkpoint's ``test_samples`` images
(other fixed latents) against as many test images: FD, precision, recall, confident-label
share (and label agreement for conditional models), and writes ``samples.png`` and
``curves.png`` into the run directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..data import DatasetSplits, load_dataset
from ..data.transforms import center_crop
from ..models import create_model, list_models, model_task
from ..models import gan as _gan_models  # noqa: F401  (registers the generative pairs)
from .checkpoint import CheckpointError
from .config import TrainConfig
from .task import Task

__all__ = ["GANSettings", "GANTask", "train_gan", "load_gan", "score_checkpoint", "real_images"]


@dataclass
class GANSettings:
    """What a GAN job adds to :class:`~torchcaps.train.TrainConfig`.

    Attributes:
        latent_dim: ``Z``, the size of the generator's latent (Radford et al.: 100).
        conditional: class-conditional generator and discriminator (``num_classes`` = the
            dataset's classes); otherwise unconditional.
        d_steps: discriminator updates per generator update.
        score_samples: generated (and validation) images scored after every epoch.
        test_samples: generated (and test) images scored in the summary.
        grid: images in ``samples.png``.
        k: neighbours of the precision/recall manifolds (Kynkaanniemi et al.: 3).
        eval_seed: seed of the fixed latents that are scored.
        classifier_epochs, classifier_max_steps, classifier_kwargs: training budget and
            ``cnn_baseline`` arguments of the feature classifier (``None``: the default
            network of :mod:`torchcaps.evaluation.generative`).
    """

    latent_dim: int = 100
    conditional: bool = False
    d_steps: int = 1
    score_samples: int = 1000
    test_samples: int = 2000
    grid: int = 64
    k: int = 3
    eval_seed: int = 0
    classifier_epochs: int = 3
    classifier_max_steps: int | None = None
    classifier_kwargs: dict | None = None

    def __post_init__(self) -> None:
        def pos(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        bad = [f"{k}={getattr(self, k)!r}" for k in ("latent_dim", "d_steps", "grid", "k",
                                                      "classifier_epochs")
               if not pos(getattr(self, k))]
        for k in ("score_samples", "test_samples"):
            v = getattr(self, k)
            if not (pos(v) and v >= self.k + 2):
                bad.append(f"{k}={v!r} (at least k + 2 = {self.k + 2})" if pos(self.k) else
                           f"{k}={v!r}")
        if not (isinstance(self.eval_seed, int) and 0 <= self.eval_seed < 2**32):
            bad.append(f"eval_seed={self.eval_seed!r}")
        if self.classifier_max_steps is not None and not pos(self.classifier_max_steps):
            bad.append(f"classifier_max_steps={self.classifier_max_steps!r}")
        if self.classifier_kwargs is not None and not isinstance(self.classifier_kwargs, dict):
            bad.append(f"classifier_kwargs={self.classifier_kwargs!r}")
        if not isinstance(self.conditional, bool):
            bad.append(f"conditional={self.conditional!r}")
        if bad:
            raise ValueError(f"invalid GAN settings: {', '.join(bad)}")


def real_images(split, index) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in ``[0, 1]`` at the size a model sees (centre crop, no normalisation) and
    labels of ``split`` at ``index``."""
    x, y = split.raw(index)
    if split.crop is not None:
        x = center_crop(x, split.crop)
    return x, y


class GANTask(Task):
    """Train a generative pair adversarially; select on validation FD (module docstring).

    Args:
        settings: the GAN settings (default :class:`GANSettings()`).
        data: the splits to use (default: ``load_dataset(cfg.dataset, ...)``).
        classifier: the frozen feature classifier (default:
            :func:`~torchcaps.evaluation.generative.feature_classifier` of the dataset).
    """

    monitor, mode = "val_fd", "min"
    optimizers = ("discriminator", "generator")

    def __init__(self, settings: GANSettings | None = None, data: DatasetSplits | None = None,
                 classifier=None) -> None:
        self.settings = settings or GANSettings()
        self.data, self.classifier = data, classifier
        self._order: tuple[int, torch.Tensor] | None = None
        self._real: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        s, self.cfg = self.settings, cfg
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("GAN training runs in one process; start it without torchrun")
        if model_task(cfg.model) != "generation":
            raise ValueError(f"{cfg.model} is a {model_task(cfg.model)} model; GAN training takes "
                             f"the generative models: {', '.join(list_models(task='generation'))}")
        if cfg.augment != "none":
            raise ValueError("GAN training learns the images as they are; set augment='none' "
                             "in the TrainConfig")
        owned = sorted({"image_shape", "latent_dim", "num_classes"} & set(cfg.model_kwargs))
        if owned:
            raise ValueError(f"model_kwargs sets {owned}: the image shape comes from the dataset, "
                             "latent_dim and conditional from the GAN settings")
        self.prepare(cfg, device)
        d = self.data
        self.model_kwargs = {"image_shape": list(d.in_shape), "latent_dim": s.latent_dim,
                             **({"num_classes": d.num_classes} if s.conditional else {}),
                             **cfg.model_kwargs}
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, **self.model_kwargs)
        self.module = self.model

    def prepare(self, cfg: TrainConfig, device: torch.device | str = "cpu") -> None:
        """Load the data and the frozen feature classifier (trained on first use): all that
        scoring needs besides the pair."""
        s, self.cfg = self.settings, cfg
        if self.data is None:
            self.data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed)
        if self.classifier is None:
            from ..evaluation.generative import feature_classifier

            self.classifier = feature_classifier(
                cfg.data_dir, cfg.dataset, epochs=s.classifier_epochs,
                max_steps=s.classifier_max_steps, model_kwargs=s.classifier_kwargs,
                threads=cfg.threads, device=str(device), data=self.data)
        self.classifier.to(device)

    def spec(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs}

    def parameters(self, optimizer: str):
        if optimizer not in self.optimizers:
            raise ValueError(f"unknown optimizer {optimizer!r}; GAN training has {self.optimizers}")
        return getattr(self.model, optimizer).parameters()

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
        b = self.cfg.batch_size
        x, y = real_images(self.data.train, self.order(epoch)[pos * b:(pos + 1) * b])
        z = torch.randn(len(y), self.settings.d_steps, self.settings.latent_dim, generator=generator)
        return x * 2.0 - 1.0, y, z  # (B, C, H, W) in [-1, 1], (B,), (B, s, Z)

    def step(self, batch):
        x, y, z = batch
        pair, forward = self.model, self.forward
        labels = y if self.settings.conditional else None
        n = len(x)
        for i in range(self.settings.d_steps):
            last = i == self.settings.d_steps - 1
            with torch.set_grad_enabled(last):  # the last fakes keep their graph for G's step
                fake = forward(z[:, i], labels, mode="generate")  # (B, C, H, W)
            real_scores = forward(x, labels, mode="discriminate")  # (B,)
            fake_scores = forward(fake.detach(), labels, mode="discriminate")
            loss = pair.discriminator_loss(real_scores, fake_scores)
            with torch.no_grad():
                right = int((pair.real_probability(real_scores) > 0.5).sum()
                            + (pair.real_probability(fake_scores) <= 0.5).sum())
            yield "discriminator", loss, {"d_right": right, "d_judged": 2 * n}
        fake_scores = forward(fake, labels, mode="discriminate")  # the updated discriminator
        with torch.no_grad():
            fooled = int((pair.real_probability(fake_scores) > 0.5).sum())
        yield "generator", pair.generator_loss(fake_scores), {"fooled": fooled}

    def train_metrics(self, sums: dict) -> dict:
        return {"train_d_accuracy": sums.get("d_right", 0) / max(sums.get("d_judged", 0), 1),
                "train_fooled": sums.get("fooled", 0) / max(sums.get("seen", 0), 1)}

    # ------------------------------------------------------------------ evaluation
    def _split(self, split: str):
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return getattr(self.data, split)

    def _count(self, split: str) -> int:
        s = self.settings
        return min(s.score_samples if split == "val" else s.test_samples, len(self._split(split)))

    def real_features(self, split: str) -> torch.Tensor:
        """Classifier features ``(n, F)`` of the first ``n`` images of ``split`` (cached)."""
        if split not in self._real:
            x, _ = real_images(self._split(split), torch.arange(self._count(split)))
            self._real[split] = self.classifier.extract(x, self.cfg.eval_batch_size)[0]
        return self._real[split]

    def eval_labels(self, n: int) -> torch.Tensor | None:
        """The classes scored samples are generated for: ``0, 1, ..., K-1, 0, ...`` (or None)."""
        return torch.arange(n) % self.data.num_classes if self.settings.conditional else None

    def generated(self, split: str, module=None,
                  n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed-latent samples scored on ``split`` (``[0, 1]`` images) and their classes."""
        pair = module or self.model
        n = self._count(split) if n is None else n
        labels = self.eval_labels(n)
        g = torch.Generator().manual_seed(self.settings.eval_seed * 2 + (split == "test"))
        return pair.sample(n, labels, g, batch_size=self.cfg.eval_batch_size), labels

    def evaluate(self, split: str, module=None) -> dict:
        from ..evaluation.generative import score_features

        fake, labels = self.generated(split, module)
        feats, probs = self.classifier.extract(fake, self.cfg.eval_batch_size)
        return score_features(self.real_features(split), feats, probs, self.settings.k, labels)

    # ------------------------------------------------------------------ resume
    def state(self) -> dict:
        return {"gan": asdict(self.settings),
                "classifier": {k: self.classifier.info.get(k) for k in
                               ("checkpoint", "test_accuracy", "command")}}

    def check_resume(self, manifest: dict) -> None:
        saved = (manifest.get("task_state") or {}).get("gan")
        mine = asdict(self.settings)
        if saved is not None and saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise CheckpointError(f"the checkpoint was trained with other GAN settings "
                                  f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                                  "resume with the same settings")

    # ------------------------------------------------------------------ report
    def summary(self, trainer) -> dict:
        from ..evaluation.generative import save_image_grid, save_training_curves

        t0 = time.perf_counter()
        best = trainer.best_module().to(trainer.device)
        test = self.evaluate("test", best)
        out = {"dataset": self.cfg.dataset, "parameters": best.parameter_counts(),
               "settings": asdict(self.settings), "test": test,
               "test_samples": self._count("test"),
               "classifier": dict(self.classifier.info),
               "checkpoint": str(trainer.out / "best.json") if trainer.out else None}
        if trainer.out is not None and trainer.is_main:
            s = self.settings
            images, _ = self.generated("test", best, s.grid)
            k = self.data.num_classes
            out["samples_png"] = str(save_image_grid(trainer.out / "samples.png", images,
                                                     nrow=k if s.conditional else 8))
            out["curves_png"] = str(save_training_curves(
                trainer.out / "curves.png", trainer.history,
                f"{self.cfg.model} on {self.cfg.dataset}"))
        out["score_seconds"] = round(time.perf_counter() - t0, 2)
        return out


def load_gan(path, device: str | torch.device = "cpu"):
    """The generative pair of a checkpoint (eval mode) and its manifest; refuses classifiers
    and segmentation models."""
    from .checkpoint import build_model_from_checkpoint, load_checkpoint

    name = load_checkpoint(path)[0]["model"]
    if name in list_models(task=None) and model_task(name) != "generation":
        raise ValueError(f"{path} holds {name}, a {model_task(name)} model, not a generative pair")
    return build_model_from_checkpoint(path, device)  # refuses unknown models itself


def score_checkpoint(path, split: str = "test", num: int | None = None,
                     eval_seed: int | None = None, data_dir=None, device: str = "cpu",
                     threads: int | None = None) -> dict:
    """Score a GAN checkpoint as its run's summary does: FD, precision, recall, confident
    share (and label agreement) of ``num`` generated images against as many images of
    ``split``. With the defaults (the run's sample counts and ``eval_seed``) the test scores
    of the run's ``best`` checkpoint are those of its summary."""
    import dataclasses

    pair, meta = load_gan(path, device)
    state = meta.get("task_state") or {}
    settings = GANSettings(**(state.get("gan") or {}))
    if eval_seed is not None:
        settings = dataclasses.replace(settings, eval_seed=eval_seed)
    if num is not None:
        settings = dataclasses.replace(settings, score_samples=num, test_samples=num)
    saved = dict(meta.get("config") or {})
    cfg = TrainConfig(**{**saved, "out": None, "overwrite": False, "device": device,
                         "data_dir": data_dir if data_dir is not None else saved.get("data_dir"),
                         "threads": threads if threads is not None else saved.get("threads")})
    task = GANTask(settings)
    task.prepare(cfg, device)
    if tuple(task.data.in_shape) != pair.image_shape:
        raise ValueError(f"{path}: the model makes {pair.image_shape} images but {cfg.dataset} has "
                         f"{task.data.in_shape}")
    task.model = pair
    res = task.evaluate(split, pair)
    return {"checkpoint": str(path), "model": meta["model"], "dataset": cfg.dataset,
            "split": split, "samples": task._count(split), "eval_seed": settings.eval_seed,
            **res, "classifier": dict(task.classifier.info)}


def train_gan(config: TrainConfig, settings: GANSettings | None = None, resume: bool = False,
              changes: dict | None = None, data: DatasetSplits | None = None,
              classifier=None) -> dict:
    """Train (or resume) a generative pair; returns the summary (test FD, precision, recall,
    confident share, pictures). ``changes`` records settings changed on resume."""
    from .classification import run_task

    if config.augment != "none":
        raise ValueError("GAN training learns the images as they are; set augment='none' in "
                         "the TrainConfig")
    return run_task(GANTask(settings, data, classifier), config, resume, changes)[1]
