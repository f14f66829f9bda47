"""Training augmentations by name: the ``--augment`` half of a preprocessing recipe.

Each recipe maps a batch of float training images at their *stored* size (``Split.raw``)
to the size a model sees (``Split.shape``), drawing every random number from the
engine's ``torch.Generator`` (a fixed number of draws per batch), so a resumed run replays
its batches exactly. The split's normalisation (``Split.finish``) is applied after it.
Where the stored images are larger than a model's input (a ``cropN`` view) a recipe that
does not crop at random takes the centre crop, which is also what evaluation sees.

==============  ==================================================================  =========================
recipe          what it does to each training image                                 source
==============  ==================================================================  =========================
``shift``       random shift of up to ``--max-shift`` px, zero fill                 Sabour et al. 2017
``efficient``   rotate, shift within the margins, squish, erase (MNIST values)      Mazzia et al. 2021
``none``        nothing (the centre crop, if any)
``cifar``       zero-pad 4 px, random crop back to size, mirror with p = 1/2         the CIFAR recipe of
                                                                                    Zhao & Cheng 2021 and
                                                                                    ResNet-era papers
``norb``        random crop to size; brightness +-32/255; contrast x[0.5, 1.5]      Hinton et al. 2018
==============  ==================================================================  =========================

Paper recipes, with their dataset views (:mod:`torchcaps.data.views`):

* smallNORB as in Hinton et al. 2018: ``--dataset smallnorb+resize48+crop32+standardize
  --augment norb`` (48x48, random 32x32 crops with random brightness and contrast for
  training, the centre 32x32 crop for testing, each image normalised to zero mean and unit
  variance). The paper names brightness and contrast without values; ``32/255`` and
  ``[0.5, 1.5]`` are those of the EM reimplementations in wide use. We jitter in pixel
  space and standardise last; the paper standardises the 48x48 image before cropping.
* CIFAR-10/100: ``--dataset cifar10+norm --augment cifar`` (per-channel normalisation by
  the training split's statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .augment import efficient_capsnet_augment
from .transforms import center_crop, random_brightness_contrast, random_crop, random_flip, random_shift

__all__ = ["AUGMENTATIONS", "augment_batch"]

Recipe = Callable[[torch.Tensor, tuple[int, int], torch.Generator, int], torch.Tensor]


def _fit(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == hw else center_crop(x, hw)


def _shift(x, hw, g, max_shift):
    return random_shift(_fit(x, hw), max_shift, g)


def _efficient(x, hw, g, max_shift):
    return efficient_capsnet_augment(_fit(x, hw), g)


def _none(x, hw, g, max_shift):
    return _fit(x, hw)


def _cifar(x, hw, g, max_shift):
    return random_flip(random_crop(x, hw, g, padding=4), g)


def _norb(x, hw, g, max_shift):
    return random_brightness_contrast(random_crop(x, hw, g), g)


#: recipe name -> (function, one-line description)
AUGMENTATIONS: dict[str, tuple[Recipe, str]] = {
    "shift": (_shift, "random shift up to --max-shift px"),
    "efficient": (_efficient, "the Efficient-CapsNet rotate/shift/squish/erase pipeline"),
    "none": (_none, "no augmentation"),
    "cifar": (_cifar, "4 px zero padding, random crop, horizontal flip (CIFAR papers)"),
    "norb": (_norb, "random crop, brightness and contrast (Hinton et al. 2018, smallNORB)"),
}


def augment_batch(name: str, images: torch.Tensor, hw: tuple[int, int],
                  generator: torch.Generator | None = None, max_shift: int = 2) -> torch.Tensor:
    """Apply recipe ``name`` to float images ``(B, C, H, W)``; returns ``(B, C, hw[0], hw[1])``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name][0](images, tuple(hw), generator, max_shift)
