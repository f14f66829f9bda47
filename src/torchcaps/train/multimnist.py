"""MultiMNIST training and evaluation helpers (Sabour, Frosst, Hinton 2017, arXiv 1710.09829).

Sec. 6 of the paper: MultiMNIST overlays two MNIST digits of *different* classes, each
shifted by up to 4 px, on a 36x36 canvas. A CapsNet is trained to say both digits are
present and to reconstruct each digit separately from its own class capsule.

Letter legend: ``B`` batch, ``K`` classes, ``D`` class-capsule dimension, ``C, H, W`` image.

* :func:`two_label_margin_loss`: the margin loss (Eq. 4) with a multi-hot target that has
  ``T_k = 1`` for both present digits::

      L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

  summed over classes, averaged over the batch (:func:`torchcaps.functional.margin_loss`).
* :func:`top2_accuracy`: an example counts as correct when its two highest-scored classes are
  exactly the two true classes (order irrelevant). The MultiMNIST error reported in the paper
  (5.2% for CapsNet, 8.1% for the baseline) is ``1 - top2_accuracy``. Checked: the official
  code's ``layers.evaluate`` with ``num_targets=2`` (``tensorflow/models``,
  ``research/capsules/models/layers/layers_test.py::testEvaluateMulti``) counts an example as
  correct only when both top-2 logits are labelled classes, and separately reports an "almost
  correct" count where at least one is (:func:`top2_hits` gives both). The paper's own sentence
  ("the two most active digit capsules" are treated as the network's classification) was read
  only in secondary write-ups; the PDF was not reachable here. Ties are broken by
  :func:`torch.topk` (unspecified order).
* :func:`reconstruct_each`: reconstruct each digit separately from its own class capsule,
  ``decoder(mask(poses, k))`` for each of the two classes ``k`` (the true classes while
  training, the two longest capsules at test time in Fig. 5 of the paper); the other capsule
  is masked to zero by :func:`torchcaps.layers.mask_capsules`, so each image depends only on
  its own capsule.

Shapes:

    ==========================  =====================  ================
    argument                    shape                  dtype
    ==========================  =====================  ================
    lengths / logits            (B, K)                 float
    labels_2, classes           (B, 2)                 int64
    poses                       (B, K, D)              float
    reconstruct_each output     (B, 2, C, H, W)        float
    ==========================  =====================  ================

* :func:`two_digit_reconstruction_loss`: ``weight * sum_n sum_pixels (x_n - x_hat_n)^2``
  over the two digits ``n``, averaged over the batch, where ``x_n`` is digit ``n`` alone on
  the canvas (the authors' generator stores these, see :mod:`torchcaps.data.multimnist`,
  ``singles``). Summing the two digits' errors with the MNIST weight 0.0005 is our choice;
  the paper's text does not spell out the MultiMNIST reconstruction weighting (unverified).
"""

from __future__ import annotations

import torch

from .. import functional as F
from .._validate import check_tensor
from ..models.cnn_baseline import labels_to_multi_hot

__all__ = [
    "two_hot",
    "two_label_margin_loss",
    "top2_hits",
    "top2_accuracy",
    "reconstruct_each",
    "two_digit_reconstruction_loss",
    "evaluate_multimnist",
]


def _check_labels_2(labels_2: torch.Tensor, batch: int, num_classes: int) -> None:
    if not isinstance(labels_2, torch.Tensor):
        raise TypeError(f"labels_2 must be a torch.Tensor, got {type(labels_2).__name__}")
    if labels_2.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels_2 must be int64 class indices, got dtype {labels_2.dtype}")
    if labels_2.shape != (batch, 2):
        raise ValueError(f"labels_2 must have shape ({batch}, 2), got {tuple(labels_2.shape)}")
    if batch and (int(labels_2.min()) < 0 or int(labels_2.max()) >= num_classes):
        raise ValueError(f"labels_2 must lie in [0, {num_classes}), got range "
                         f"[{int(labels_2.min())}, {int(labels_2.max())}]")
    if bool((labels_2[:, 0] == labels_2[:, 1]).any()):
        raise ValueError("the two classes of an example must differ "
                         "(MultiMNIST overlays digits of different classes)")


