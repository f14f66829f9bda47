"""Stateless capsule operations: squash, capsule lengths, margin and reconstruction losses.

Each function has a module twin in :mod:`torchcaps.layers` for use in ``nn.Sequential``.
Letter legend: ``B`` batch, ``J`` capsules, ``D`` pose dimension, ``K`` classes.
"""

from __future__ import annotations

import torch

from ._validate import check_tensor

__all__ = [
    "multi_hot",
    "squash",
    "squash_exp",
    "capsule_length",
    "margin_loss",
    "reconstruction_loss",
    "spread_loss",
]


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Sabour et al. 2017, Eq. 1: ``v = |s|^2 / (1 + |s|^2) * s / |s|``.

    The norm is computed as ``sqrt(|s|^2 + eps)``, so the output and its gradient
    are finite at ``s = 0`` (the plain form divides by zero there, a known source
    of NaNs in several public implementations). Output lengths lie in ``[0, 1)``.

    Args:
        s: capsule pre-activations, pose along ``dim``.
        dim: the pose axis.
        eps: added under the square root; must be positive.

    Shape:
        any; output has the shape of ``s``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    sq = (s * s).sum(dim=dim, keepdim=True)  # |s|^2
    return s * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def squash_exp(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Efficient-CapsNet squash (Mazzia et al. 2021, Eq. 5): ``v = (1 - exp(-|s|)) s / |s|``.

    Finite with a finite gradient at ``s = 0`` thanks to ``|s| = sqrt(|s|^2 + eps)``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    norm = torch.sqrt((s * s).sum(dim=dim, keepdim=True) + eps)
    return s * ((1.0 - torch.exp(-norm)) / norm)


def capsule_length(v: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Euclidean length of each capsule, ``sqrt(|v|^2 + eps)`` (finite gradient at zero).

    Shape:
        ``(*, D)`` -> ``(*)`` for ``dim=-1``.
    """
    return torch.sqrt((v * v).sum(dim=dim) + eps)


def margin_loss(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lambda_neg: float = 0.5,
) -> torch.Tensor:
    """Margin loss of Sabour et al. 2017, Eq. 4, summed over classes and averaged over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``

    Args:
        lengths: class-capsule lengths ``(B, K)``.
        targets: integer labels ``(B,)`` or a multi-hot float mask ``(B, K)``
            (several present classes, e.g. MultiMNIST).

    Returns:
        a scalar.
    """
    check_tensor(lengths, "lengths", ("B", "K"))
    b, k = lengths.shape
    if targets.dim() == 1:
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
        if targets.shape[0] != b:
            raise ValueError(f"targets has {targets.shape[0]} labels for a batch of {b}")
        if b and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise ValueError(f"targets must lie in [0, {k}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        t = torch.nn.functional.one_hot(targets.long(), k).to(lengths.dtype)
    else:
        check_tensor(targets, "targets", (b, k))
        t = targets.to(lengths.dtype)
    pos = t * torch.relu(m_pos - lengths).pow(2)
    neg = lambda_neg * (1.0 - t) * torch.relu(lengths - m_neg).pow(2)
    return (pos + neg).sum(dim=1).mean()


def reconstruction_loss(
    reconstruction: torch.Tensor, images: torch.Tensor, weight: float = 0.0005
) -> torch.Tensor:
    """Sum-of-squared-errors reconstruction loss, scaled by ``weight`` (Sabour et al. 2017).

    We use the *sum* form of the paper: ``weight * sum_pixels (x - x_hat)^2`` per image,
    averaged over the batch. With 784 pixels this equals ``0.392 * mean squared error``.

    Shape:
        ``reconstruction`` and ``images``: the same shape ``(B, ...)``; returns a scalar.
    """
    if reconstruction.shape != images.shape:
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} does not match "
            f"images shape {tuple(images.shape)}"
        )
    err = (reconstruction - images).pow(2).flatten(1).sum(dim=1)
    return weight * err.mean()


def spread_loss(
    activations: torch.Tensor, targets: torch.Tensor, margin: float | torch.Tensor
) -> torch.Tensor:
    """Spread loss of Hinton, Sabour, Frosst 2018 (ICLR, "Matrix capsules with EM routing"), Eq. 3.

    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2`` per example, averaged over the batch.
    The paper anneals ``m`` linearly from 0.2 to 0.9 during training; with ``m = 1`` it is
    the squared hinge loss.

    Args:
        activations: class activations ``(B, K)``.
        targets: integer labels ``(B,)``.
        margin: ``m`` (a float or a 0-dim tensor).

    Returns:
        a scalar.
    """
    check_tensor(activations, "activations", ("B", "K"))
    b, k = activations.shape
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape != (b,):
        raise ValueError(f"targets must have shape ({b},), got {tuple(targets.shape)}")
    if b and (int(targets.min()) < 0 or int(targets.max()) >= k):
        raise ValueError(f"targets must lie in [0, {k}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    a_t = activations.gather(1, targets.long().view(-1, 1))  # (B, 1)
    gap = torch.relu(margin - (a_t - activations)).pow(2)  # (B, K)
    wrong = 1.0 - torch.nn.functional.one_hot(targets.long(), k).to(activations.dtype)
    return (gap * wrong).sum(dim=1).mean()


def multi_hot(labels, num_classes: int) -> torch.Tensor:
    """Float ``(B, K)`` targets with a 1 at every class listed in each row of ``labels``.

    Args:
        labels: integer tensor or numpy array, ``(B,)`` one class per example or ``(B, M)``
            listing the ``M`` present classes (e.g. the two MultiMNIST digits; a class listed
            twice counts once).
        num_classes: ``K``.
    """
    import numpy as np

    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError("labels must be an integer tensor or array of class indices")
    if labels.dim() not in (1, 2) or (labels.dim() == 2 and labels.shape[1] < 1):
        raise ValueError(f"labels must have shape (B,) or (B, M), got {tuple(labels.shape)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    index = labels.long().view(labels.shape[0], -1)  # (B, M)
    hot = torch.zeros(labels.shape[0], num_classes, device=labels.device)  # (B, K)
    return hot.scatter_(1, index, 1.0)
