"""Explanation figures for capsule classifiers (PNG, matplotlib Agg).

* :func:`routing_map_figure`: which primary capsules voted for the predicted class. For the
  routing couplings ``c_ij`` of the last routing layer (``ModelOutput.couplings``, ``(B, I, J)``)
  and the predicted class ``j``, each primary capsule ``i`` gets the score

      s_i = c_ij * |u_i|     (``weight="length"``, the default)
      s_i = c_ij             (``weight="coupling"``)

  where ``|u_i|`` is the primary capsule's length (its probability of being present, Sabour,
  Frosst, Hinton 2017, arXiv 1710.09829, Sec. 2). ``c_ij`` alone says how a capsule *divides*
  its vote among classes (it sums to 1 over classes with dynamic routing, Eq. 3, however weak
  the capsule); multiplying by ``|u_i|`` shows how much vote actually reached class ``j``
  (the norm of ``c_ij u_hat_j|i`` is proportional to it up to the vote transform). Scores are
  summed over primary types into the ``H' x W'`` grid, then resized (bilinear) onto the image.
  The resize is coarse: in CapsNet each of the 6x6 primary positions sees a 25x25 patch of
  the 28x28 input, so the map says roughly *where*, not which pixel.
* :func:`capsule_length_figure`: per image, the image on the left and the class-capsule
  lengths as bars on the right, the predicted class highlighted and the 0.5 line drawn (a
  capsule longer than 0.5 "says" its entity is present; the margin loss pushes present
  classes above 0.9 and absent ones below 0.1).

Primary capsules are ordered type-major, index ``t*H'*W' + h*W' + w``
(:func:`torchcaps.layers.primary.channels_to_capsules`), so ``(I,)`` reshapes to
``(T, H', W')``. The grid is found, in order, from: an explicit ``grid=(T, H', W')``; the
model's ``primary`` module (its ``output_size`` applied to the spatial size of the tensor it
received, caught by a forward hook); ``primary.num_types`` with a square grid; a square grid
of one type (a guess, flagged in the figure). The ``primary`` module is trusted only when
the capsules it outputs are the routed children (same count). Otherwise a ``ValueError``
asks for ``grid``.

Letter legend: ``B`` batch, ``I`` primary capsules, ``J``/``K`` classes, ``T`` primary types,
``H', W'`` primary grid, ``C, H, W`` image.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import functional as F  # noqa: E402
from .._validate import check_tensor  # noqa: E402

__all__ = ["routing_map", "routing_map_figure", "capsule_length_figure"]


def _one_image(model, image: torch.Tensor) -> torch.Tensor:
    in_shape = tuple(getattr(model, "in_shape", ()))
    if len(in_shape) != 3:
        raise ValueError(f"{type(model).__name__} has no in_shape (C, H, W)")
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    check_tensor(image, "image", (1, *in_shape))
    return image


def _show(ax, img: torch.Tensor) -> None:
    """Draw one ``(C, H, W)`` image: grey for 1 channel, RGB for 3, channel mean otherwise."""
    img = img.detach().float().cpu()
    if img.shape[0] == 3:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    else:
        ax.imshow(img.mean(0).numpy(), cmap="gray", vmin=0, vmax=max(1.0, float(img.max())))
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(model, n_children: int, seen: dict, grid) -> tuple[tuple[int, int, int], str]:
    """``(T, H', W')`` of the routed children and where it came from."""
    if grid is not None:
        t, h, w = (int(g) for g in grid)
        if t * h * w != n_children:
            raise ValueError(f"grid {tuple(grid)} holds {t * h * w} capsules, "
                             f"but the couplings have {n_children}")
        return (t, h, w), "given"
    primary = getattr(model, "primary", None)
    # trust the primary layer only if its capsules are the routed children
    if seen.get("n_out") == n_children:
        if "in_hw" in seen and hasattr(primary, "output_size"):
            h, w = primary.output_size(*seen["in_hw"])
            if h * w > 0 and n_children % (h * w) == 0:
                return (n_children // (h * w), h, w), "primary"
        t = getattr(primary, "num_types", None)
        if isinstance(t, int) and t > 0 and n_children % t == 0:
            side = math.isqrt(n_children // t)
            if side * side * t == n_children:
                return (t, side, side), "num_types"
    side = math.isqrt(n_children)
    if side * side == n_children:
        return (1, side, side), "square guess"
    raise ValueError(f"cannot infer the primary capsule grid of {n_children} capsules for "
                     f"{type(model).__name__}; pass grid=(types, H', W')")


@torch.inference_mode()
def routing_map(model, image: torch.Tensor, *, weight: str = "length",
                grid: tuple[int, int, int] | None = None) -> dict:
    """Where the votes for the predicted class came from (see the module docstring).

    Args:
        model: a routed capsule model whose output has ``couplings`` ``(B, I, J)``.
        image: one image ``(1, C, H, W)`` or ``(C, H, W)``.
        weight: ``"length"`` (coupling x primary-capsule length; falls back to
            ``"coupling"`` when the primary capsules cannot be observed) or ``"coupling"``.
        grid: ``(T, H', W')`` of the primary capsules, if it cannot be inferred.

    Returns:
        dict with ``map`` ``(H', W')`` (scores summed over types), ``per_type``
        ``(T, H', W')``, ``upsampled`` ``(H, W)``, ``pred`` (class), ``length`` (its logit),
        ``grid``, ``grid_source`` (``"given"``, ``"primary"``, ``"num_types"`` or
        ``"square guess"``) and ``weight`` (the weighting actually used).
    """
    if weight not in ("length", "coupling"):
        raise ValueError(f"weight must be 'length' or 'coupling', got {weight!r}")
    image = _one_image(model, image)
    seen: dict = {}
    handle = None
    primary = getattr(model, "primary", None)
    if isinstance(primary, torch.nn.Module):
        def hook(_module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4:
                seen["in_hw"] = tuple(inputs[0].shape[-2:])
            if isinstance(output, torch.Tensor) and output.dim() == 3:
                seen["u"] = output  # (1, I, D)
                seen["n_out"] = output.shape[1]
        handle = primary.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        out = model(image)
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    if out.couplings is None:
        raise ValueError(f"{type(model).__name__} returns no routing couplings "
                         "(ModelOutput.couplings is None), so there is no routing map to draw")
    c = out.couplings[0].float()  # (I, J)
    n_children = c.shape[0]
    pred = int(out.logits[0].argmax())
    (t, gh, gw), source = _grid(model, n_children, seen, grid)
    score = c[:, pred]  # (I,)
    used = "coupling"
    u = seen.get("u")
    if weight == "length" and u is not None and seen.get("n_out") == n_children:
        score = score * F.capsule_length(u[0].float())  # (I,) * (I,)
        used = "length"
    per_type = score.reshape(t, gh, gw)  # type-major: t*H'*W' + h*W' + w
    cell = per_type.sum(0)  # (H', W')
    h, w = image.shape[-2:]
    up = torch.nn.functional.interpolate(cell[None, None], size=(h, w), mode="bilinear",
                                         align_corners=False)[0, 0]  # (H, W)
    return {"map": cell.cpu(), "per_type": per_type.cpu(), "upsampled": up.cpu(), "pred": pred,
            "length": float(out.logits[0, pred]), "grid": (t, gh, gw), "grid_source": source,
            "weight": used}


def routing_map_figure(model, image: torch.Tensor, path: str | Path, *, weight: str = "length",
                       grid: tuple[int, int, int] | None = None, dpi: int = 100) -> Path:
    """Write the routing map of one image to ``path`` (PNG, 9 x 3.4 inches) and return the path.

    Panels: the input; the map resized over the input (the input's outline in cyan); the
    ``H' x W'`` primary grid itself. Colour scales run from the map's minimum to its maximum.
    """
    r = routing_map(model, image, weight=weight, grid=grid)
    img = _one_image(model, image)[0]
    t, gh, gw = r["grid"]
    what = "coupling x primary length" if r["weight"] == "length" else "coupling"
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    _show(axes[0], img)
    axes[0].set_title("input", fontsize=9)
    _show(axes[1], img)
    im = axes[1].imshow(r["upsampled"].numpy(), cmap="inferno", alpha=0.6)
    gray = img.detach().float().cpu().mean(0)  # (H, W): outline the input over the map
    if float(gray.max()) > float(gray.min()):
        mid = 0.5 * (float(gray.max()) + float(gray.min()))
        axes[1].contour(gray.numpy(), levels=[mid], colors="cyan", linewidths=0.8)
    axes[1].set_title(f"votes for class {r['pred']} over the input", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    im2 = axes[2].imshow(r["map"].numpy(), cmap="inferno")
    guessed = ", guessed square" if r["grid_source"] == "square guess" else ""
    axes[2].set_title(f"primary grid {gh}x{gw} (sum of {t} types{guessed})", fontsize=9)
    axes[2].set_xlabel("w'", fontsize=8)
    axes[2].set_ylabel("h'", fontsize=8)
    fig.colorbar(im2, ax=axes[2], fraction=0.046, pad=0.04)
    fig.suptitle(f"Predicted class {r['pred']} (score {r['length']:.2f}): "
                 f"where its votes came from ({what})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.inference_mode()
def capsule_length_figure(model, images: torch.Tensor, path: str | Path,
                          labels: torch.Tensor | None = None, *, threshold: float = 0.5,
                          max_images: int = 16, dpi: int = 100) -> Path:
    """Class-capsule lengths as bars beside each image, written to ``path`` (PNG).

    The figure is 7 inches wide and ``1.8 * N + 0.6`` inches high for ``N`` images.

    Args:
        model: a model whose output has class-capsule ``poses`` ``(B, K, D)``.
        images: ``(N, C, H, W)``, ``1 <= N <= max_images``.
        labels: optional ``(N,)`` true classes, shown in each row's title.
        threshold: the horizontal line (0.5: "present").
    """
    in_shape = tuple(getattr(model, "in_shape", ()))
    check_tensor(images, "images", ("N", *in_shape))
    n = images.shape[0]
    if not 1 <= n <= max_images:
        raise ValueError(f"images must hold 1 to {max_images} images, got {n}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (n,)):
        raise ValueError(f"labels must be a tensor of shape ({n},)")
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    if out.poses is None:
        raise ValueError(f"{type(model).__name__} has no class capsules (ModelOutput.poses "
                         "is None); capsule lengths are undefined")
    lengths = F.capsule_length(out.poses.float()).cpu()  # (N, K)
    pred = out.logits.argmax(1).cpu()  # (N,)
    k = lengths.shape[1]
    top = max(1.0, float(lengths.max()) * 1.05)
    fig, axes = plt.subplots(n, 2, figsize=(7, 1.8 * n + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]})
    for r in range(n):
        _show(axes[r, 0], images[r])
        ax = axes[r, 1]
        colors = ["tab:orange" if c == int(pred[r]) else "tab:gray" for c in range(k)]
        ax.bar(range(k), lengths[r].numpy(), color=colors)
        p = int(pred[r])
        ax.text(p, float(lengths[r, p]), f"{float(lengths[r, p]):.2f}", ha="center",
                va="bottom", fontsize=7)
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{threshold:g} threshold")
        ax.set_xticks(range(k))
        ax.set_ylim(0, top)
        ax.set_ylabel("length", fontsize=8)
        title = f"predicted {int(pred[r])}"
        if labels is not None:
            title = f"true {int(labels[r])}, " + title
        axes[r, 0].set_title(title, fontsize=8)
        if r == 0:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1, 1].set_xlabel("class (orange: predicted)", fontsize=8)
    fig.suptitle("Class-capsule lengths", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