def two_hot(labels_2: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Multi-hot float targets ``(B, K)`` with ones at the two classes of each example."""
    batch = labels_2.shape[0] if isinstance(labels_2, torch.Tensor) and labels_2.dim() else 0
    _check_labels_2(labels_2, batch, num_classes)
    return labels_to_multi_hot(labels_2, num_classes)


def two_label_margin_loss(
    lengths: torch.Tensor,
    labels_2: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lambda_neg: float = 0.5,
) -> torch.Tensor:
    """Margin loss with both present digits as positives (Sabour et al. 2017, Eq. 4, Sec. 6).

    Args:
        lengths: class-capsule lengths ``(B, K)``.
        labels_2: ``(B, 2)`` the two (different) classes of each example.

    Returns:
        a scalar: sum over classes, mean over the batch.
    """
    check_tensor(lengths, "lengths", ("B", "K"))
    b, k = lengths.shape
    _check_labels_2(labels_2, b, k)
    t = labels_to_multi_hot(labels_2, k).to(lengths.dtype)  # (B, K)
    return F.margin_loss(lengths, t, m_pos, m_neg, lambda_neg)


def top2_hits(logits: torch.Tensor, labels_2: torch.Tensor) -> torch.Tensor:
    """How many of each example's two top-scored classes are true classes: ``(B,)`` in {0, 1, 2}."""
    check_tensor(logits, "logits", ("B", "K"))
    b, k = logits.shape
    _check_labels_2(labels_2, b, k)
    top = logits.topk(2, dim=1).indices  # (B, 2)
    # (B, 2, 1) == (B, 1, 2): top class p matches true class q
    match = top.unsqueeze(2) == labels_2.to(top.device).long().unsqueeze(1)
    return match.any(dim=2).sum(dim=1)  # (B,)


def top2_accuracy(logits: torch.Tensor, labels_2: torch.Tensor) -> float:
    """Fraction of examples whose two top-scored classes are exactly their two classes.

    The MultiMNIST classification error of Sabour et al. is ``1 - top2_accuracy``.
    """
    hits = top2_hits(logits, labels_2)
    return float((hits == 2).float().mean()) if hits.numel() else float("nan")


def _decoder(model):
    dec = getattr(model, "decoder", None)
    if dec is None:
        raise ValueError(f"{type(model).__name__} has no reconstruction decoder")
    return dec


def reconstruct_each(
    model,
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    poses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct two digits separately, each from its own class capsule.

    Runs ``model(images)`` (in the model's current train/eval mode) unless ``poses`` is given,
    then decodes ``model.decoder(poses, classes[:, n])`` for ``n = 0, 1``; the decoder masks
    every capsule but class ``classes[:, n]`` to zero (:func:`torchcaps.layers.mask_capsules`).

    Args:
        model: a CapsNet-style model with ``decoder`` and class-capsule ``poses``.
        images: ``(B, C, H, W)``.
        classes: ``(B, 2)`` classes to reconstruct (the true ones while training); ``None``:
            the two longest capsules (paper Fig. 5).
        poses: ``(B, K, D)`` class capsules already computed (skips the forward pass).

    Returns:
        ``(B, 2, C, H, W)``: ``[:, n]`` is the reconstruction from capsule ``classes[:, n]``.
    """
    dec = _decoder(model)
    logits = None
    if poses is None:
        out = model(images)
        if out.poses is None:
            raise ValueError(f"{type(model).__name__} returns no class-capsule poses")
        poses, logits = out.poses, out.logits
    check_tensor(poses, "poses", (images.shape[0], "K", "D"))
    b, k, d = poses.shape
    if classes is None:
        lengths = logits if logits is not None else F.capsule_length(poses)  # (B, K)
        classes = lengths.topk(2, dim=1).indices  # (B, 2)
    _check_labels_2(classes, b, k)
    # one decoder call on 2B rows: row n*B + b decodes capsule classes[b, n]
    both = poses.unsqueeze(0).expand(2, b, k, d).reshape(2 * b, k, d)  # (2B, K, D)
    index = classes.to(poses.device).long().t().reshape(2 * b)  # (2B,)
    recon = dec(both, index)  # (2B, C, H, W)
    return recon.view(2, b, *recon.shape[1:]).transpose(0, 1)  # (B, 2, C, H, W)


def two_digit_reconstruction_loss(recon_each: torch.Tensor, singles: torch.Tensor,
                                  weight: float = 0.0005) -> torch.Tensor:
    """Sum-of-squares error of each digit's reconstruction against that digit alone.

    Args:
        recon_each: ``(B, 2, C, H, W)`` from :func:`reconstruct_each`.
        singles: ``(B, 2, C, H, W)`` float, digit ``n`` alone on the canvas (same order as
            the classes given to :func:`reconstruct_each`).
        weight: scale of the summed squared error (0.0005, as on MNIST).

    Returns:
        a scalar: ``weight`` x (SSE of digit 0 + SSE of digit 1), averaged over the batch.
    """
    check_tensor(recon_each, "recon_each", ("B", 2, "C", "H", "W"))
    check_tensor(singles, "singles", tuple(recon_each.shape))
    err = (recon_each - singles.to(recon_each.dtype)).pow(2).flatten(1).sum(dim=1)  # (B,)
    return weight * err.mean()


@torch.inference_mode()
def evaluate_multimnist(model, images: torch.Tensor, labels_2: torch.Tensor,
                        batch_size: int = 256) -> dict:
    """Top-2 accuracy, error and "at least one right" rate of ``model`` on MultiMNIST tensors.

    Args:
        model: any registered model (its ``logits`` are ranked).
        images: ``(N, C, H, W)``.
        labels_2: ``(N, 2)`` the two classes of each image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = images.shape[0]
    _check_labels_2(labels_2, n, model.num_classes)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    both = one = 0
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels_2[start:start + batch_size].to(device)
        hits = top2_hits(model(x).logits, y)  # (b,)
        both += int((hits == 2).sum())
        one += int((hits >= 1).sum())
    model.train(was_training)
    acc = both / max(n, 1)
    return {"top2_accuracy": acc, "error": 1.0 - acc, "at_least_one": one / max(n, 1),
            "correct": both, "total": n}
