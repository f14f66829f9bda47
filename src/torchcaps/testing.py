"""Test helpers shipped with the library, for torchcaps' own tests and for extensions.

* :func:`assert_rejects_bad_votes`: a routing algorithm refuses votes of the wrong shape,
  rank or dtype, and non-finite votes, each with one clear error.
* :func:`overfit_tiny_batch`: trains a model on a handful of real MNIST images with the
  training engine and returns the final loss and training accuracy (a model that cannot
  overfit 16 images is broken).

No test framework is needed: failures raise ``AssertionError``.
"""

from __future__ import annotations

import contextlib
import io
import re

import torch

__all__ = ["assert_rejects_bad_votes", "overfit_tiny_batch"]


def _raises(kind: type[Exception], pattern: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except kind as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"{kind.__name__} raised, but {str(e)!r} does not match "
                                 f"{pattern!r}") from e
        return
    raise AssertionError(f"expected {kind.__name__} matching {pattern!r}; nothing was raised")


def assert_rejects_bad_votes(routing, num_parents: int, parent_dim: int, **kwargs) -> None:
    """Check the four standard bad-vote errors of a routing built for ``(J, D)`` parents.

    ``kwargs`` are passed to every call (e.g. optional extra inputs).
    """
    j, d = num_parents, parent_dim
    _raises(ValueError, rf"votes must have shape \(B, I, {j}, {d}\)", routing,
            torch.randn(2, 5, j + 1, d), **kwargs)
    _raises(ValueError, "votes must have 4 dimensions", routing, torch.randn(2, 5, j), **kwargs)
    bad = torch.randn(2, 5, j, d)
    bad[0, 1, j - 1, d - 1] = float("nan")
    _raises(ValueError, r"votes contains non-finite values \(1 NaN", routing, bad, **kwargs)
    _raises(TypeError, "floating-point", routing, torch.ones(2, 5, j, d, dtype=torch.int64),
            **kwargs)


def overfit_tiny_batch(model, steps: int, lr: float, n: int = 16) -> tuple[float, float]:
    """Adam on the first ``n`` bundled MNIST training images; returns (last loss, accuracy).

    Runs the training engine in memory (nothing is written): one full batch per epoch, no
    augmentation, a constant rate.
    """
    from .data import DatasetSplits, Split, load_dataset
    from .train import ClassificationTask, TrainConfig, Trainer

    x, y = load_dataset("mnist-mini").train.batch(slice(0, n))
    train = Split(x, y)
    data = DatasetSplits("tiny", train, Split(x[:2], y[:2]), train, model.num_classes)
    cfg = TrainConfig(out=None, epochs=steps, batch_size=n, lr=lr, lr_decay=1.0, max_shift=0,
                      progress=False, device=str(next(model.parameters()).device))
    trainer = Trainer(ClassificationTask(data, model), cfg)
    with contextlib.redirect_stderr(io.StringIO()):  # per-epoch lines of a 1-batch epoch
        trainer.fit()
    model.eval()
    with torch.no_grad():
        acc = (model(x).logits.argmax(1) == y).float().mean().item()
    return trainer.history[-1]["train_loss"], acc
