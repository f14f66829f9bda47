"""Whole-volume prediction and segmentation metrics (MONAI).

:func:`predict_volume` runs a model over a whole volume with MONAI's sliding-window
inference (Gaussian-weighted blending of overlapping windows). A 2D model is run over the
axial slices one by one (each slice by sliding windows) and its slices are stacked, so 2D
and 3D models are scored on the same voxels.

:func:`segmentation_metrics` scores a predicted label map against the truth with MONAI's
Dice (per class) and 95th-percentile Hausdorff distance (per class, in millimetres when the
voxel spacing is given). A class absent from both maps has no Dice (NaN, left out of means);
``mean_dice`` is the mean over the foreground classes (every class but 0), the figure
papers report for tissue segmentation.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["predict_volume", "segmentation_metrics", "evaluate_segmentation"]


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, patch: tuple[int, ...],
                   overlap: float = 0.5, sw_batch_size: int = 4,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Class probabilities ``(K, D, H, W)`` of ``model`` over a whole volume ``(C, D, H, W)``.

    ``patch`` is the window: ``(D, H, W)`` for a 3D model, ``(H, W)`` for a 2D one.
    """
    from monai.inferers import sliding_window_inference

    if image.dim() != 4:
        raise ValueError(f"image must be a volume (C, D, H, W), got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x).logits.float(), dim=1)

    try:
        x = image.to(device)
        if len(patch) == 3:
            return sliding_window_inference(x[None], patch, sw_batch_size, predictor,
                                            overlap=overlap, mode="gaussian")[0].cpu()
        if len(patch) != 2:
            raise ValueError(f"patch must be (H, W) or (D, H, W), got {patch!r}")
        slices = x.permute(1, 0, 2, 3)  # (D, C, H, W): the axial slices as a batch
        out = [sliding_window_inference(slices[z:z + sw_batch_size], patch, sw_batch_size,
                                        predictor, overlap=overlap, mode="gaussian").cpu()
               for z in range(0, slices.shape[0], sw_batch_size)]
        return torch.cat(out).permute(1, 0, 2, 3)  # (K, D, H, W)
    finally:
        model.train(was_training)


def segmentation_metrics(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         spacing: tuple[float, ...] | None = None,
                         hausdorff: bool = True) -> dict:
    """Dice and HD95 per class of a predicted label map ``(D, H, W)`` (or ``(H, W)``).

    Returns ``{"dice": [per class], "mean_dice": float, "hd95": [per class]}`` (``hd95``
    only with ``hausdorff``; in voxels unless ``spacing`` is given).
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    if pred.shape != labels.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(labels.shape)} "
                         "differ in shape")
    p = one_hot(pred[None, None].long(), num_classes, dim=1)  # (1, K, *S)
    y = one_hot(labels[None, None].long(), num_classes, dim=1)
    dice = compute_dice(p, y, include_background=True, ignore_empty=False)[0]
    both_empty = (p.sum(dim=tuple(range(2, p.dim()))) == 0) & (y.sum(dim=tuple(range(2, y.dim()))) == 0)
    dice = torch.where(both_empty[0], torch.nan, dice)
    out = {"dice": [float(d) for d in dice]}
    fg = [d for d in out["dice"][1:] if not math.isnan(d)]
    out["mean_dice"] = sum(fg) / len(fg) if fg else math.nan
    if hausdorff:
        with warnings.catch_warnings():  # MONAI warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(p, y, include_background=True, percentile=95,
                                            spacing=list(spacing) if spacing else None)[0]
        out["hd95"] = [float(h) for h in hd]
    return out


def evaluate_segmentation(model: nn.Module, items, num_classes: int, patch: tuple[int, ...],
                          spacing: tuple[float, ...] | None = None, hausdorff: bool = True,
                          overlap: float = 0.5, sw_batch_size: int = 4) -> dict:
    """Metrics over labelled items, the volumes concatenated (one Dice per class overall).

    Returns the :func:`segmentation_metrics` of the whole split plus ``voxels``.
    """
    preds, truths = [], []
    for item in items:
        probs = predict_volume(model, item.image, patch, overlap, sw_batch_size)
        preds.append(probs.argmax(0).flatten())
        truths.append(item.labels.flatten())
    pred, truth = torch.cat(preds), torch.cat(truths)
    res = segmentation_metrics(pred, truth, num_classes, hausdorff=False)
    if hausdorff:  # surface distances are per volume: average them over the volumes
        per = [segmentation_metrics(predict.view(item.labels.shape), item.labels, num_classes,
                                    spacing)["hd95"]
               for predict, item in zip(_split_like(pred, items), items)]
        res["hd95"] = [_nanmean([h[k] for h in per]) for k in range(num_classes)]
    res["voxels"] = int(truth.numel())
    return res


def _split_like(flat: torch.Tensor, items) -> list[torch.Tensor]:
    return list(torch.split(flat, [it.labels.numel() for it in items]))


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return sum(ok) / len(ok) if ok else math.nan
