"""Segmentation data: labelled volumes in three splits, and the training patches drawn from them.

Every source gives a :class:`SegmentationData`: lists of :class:`SegmentationItem` (an image
``(C, D, H, W)`` with its label map ``(D, H, W)``) for ``train``, ``val`` and ``test``. Items
are always volumes; a 2D model sees their axial slices (a 2D patch is a patch of depth 1,
and evaluation runs slice by slice and scores the stacked volume, so 2D and 3D models are
scored on the same voxels).

Sources (``load_segmentation_data(name, ...)``):

* ``mni152``: the MNI152 tissue benchmark (:mod:`torchcaps.data.mni152`): one T1 volume,
  grey matter / white matter / everything else, split into regions that do not touch.
* ``nifti:DIR``: your own volumes in the Medical Segmentation Decathlon layout,
  ``DIR/imagesTr/*.nii[.gz]`` with label maps of the same names in ``DIR/labelsTr/``
  (and, optionally, ``DIR/imagesTs`` + ``DIR/labelsTs`` as the test split; otherwise a
  fifth of the volumes, at least one, is held out for test and one for validation).
* ``shapes``: generated volumes with two kinds of blobs on a noisy background, for tests
  and demonstrations (no files).

Training patches. :func:`patch_pool` draws a fixed, seeded pool of patches from the training
items with MONAI's class-balanced sampler (``RandCropByLabelClassesd``: the centre voxel is
of each class equally often). Label-efficiency experiments train on the first ``fraction``
of that pool, so smaller budgets are subsets of larger ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataFormatError

__all__ = ["SegmentationItem", "SegmentationData", "load_segmentation_data", "make_shapes",
           "patch_pool", "fraction_count", "unlabelled_pool", "unit_intensity",
           "intensity_bounds",
           "SEGMENTATION_DATASETS"]

#: the named segmentation sources (besides ``nifti:DIR``)
SEGMENTATION_DATASETS = ("mni152", "shapes")


@dataclass
class SegmentationItem:
    """One labelled volume: ``image`` ``(C, D, H, W)`` float32, ``labels`` ``(D, H, W)`` int64."""

    image: torch.Tensor
    labels: torch.Tensor
    name: str = ""
    affine: np.ndarray | None = None  # voxel -> world (4, 4), for writing predictions back

    def __post_init__(self) -> None:
        if self.image.dim() != 4 or self.labels.shape != self.image.shape[1:]:
            raise DataFormatError(f"{self.name or 'item'}: image (C, D, H, W) and labels (D, H, W) "
                                  f"do not fit: {tuple(self.image.shape)} and "
                                  f"{tuple(self.labels.shape)}")


@dataclass
class SegmentationData:
    """Labelled volumes in three splits and what they mean."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    train: list[SegmentationItem]
    val: list[SegmentationItem]
    test: list[SegmentationItem]
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)  # millimetres per voxel (D, H, W)
    notes: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train[0].image.shape[0])

    def split(self, name: str) -> list[SegmentationItem]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)


# ---------------------------------------------------------------- sources
def load_segmentation_data(name: str, data_dir: str | None = None, *, spacing: int = 2,
                           split: str | None = None, fetch: bool = True) -> SegmentationData:
    """The named source (see the module docstring). ``spacing`` and ``split`` apply to mni152."""
    if name == "shapes":
        return _shapes_data()
    if name == "mni152":
        return _mni152_data(data_dir, spacing, split, fetch)
    if name.startswith("nifti:"):
        return _nifti_folder(Path(name[len("nifti:"):]))
    raise ValueError(f"unknown segmentation dataset {name!r}; the sources are "
                     f"{', '.join(SEGMENTATION_DATASETS)} or nifti:DIR (Decathlon layout: "
                     "DIR/imagesTr and DIR/labelsTr)")


