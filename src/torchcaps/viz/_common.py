"""What every figure writer shares: a pyplot-free figure, saving, and the path it returns.

Figures are built on :class:`matplotlib.figure.Figure` directly and written with its own
Agg canvas, so using :mod:`torchcaps.viz` never imports :mod:`matplotlib.pyplot` nor
changes the user's backend.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure


class FigurePath(type(Path())):
    """The path a figure was written to, plus ``notes``: lines a caller should print.

    It is a :class:`pathlib.Path` (``str(p)``, ``p == Path(...)`` work as before); ``notes``
    say when the figure shows less than it seems to, e.g. perturbations with no visible
    effect. Empty when there is nothing to add.
    """

    notes: tuple[str, ...] = ()


def save(fig: Figure, path: str | Path, dpi: int, notes=()) -> FigurePath:
    fig.savefig(path, dpi=dpi)
    out = FigurePath(path)
    out.notes = tuple(notes)
    return out


def show_image(ax, img: torch.Tensor) -> None:
    """Draw one ``(C, H, W)`` image: grey for 1 channel, RGB for 3, channel mean otherwise."""
    img = img.detach().float().cpu()
    if img.shape[0] == 3:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    else:
        ax.imshow(img.mean(0).numpy(), cmap="gray", vmin=0, vmax=max(1.0, float(img.max())))
    ax.set_xticks([])
    ax.set_yticks([])
