"""Segmentation (2D and 3D) as a task on the engine, and :func:`train_segmentation`.

:class:`SegmentationTask` trains a registered segmentation model
(``list_models(task="segmentation")``) on patches of labelled volumes
(:mod:`torchcaps.data.segmentation`), selects the checkpoint on the validation volumes'
mean foreground Dice (sliding-window inference over whole volumes), and reports Dice and
HD95 per class on the test volumes. Everything else (optimiser, schedule, precision,
checkpoints, exact resume, torchrun) is the engine's, as for every task.

Data per step. A fixed, seeded pool of ``pool`` class-balanced patches is drawn once from
the training volumes (:func:`~torchcaps.data.segmentation.patch_pool`); a label budget of
``fraction`` trains on the first ``fraction * pool`` of them, so budgets are nested. Each
batch picks patches from that subset with the engine's generator and augments them with
MONAI (random flips along every axis, intensity scaling and shifting), the MONAI transforms
seeded from the same generator, so a resumed run sees the same batches.

Self-supervised pretraining (:class:`PretextTask`) trains a model's capsule encoder on a
pretext task over unlabelled volumes; :attr:`SegmentationSettings.pretrained` then starts
fine-tuning from that encoder.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data.segmentation import (
    SegmentationData,
    _plain,
    fraction_count,
    load_segmentation_data,
    patch_pool,
)
from ..models import create_model, model_task
from .checkpoint import CheckpointError, load_checkpoint, model_state
from .config import TrainConfig
from .task import Task

__all__ = ["SegmentationSettings", "SegmentationTask", "PretextTask", "train_segmentation",
           "pretrain_encoder", "default_patch", "load_pretrained_encoder"]


def default_patch(spatial_dims: int) -> tuple[int, ...]:
    """The default training window: 32^3 for 3D models, 64x64 for 2D ones."""
    return (32, 32, 32) if spatial_dims == 3 else (64, 64)


@dataclass
class SegmentationSettings:
    """What a segmentation job adds to :class:`~torchcaps.train.TrainConfig`.

    Attributes:
        patch: training and inference window, ``(D, H, W)`` or ``(H, W)``; ``None``: the
            model's default (:func:`default_patch`).
        pool: class-balanced training patches drawn once from the training volumes.
        fraction: the share of the pool trained on (label-efficiency experiments).
        samples_per_epoch: patches per epoch (an epoch is one validation interval).
        spacing, split: of the mni152 source (millimetres; region split, see
            :mod:`torchcaps.data.mni152`).
        overlap: of sliding windows at inference.
        sw_batch_size: windows per inference batch.
        augment: MONAI flips and intensity jitter on training patches.
        pretrained: a pretext-training checkpoint (``.../best`` or ``.json``) whose encoder
            initialises the model.
        hausdorff: also report HD95 on the test volumes.
    """

    patch: tuple[int, ...] | None = None
    pool: int = 512
    fraction: float = 1.0
    samples_per_epoch: int = 256
    spacing: int = 2
    split: str | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4
    augment: bool = True
    pretrained: str | None = None
    hausdorff: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.patch, list):
            self.patch = tuple(self.patch)
        bad = []
        if self.patch is not None and not (len(self.patch) in (2, 3)
                                           and all(isinstance(s, int) and s > 0 for s in self.patch)):
            bad.append(f"patch={self.patch!r} (two or three positive sizes)")
        if not (isinstance(self.pool, int) and self.pool > 0):
            bad.append(f"pool={self.pool!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            bad.append(f"fraction={self.fraction!r} (in (0, 1])")
        if not (isinstance(self.samples_per_epoch, int) and self.samples_per_epoch > 0):
            bad.append(f"samples_per_epoch={self.samples_per_epoch!r}")
        if self.spacing not in (1, 2):
            bad.append(f"spacing={self.spacing!r} (1 or 2 mm)")
        if not 0 <= self.overlap < 1:
            bad.append(f"overlap={self.overlap!r} (in [0, 1))")
        if bad:
            raise ValueError(f"invalid segmentation settings: {', '.join(bad)}")


def _flip_axes(spatial_dims: int) -> list[int]:
    return list(range(spatial_dims))


class SegmentationTask(Task):
    """Train a segmentation model on patches; select on validation Dice; test on volumes."""

    monitor, mode = "val_mean_dice", "max"

    def __init__(self, settings: SegmentationSettings | None = None,
                 data: SegmentationData | None = None):
        self.settings = settings or SegmentationSettings()
        self.data = data

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        s = self.settings
        self.cfg = cfg
        if model_task(cfg.model) != "segmentation":
            raise ValueError(f"{cfg.model} is a {model_task(cfg.model)} model; segmentation "
                             "trains the models of `torchcaps models --task segmentation`")
        if self.data is None:
            self.data = load_segmentation_data(cfg.dataset, cfg.data_dir, spacing=s.spacing,
                                               split=s.split)
        d = self.data
        declared = cfg.model_kwargs.get("num_classes")
        if declared is not None and declared != d.num_classes:
            raise ValueError(f"model_kwargs sets num_classes={declared!r} but {d.name} has "
                             f"{d.num_classes} classes")
        self.model_kwargs = {"in_channels": d.in_channels, "num_classes": d.num_classes,
                             **cfg.model_kwargs}
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, **self.model_kwargs)
        dims = self.model.spatial_dims
        self.patch = tuple(s.patch) if s.patch is not None else default_patch(dims)
        if len(self.patch) != dims:
            raise ValueError(f"{cfg.model} is a {dims}D model; its patch needs {dims} sizes, got "
                             f"{self.patch}")
        m = self.model.size_multiple
        if any(p % m for p in self.patch):
            raise ValueError(f"{cfg.model} needs patch sizes that are multiples of {m}, got "
                             f"{self.patch}")
        if s.pretrained:
            load_pretrained_encoder(self.model, s.pretrained)
        x, y = patch_pool(d.train, self.patch, s.pool, cfg.split_seed, d.num_classes)
        n = fraction_count(len(x), s.fraction)
        self.pool_x, self.pool_y = x[:n], y[:n]
        self.module = self.model
        self._augment = self._make_augment() if s.augment else None

    def _make_augment(self):
        from monai.transforms import (
            Compose,
            RandFlipd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        flips = [RandFlipd(["image", "label"], prob=0.5, spatial_axis=a)
                 for a in _flip_axes(len(self.patch))]
        return Compose([*flips, RandScaleIntensityd("image", factors=0.1, prob=0.5),
                        RandShiftIntensityd("image", offsets=0.1, prob=0.5)])

    def spec(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs}

    def num_batches(self) -> int:
        return -(-self.settings.samples_per_epoch // self.cfg.batch_size)

    def batch(self, epoch: int, pos: int, generator: torch.Generator):
        idx = torch.randint(len(self.pool_x), (self.cfg.batch_size,), generator=generator)
        x, y = self.pool_x[idx].clone(), self.pool_y[idx].clone()
        if self._augment is not None:
            self._augment.set_random_state(int(torch.randint(2**31, (1,), generator=generator)))
            for i in range(len(x)):
                out = self._augment({"image": x[i], "label": y[i][None]})
                x[i] = _plain(out["image"])
                y[i] = _plain(out["label"])[0]
        return x, y

    def step(self, batch):
        x, y = batch
        out = self.forward(x, y)
        loss, _ = self.model.loss(out, x, y)
        pred = out.logits.detach().argmax(1)
        yield "model", loss, {"correct_voxels": int((pred == y).sum()), "voxels": y.numel()}

    def train_metrics(self, sums: dict) -> dict:
        return {"train_voxel_accuracy": sums.get("correct_voxels", 0) / max(sums.get("voxels", 0), 1)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, module=None) -> dict:
        from ..evaluation.segmentation import evaluate_segmentation  # evaluation imports train

        d = self.data
        res = evaluate_segmentation(module or self.model, d.split(split), d.num_classes,
                                    self.patch, spacing=d.spacing,
                                    hausdorff=split == "test" and self.settings.hausdorff,
                                    overlap=self.settings.overlap,
                                    sw_batch_size=self.settings.sw_batch_size)
        flat = {"mean_dice": res["mean_dice"]}
        for k, name in enumerate(d.class_names):
            key = name.replace(" ", "_")
            flat[f"dice_{key}"] = res["dice"][k]
            if "hd95" in res:
                flat[f"hd95_{key}"] = res["hd95"][k]
        return flat

    def validate(self) -> dict:
        res = self.evaluate("val")
        out = {f"val_{k}": v for k, v in res.items() if isinstance(v, float) and math.isfinite(v)}
        out.setdefault("val_mean_dice", 0.0)  # no foreground in prediction or truth
        return out

    def state(self) -> dict:
        return {"segmentation": _jsonable(asdict(self.settings))}

    def check_resume(self, manifest: dict) -> None:
        saved = (manifest.get("task_state") or {}).get("segmentation")
        mine = _jsonable(asdict(self.settings))
        if saved is not None and saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise CheckpointError(f"the checkpoint was trained with other segmentation settings "
                                  f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                                  "resume with the same settings")

    def summary(self, trainer) -> dict:
        t0 = time.perf_counter()
        best = trainer.best_module().to(trainer.device)
        test = self.evaluate("test", best)
        return {"dataset": self.cfg.dataset, "class_names": list(self.data.class_names),
                "patch": list(self.patch), "pool_patches": len(self.pool_x),
                "fraction": self.settings.fraction,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "test": {k: _finite_or_none(v) for k, v in test.items()},
                "test_seconds": round(time.perf_counter() - t0, 2),
                "checkpoint": str(trainer.out / "best.json") if trainer.out else None}


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_pretrained_encoder(model, path: str) -> None:
    """Initialise ``model``'s encoder from a pretext-training checkpoint."""
    if not hasattr(model, "load_encoder_state_dict"):
        raise ValueError(f"{type(model).__name__} has no pretrainable encoder "
                         "(only models with load_encoder_state_dict can start from --pretrained)")
    meta, tensors = load_checkpoint(path)
    if meta.get("task") != "PretextTask":
        raise CheckpointError(f"{path}: not a pretext-training checkpoint (it records task "
                              f"{meta.get('task')!r})")
    try:
        model.load_encoder_state_dict(model_state(tensors))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its encoder does not fit {type(model).__name__}: "
                              f"{str(e).splitlines()[0]}") from None


