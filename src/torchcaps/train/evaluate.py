"""Evaluation helpers: accuracy, loss and confusion matrix over a split."""

from __future__ import annotations

import torch

from ..data import Split
from ..models import CapsuleModel

__all__ = ["evaluate", "format_confusion"]


@torch.inference_mode()
def evaluate(model: CapsuleModel, split: Split, batch_size: int = 128) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    was_training = model.training
    model.eval()
    k = model.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    total_loss, n = 0.0, len(split)
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        x, y = split.batch(slice(start, start + batch_size))
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss, _ = model.loss(out, x, y)
        total_loss += float(loss) * len(y)
        pred = out.logits.argmax(dim=1)
        confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k).cpu()
    model.train(was_training)
    correct = int(confusion.diag().sum())
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1),
            "correct": correct, "total": n, "confusion": confusion.tolist()}


def format_confusion(confusion: list[list[int]]) -> str:
    """A fixed-width text table of a confusion matrix (rows true, columns predicted)."""
    k = len(confusion)
    width = max(5, max(len(str(v)) for row in confusion for v in row) + 1)
    head = "true\\pred" + "".join(f"{j:>{width}}" for j in range(k))
    rows = [f"{i:>9}" + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(confusion)]
    return "\n".join([head, *rows])