def make_shapes(count: int, size: int = 32, seed: int = 0) -> list[SegmentationItem]:
    """``count`` volumes ``size``^3: class 1 are balls, class 2 cubes, on Gaussian noise.

    The image is the class pattern blurred by noise (SNR about 3), so the task is easy but
    not trivial.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3,
                                      indexing="ij"))  # (3, S, S, S)
    items = []
    for i in range(count):
        labels = torch.zeros(size, size, size, dtype=torch.int64)
        for cls in (1, 2):
            for _ in range(2):
                r = float(torch.empty(()).uniform_(size / 10, size / 5, generator=g))
                c = torch.empty(3).uniform_(r, size - r, generator=g)
                d = grid - c[:, None, None, None]
                inside = (d.norm(dim=0) <= r) if cls == 1 else (d.abs().amax(0) <= r * 0.8)
                labels[inside] = cls
        image = labels.float() * 0.5 + 0.35 * torch.randn(labels.shape, generator=g)
        items.append(SegmentationItem(unit_intensity(image[None]), labels, name=f"shapes-{i}"))
    return items


def _shapes_data() -> SegmentationData:
    return SegmentationData("shapes", 3, ("background", "ball", "cube"),
                            train=make_shapes(4, seed=0), val=make_shapes(1, seed=1),
                            test=make_shapes(2, seed=2))


def _mni152_data(data_dir, spacing, split, fetch) -> SegmentationData:
    from .mni152 import load_mni152_tissue

    kwargs = {"spacing": spacing, "fetch": fetch}
    if split is not None:
        kwargs["split"] = split
    tissue = load_mni152_tissue(data_dir, **kwargs)
    # one intensity scale for every region, from the training region's brain voxels
    train = torch.cat([x[:, y >= 0].flatten() for x, y in tissue.subvolumes("train")])
    bounds = intensity_bounds(train[train != tissue.background][None])
    items = {}
    for name in ("train", "val", "test"):
        items[name] = [SegmentationItem(unit_intensity(x.float(), bounds), y.long(),
                                        name=f"mni152-{name}-{i}", affine=tissue.affine)
                       for i, (x, y) in enumerate(tissue.subvolumes(name))]
    return SegmentationData("mni152", tissue.num_classes, tuple(tissue.class_names), **items,
                            spacing=(float(tissue.spacing),) * 3, notes={"split": tissue.split})


def _nifti_folder(root: Path) -> SegmentationData:
    from .volumes import load_labelled_pair

    images = root / "imagesTr"
    if not images.is_dir() or not (root / "labelsTr").is_dir():
        raise FileNotFoundError(f"{root}: expected the Decathlon layout, {root}/imagesTr and "
                                f"{root}/labelsTr with label maps named like their images")

    def pairs(img_dir: Path, lab_dir: Path) -> list[tuple[Path, Path]]:
        found = sorted(p for p in img_dir.iterdir() if p.name.endswith((".nii", ".nii.gz"))
                       and not p.name.startswith("."))
        out = []
        for p in found:
            lab = lab_dir / p.name
            if not lab.is_file():
                raise FileNotFoundError(f"{p}: no label map {lab}")
            out.append((p, lab))
        return out

    train_pairs = pairs(images, root / "labelsTr")
    test_pairs = (pairs(root / "imagesTs", root / "labelsTs")
                  if (root / "labelsTs").is_dir() else [])
    need = 2 if test_pairs else 3
    if len(train_pairs) < need:
        raise DataFormatError(f"{root}: {len(train_pairs)} labelled volume(s) in imagesTr; at "
                              f"least {need} are needed (training, validation"
                              f"{'' if test_pairs else ', test'})")
    # up to 256 classes; the real count is the largest label seen, plus one
    raw = [load_labelled_pair(i, lab, 256) for i, lab in train_pairs + test_pairs]
    num_classes = int(max(int(lab.max()) for _, lab in raw)) + 1
    if num_classes < 2:
        raise DataFormatError(f"{root}: every label map is all zeros; nothing to segment")
    items = [_item(vol, lab, path.name) for (vol, lab), (path, _) in
             zip(raw, train_pairs + test_pairs)]
    tr = items[:len(train_pairs)]
    if test_pairs:
        test = items[len(train_pairs):]
    else:
        n_test = max(1, len(tr) // 5)
        tr, test = tr[:-n_test], tr[-n_test:]
    val, tr = tr[-1:], tr[:-1]
    return SegmentationData(f"nifti:{root}", num_classes,
                            ("background",) + tuple(f"class {k}" for k in range(1, num_classes)),
                            train=tr, val=val, test=test,
                            spacing=tuple(float(s) for s in raw[0][0].spacing))


def _item(volume, labels, name: str) -> SegmentationItem:
    image = torch.as_tensor(np.asarray(volume.array, dtype=np.float32))
    if image.dim() == 3:
        image = image[None]
    return SegmentationItem(unit_intensity(image), torch.as_tensor(np.asarray(labels)).long(),
                            name=name, affine=volume.affine)


# ---------------------------------------------------------------- training patches
def patch_pool(items: list[SegmentationItem], patch: tuple[int, ...], count: int, seed: int,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed pool of ``count`` class-balanced training patches.

    Args:
        items: the training volumes.
        patch: ``(D, H, W)`` (3D models) or ``(H, W)`` (2D models: a slab of depth 1 is cut
            and its depth axis dropped).
        count: patches in the pool; they are spread over the items in proportion to size.
        seed: seeds MONAI's sampler (the pool is a pure function of its arguments).

    Returns:
        images ``(N, C, *patch)`` and labels ``(N, *patch)`` in a seeded random order; a
        smaller label budget takes the first ``k`` (:func:`fraction_count`), so budgets are
        nested.
    """
    from monai.transforms import RandCropByLabelClassesd

    size3 = tuple(patch) if len(patch) == 3 else (1, *patch)
    for item in items:
        if any(s > t for s, t in zip(size3, item.labels.shape)):
            raise ValueError(f"patch {tuple(patch)} is larger than the volume "
                             f"{tuple(item.labels.shape)} of {item.name or 'a training item'}")
    sizes = np.array([it.labels.numel() for it in items], dtype=np.float64)
    share = np.floor(count * sizes / sizes.sum()).astype(int)
    share[: count - share.sum()] += 1  # the remainder, one each, to the first items
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for item, n in zip(items, share):
        if n == 0:
            continue
        present = torch.bincount(item.labels.flatten(), minlength=num_classes) > 0
        ratios = [1.0 if p else 0.0 for p in present.tolist()]
        crop = RandCropByLabelClassesd(["image", "label"], label_key="label", spatial_size=size3,
                                       ratios=ratios, num_classes=num_classes,
                                       num_samples=int(n), warn=False)
        crop.set_random_state(int(rng.integers(2**31)))
        out = crop({"image": item.image, "label": item.labels[None]})
        for d in out:
            images.append(_plain(d["image"]).float())
            labels.append(_plain(d["label"])[0].long())
    order = torch.from_numpy(rng.permutation(len(images)))
    x, y = torch.stack(images)[order], torch.stack(labels)[order]
    if len(patch) == 2:
        x, y = x[:, :, 0], y[:, 0]
    return x.contiguous(), y.contiguous()