def train_segmentation(config: TrainConfig, settings: SegmentationSettings | None = None,
                       resume: bool = False, changes: dict | None = None,
                       data: SegmentationData | None = None) -> dict:
    """Train (or resume) a segmentation model; returns the summary (test Dice per class...)."""
    from .classification import run_task

    if config.augment != "none":
        raise ValueError("segmentation augments with its own MONAI pipeline; set augment='none' "
                         "in the TrainConfig (SegmentationSettings.augment switches it)")
    return run_task(SegmentationTask(settings, data), config, resume, changes)[1]


# ---------------------------------------------------------------------- self-supervised
class PretextTask(Task):
    """Self-supervised pretraining of a capsule encoder on unlabelled volumes.

    The pretext examples are those of :func:`torchcaps.models.ucaps.pretext_batch` (a
    transformed copy of each patch; the model reconstructs the original), the loss the
    model's ``pretext_loss``. Unlabelled patches come from the training region (and, for
    mni152, the further unlabelled volumes of :func:`torchcaps.data.mni152.load_pretraining_volumes`);
    the selection metric is the pretext loss on fixed examples from the validation region.
    No label and no voxel of the test region is used.
    """

    monitor, mode = "val_loss", "min"

    def __init__(self, settings: SegmentationSettings | None = None,
                 data: SegmentationData | None = None, volumes: list[torch.Tensor] | None = None):
        self.settings = settings or SegmentationSettings()
        self.data, self.volumes = data, volumes

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        from ..data.segmentation import unlabelled_pool
        from ..models.ucaps import pretext_batch

        s, self.cfg = self.settings, cfg
        if model_task(cfg.model) != "segmentation":
            raise ValueError(f"{cfg.model} is a {model_task(cfg.model)} model, not a "
                             "segmentation model with a pretrainable encoder")
        if self.data is None:
            self.data = load_segmentation_data(cfg.dataset, cfg.data_dir, spacing=s.spacing,
                                               split=s.split)
        d = self.data
        self.model_kwargs = {"in_channels": d.in_channels, "num_classes": d.num_classes,
                             **cfg.model_kwargs}
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, **self.model_kwargs)
        if not (hasattr(self.model, "pretext") and hasattr(self.model, "load_encoder_state_dict")):
            raise ValueError(f"{cfg.model} has no pretext task (models with a pretrainable "
                             "encoder: ucaps3d)")
        dims = self.model.spatial_dims
        self.patch = tuple(s.patch) if s.patch is not None else default_patch(dims)
        if len(self.patch) != dims:
            raise ValueError(f"{cfg.model} is a {dims}D model; its patch needs {dims} sizes, got "
                             f"{self.patch}")
        volumes = self.volumes
        if volumes is None:
            volumes = [it.image for it in d.train]
            if cfg.dataset == "mni152":
                from ..data.mni152 import load_pretraining_volumes

                volumes += extra_pretraining_volumes(load_pretraining_volumes, cfg.data_dir,
                                                     d.in_channels)
        self.pool_x = unlabelled_pool(volumes, self.patch, s.pool, cfg.split_seed)
        val = unlabelled_pool([it.image for it in d.val], self.patch, max(8, s.pool // 8),
                              cfg.split_seed + 1)
        self.val_inputs, self.val_targets = pretext_batch(
            val, torch.Generator().manual_seed(cfg.split_seed + 2))
        self._pretext_batch = pretext_batch
        self.module = self.model

    def spec(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs}

    def num_batches(self) -> int:
        return -(-self.settings.samples_per_epoch // self.cfg.batch_size)

    def batch(self, epoch: int, pos: int, generator: torch.Generator):
        idx = torch.randint(len(self.pool_x), (self.cfg.batch_size,), generator=generator)
        return self._pretext_batch(self.pool_x[idx], generator)

    def step(self, batch):
        inputs, targets = batch
        out = self.forward(inputs)  # a model's pretext pass is its forward without labels
        loss, _ = self.model.pretext_loss(out, targets)
        yield "model", loss, {}

    @torch.no_grad()
    def evaluate(self, split: str, module=None) -> dict:
        if split != "val":
            raise ValueError("the pretext task is scored on the validation region only")
        model = module or self.model
        was = model.training
        model.eval()
        total = 0.0
        n = len(self.val_inputs)
        step = self.settings.sw_batch_size
        for i in range(0, n, step):
            out = model.pretext(self.val_inputs[i:i + step])
            total += float(model.pretext_loss(out, self.val_targets[i:i + step])[0]) * min(step, n - i)
        model.train(was)
        return {"loss": total / n}

    def state(self) -> dict:
        return {"pretext": _jsonable(asdict(self.settings))}

    def check_resume(self, manifest: dict) -> None:
        saved = (manifest.get("task_state") or {}).get("pretext")
        if saved is not None and saved != _jsonable(asdict(self.settings)):
            raise CheckpointError("the checkpoint was pretrained with other settings; resume "
                                  "with the same settings")

    def summary(self, trainer) -> dict:
        return {"dataset": self.cfg.dataset, "patch": list(self.patch),
                "pool_patches": len(self.pool_x),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "checkpoint": str(trainer.out / "best.json") if trainer.out else None}


def extra_pretraining_volumes(loader, data_dir, in_channels: int) -> list[torch.Tensor]:
    """The further unlabelled volumes of a source, as ``(C, D, H, W)`` tensors in [0, 1]."""
    from ..data.segmentation import unit_intensity

    out = []
    for vol in loader(data_dir, template=False):  # the template's region is in the data
        arr = torch.as_tensor(vol.array).float()
        arr = arr[None] if arr.dim() == 3 else arr
        if arr.shape[0] == in_channels:
            out.append(unit_intensity(arr))
    return out


def pretrain_encoder(config: TrainConfig, settings: SegmentationSettings | None = None,
                     resume: bool = False, changes: dict | None = None,
                     data: SegmentationData | None = None) -> dict:
    """Self-supervised pretraining (:class:`PretextTask`); returns the summary."""
    from .classification import run_task

    if config.augment != "none":
        raise ValueError("pretraining makes its own pretext examples; set augment='none'")
    return run_task(PretextTask(settings, data), config, resume, changes)[1]
