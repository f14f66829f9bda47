"""PNG figures a person can read without the code.

* :func:`reconstruction_figure`: inputs (top row) above their reconstructions from
  the longest class capsule (bottom row), with true/predicted labels.
* :func:`perturbation_figure`: Sabour et al. Figure 4. The predicted class capsule
  of one image has each of its dimensions swept over ``[-0.25, 0.25]`` (11 steps)
  while the others stay fixed; each row is one dimension, decoded to an image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

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


def perturbation_figure(model, image: torch.Tensor, path: str | Path, steps: int = 11,
                        span: float = 0.25) -> Path:
    """Write the perturbation grid of ``image`` ``(1, C, H, W)`` to ``path`` (PNG)."""
    imgs, deltas, pred = perturbation_grid(model, image, steps, span)
    d = imgs.shape[0]
    fig, axes = plt.subplots(d, steps, figsize=(steps * 0.8, d * 0.8 + 0.8), squeeze=False)
    for k in range(d):
        for s in range(steps):
            ax = axes[k, s]
            ax.imshow(imgs[k, s].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(f"{float(deltas[s]) + 0.0:+.2f}", fontsize=7)
            if s == 0:
                ax.set_ylabel(f"dim {k}", fontsize=7)
    fig.suptitle(f"Capsule-dimension perturbations of predicted class {pred} "
                 f"(rows: dimension, columns: added value)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@torch.inference_mode()
def reconstruction_figure(model, images: torch.Tensor, path: str | Path,
                          labels: torch.Tensor | None = None) -> Path:
    """Inputs above reconstructions from the longest capsule, written to ``path`` (PNG)."""
    _decoder(model)
    model.eval()
    out = model(images)
    pred = out.logits.argmax(1)
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(n * 1.1, 2.6), squeeze=False)
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
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