def _plain(t) -> torch.Tensor:
    """A plain tensor from MONAI's output (its MetaTensor carries metadata we do not use)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def fraction_count(total: int, fraction: float) -> int:
    """How many pool patches a label budget of ``fraction`` uses (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.floor(total * fraction + 1e-9))


def unlabelled_pool(volumes: list[torch.Tensor], patch: tuple[int, ...], count: int,
                    seed: int) -> torch.Tensor:
    """``count`` patches ``(N, C, *patch)`` cut at uniformly random places (MONAI's
    ``RandSpatialCropSamples``, seeded) from volumes ``(C, D, H, W)``, in proportion to size.
    A volume thinner than the patch along an axis is zero-padded (centred) to the patch."""
    from monai.transforms import RandSpatialCropSamples, SpatialPad

    size3 = tuple(patch) if len(patch) == 3 else (1, *patch)
    usable = [_plain(SpatialPad(size3)(v)) if any(s > t for s, t in zip(size3, v.shape[1:]))
              else v for v in volumes]
    if not usable:
        raise ValueError("no volumes to cut patches from")
    sizes = np.array([v[0].numel() for v in usable], dtype=np.float64)
    share = np.floor(count * sizes / sizes.sum()).astype(int)
    share[: count - share.sum()] += 1
    rng = np.random.default_rng(seed)
    out = []
    for vol, n in zip(usable, share):
        if n == 0:
            continue
        crop = RandSpatialCropSamples(size3, num_samples=int(n), random_size=False)
        crop.set_random_state(int(rng.integers(2**31)))
        out += [_plain(c).float() for c in crop(vol)]
    x = torch.stack(out)[torch.from_numpy(rng.permutation(len(out)))]
    return (x[:, :, 0] if len(patch) == 2 else x).contiguous()


def intensity_bounds(image: torch.Tensor, low: float = 0.5,
                     high: float = 99.5) -> list[tuple[float, float]]:
    """Per channel, the ``low`` and ``high`` percentiles of the non-zero voxels (the head,
    not the air around it) of ``image`` ``(C, ...)``."""
    bounds = []
    for c in range(image.shape[0]):
        ch = image[c].float().flatten()
        if not torch.isfinite(ch).all():
            raise DataFormatError("the image holds NaN or Inf values")
        ref = ch[ch != 0] if (ch != 0).any() else ch
        if ref.numel() > 1_000_000:  # quantile() has an input limit; a strided sample suffices
            ref = ref[:: ref.numel() // 1_000_000 + 1]
        bounds.append((float(torch.quantile(ref, low / 100)), float(torch.quantile(ref, high / 100))))
    return bounds


def unit_intensity(image: torch.Tensor, bounds: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """Scale intensities of ``image`` ``(C, ...)`` to [0, 1]: clip each channel to its
    :func:`intensity_bounds` (default: the image's own) and rescale.

    Every source goes through this, and so does ``torchcaps segment predict``: a model sees
    intensities in the same range at training and at prediction time.
    """
    bounds = bounds or intensity_bounds(image)
    out = torch.empty_like(image, dtype=torch.float32)
    for c, (lo, hi) in enumerate(bounds):
        ch = image[c].float()
        out[c] = ((ch - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(ch)
    return out
