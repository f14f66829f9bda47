"""The short training loop the probe scripts share (not a benchmark itself)."""

from __future__ import annotations

import torch

from torchcaps.data import random_shift


def adam_steps(model, train, steps: int, batch: int, lr: float) -> list[float]:
    """Train ``model`` for ``steps`` Adam steps on a seed-0 permutation of ``train``.

    Batches of ``batch`` images, random shifts of up to 2 px, the model's own loss. Returns the
    training accuracy of every step.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train), generator=g)
    acc = []
    model.train()
    for s in range(steps):
        x, y = train.batch(perm[s * batch:(s + 1) * batch])
        x = random_shift(x, 2, g)
        out = model(x, y)
        loss, _ = model.loss(out, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append((out.logits.argmax(1) == y).float().mean().item())
    return acc
