"""Test helpers shipped with the library, for torchcaps' own tests and for extensions (needs pytest).

* :func:`assert_rejects_bad_votes`: a routing algorithm refuses votes of the wrong shape,
  rank or dtype, and non-finite votes, each with one clear error.
* :func:`overfit_tiny_batch`: trains a model on a handful of real MNIST images and returns
  the final loss and training accuracy (a model that cannot overfit 16 images is broken).
"""

from __future__ import annotations

import pytest
import torch

__all__ = ["assert_rejects_bad_votes", "overfit_tiny_batch"]


def assert_rejects_bad_votes(routing, num_parents: int, parent_dim: int, **kwargs) -> None:
    """Check the four standard bad-vote errors of a routing built for ``(J, D)`` parents.

    ``kwargs`` are passed to every call (e.g. optional extra inputs).
    """
    j, d = num_parents, parent_dim
    with pytest.raises(ValueError, match=rf"votes must have shape \(B, I, {j}, {d}\)"):
        routing(torch.randn(2, 5, j + 1, d), **kwargs)
    with pytest.raises(ValueError, match="votes must have 4 dimensions"):
        routing(torch.randn(2, 5, j), **kwargs)
    bad = torch.randn(2, 5, j, d)
    bad[0, 1, j - 1, d - 1] = float("nan")
    with pytest.raises(ValueError, match=r"votes contains non-finite values \(1 NaN"):
        routing(bad, **kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        routing(torch.ones(2, 5, j, d, dtype=torch.int64), **kwargs)


def overfit_tiny_batch(model, steps: int, lr: float, n: int = 16) -> tuple[float, float]:
    """Adam on the first ``n`` bundled MNIST training images; returns (last loss, accuracy)."""
    from .data import load_dataset

    x, y = load_dataset("mnist-mini").train.batch(slice(0, n))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss, _ = model.loss(model(x, y), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).logits.argmax(1) == y).float().mean().item()
    return loss.item(), acc
