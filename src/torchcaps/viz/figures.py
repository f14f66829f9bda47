"""PNG figures a person can read without the code.

* :func:`reconstruction_figure`: inputs (top row) above their reconstructions from
  the longest class capsule (bottom row), with true/predicted labels.
* :func:`perturbation_figure`: Sabour et al. Figure 4. The predicted class capsule
  of one image has each of its dimensions swept over ``[-0.25, 0.25]`` (11 steps)
  while the others stay fixed; each row is one dimension, decoded to an image. Early in
  training the decoder ignores the pose and every cell shows the same image; the figure
  then says so, and returns the same words in ``notes``.

Both return a :class:`~torchcaps.viz.FigurePath`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ._common import FigurePath, save

__all__ = ["perturbation_grid", "perturbation_figure", "reconstruction_figure"]


def _decoder(model):
    dec = getattr(model, "decoder", None)
    if dec is None:
        raise ValueError(f"{type(model).__name__} has no reconstruction decoder")
    return dec


@torch.inference_mode()
def perturbation_grid(model, image: torch.Tensor, steps: int = 11, span: float = 0.25):
    """Decoded images ``(D, steps, C, H, W)`` for each pose dimension swept over ``[-span, span]``.

    Args:
        model: a model with ``decoder`` and class-capsule ``poses`` in its output.
        image: one image ``(1, C, H, W)``.
    """
    model.eval()
    out = model(image)
    pred = out.logits.argmax(1)  # (1,)
    poses = out.poses  # (1, J, D)
    d = poses.shape[-1]
    deltas = torch.linspace(-span, span, steps)
    # (D, steps, J, D): copy of the poses with dimension k of the predicted capsule shifted
    grid = poses.expand(d, steps, *poses.shape[1:]).clone()
    for k in range(d):
        grid[k, :, pred[0], k] += deltas
    dec = _decoder(model)
    imgs = dec(grid.reshape(d * steps, *poses.shape[1:]), pred.expand(d * steps))
    return imgs.view(d, steps, *imgs.shape[1:]), deltas, int(pred[0])


def _signed(v: float) -> str:
    """``+0.05``, ``-0.25``; ``0.00`` for anything that rounds to zero (never ``-0.00``)."""
    v = round(v, 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.2f}" if v else "0.00"


def perturbation_figure(model, image: torch.Tensor, path: str | Path, steps: int = 11,
                        span: float = 0.25, min_change: float = 0.25) -> FigurePath:
    """Write the perturbation grid of ``image`` ``(1, C, H, W)`` to ``path`` (PNG).

    Each row is labelled with its largest pixel change, ``max |x(a) - x(b)|`` over the
    row's images ``a, b`` and all pixels (in ``[0, 1]``). A row changing less than
    ``min_change`` (default: a quarter of the grey range, hard to see at this size) is
    marked as having no visible effect.

    Returns:
        The path; its ``notes`` say when some or all rows have no visible effect.
    """
    imgs, deltas, pred = perturbation_grid(model, image, steps, span)  # (D, S, C, H, W)
    d = imgs.shape[0]
    change = (imgs.amax(1) - imgs.amin(1)).flatten(1).amax(1)  # (D,) largest change per row
    flat = change < min_change
    notes = []
    if flat.all():
        notes.append(f"perturbation: no visible effect, no capsule dimension changes any pixel "
                     f"by {min_change:g} or more (largest change {float(change.max()):.3f}); "
                     "the decoder barely uses the pose yet (train longer)")
    elif flat.any():
        notes.append(f"perturbation: {int(flat.sum())} of {d} dimensions change no pixel by "
                     f"{min_change:g} or more (rows marked 'no effect')")
    fig = Figure(figsize=(steps * 0.8 + 0.4, d * 0.8 + 1.1))
    axes = fig.subplots(d, steps, squeeze=False)
    for k in range(d):
        for s in range(steps):
            ax = axes[k, s]
            ax.imshow(imgs[k, s].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(_signed(float(deltas[s])), fontsize=7)
        label = f"dim {k}\nchange {float(change[k]):.2f}" + ("\nno effect" if flat[k] else "")
        axes[k, 0].set_ylabel(label, fontsize=6, color="tab:red" if flat[k] else "black")
    title = (f"Capsule-dimension perturbations of predicted class {pred} "
             "(rows: dimension, columns: added value)")
    if flat.all():
        title += (f"\nNO VISIBLE EFFECT: no dimension changes any pixel by {min_change:g} or "
                  "more; the decoder barely uses the pose so far")
    fig.suptitle(title, fontsize=9, color="tab:red" if flat.all() else "black")
    fig.tight_layout()
    return save(fig, path, 80, notes)


@torch.inference_mode()
def reconstruction_figure(model, images: torch.Tensor, path: str | Path,
                          labels: torch.Tensor | None = None) -> FigurePath:
    """Inputs above reconstructions from the longest capsule, written to ``path`` (PNG)."""
    _decoder(model)
    model.eval()
    out = model(images)
    pred = out.logits.argmax(1)
    n = images.shape[0]
    fig = Figure(figsize=(n * 1.1, 2.6))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for r, img in enumerate((images[i], out.reconstruction[i])):
            ax = axes[r, i]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        title = f"pred {int(pred[i])}" if labels is None else f"{int(labels[i])}->{int(pred[i])}"
        axes[0, i].set_title(title, fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("recon.", fontsize=8)
    fig.tight_layout()
    return save(fig, path, 80)
