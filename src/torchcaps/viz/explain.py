"""Explanation figures for capsule classifiers (PNG, drawn without pyplot).

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
  summed over primary types into the ``H' x W'`` grid. The figure shows each cell's *share*
  of the class's votes, on a scale from 0, beside the share every cell would get if all were
  equal (``1 / (H' W')``): a map whose cells all hold about that share is flat, whatever
  its colours.
* :func:`capsule_length_figure`: per image, the image on the left and the class-capsule
  lengths as bars on the right, the predicted class highlighted and the 0.5 line drawn (a
  capsule longer than 0.5 "says" its entity is present; the margin loss pushes present
  classes above 0.9 and absent ones below 0.1).

Primary capsules are ordered type-major, index ``t*H'*W' + h*W' + w``
(:func:`torchcaps.layers.primary.channels_to_capsules`), so ``(I,)`` reshapes to
``(T, H', W')``: row ``h`` runs down the image, column ``w`` across it. The grid is found, in
order, from: an explicit ``grid=(T, H', W')``; the model's ``primary`` module (its
``output_size`` applied to the spatial size of the tensor it received, caught by a forward
hook); ``primary.num_types`` with a square grid; a square grid of one type (a guess, flagged
in the figure). The ``primary`` module is trusted only when the capsules it outputs are the
routed children (same count). Otherwise a ``ValueError`` asks for ``grid``.

Where a cell sits on the image: the convolutions and poolings run from the image up to the
``primary`` module are recorded, and, when they form one chain ending on the grid (not a
guessed one), composed into each cell's receptive field (``receptive_field``, ``stride`` and
``first_centre`` in input pixels). In CapsNet (9x9 conv, then 9x9 stride 2) cell ``(h, w)``
sees the 17x17 patch centred on pixel ``(8 + 2h, 8 + 2w)``: the 6x6 cell centres span only
the middle 11x11 pixels of the 28x28 input, and the map is drawn there. Stretching the grid
over the whole image would put cell ``(0, 0)`` on the empty top-left corner although it
sees the centre.
Without such a chain the grid is stretched over the image, and the figure says so.

Letter legend: ``B`` batch, ``I`` primary capsules, ``J``/``K`` classes, ``T`` primary types,
``H', W'`` primary grid, ``C, H, W`` image.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from .. import functional as F
from .._validate import check_tensor
from ._common import FigurePath, save, show_image

__all__ = ["routing_map", "routing_map_figure", "capsule_length_figure"]

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _one_image(model, image: torch.Tensor) -> torch.Tensor:
    in_shape = tuple(getattr(model, "in_shape", ()))
    if len(in_shape) != 3:
        raise ValueError(f"{type(model).__name__} has no in_shape (C, H, W)")
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    check_tensor(image, "image", (1, *in_shape))
    return image


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


def _geometry(chain: list, image_hw: tuple, grid_hw: tuple) -> dict:
    """Receptive field, stride and first cell centre (input pixels, per axis) of the grid.

    ``chain`` holds ``(layer, in_hw, out_hw)`` of the conv/pool layers run before the
    primary capsules were made, in call order. Composed per axis, layer by layer (kernel
    ``k``, stride ``s``, padding ``p``, dilation ``d``):

        centre += ((d (k - 1)) / 2 - p) * jump;  rf += d (k - 1) * jump;  jump *= s

    Falls back to stretching the grid over the image (``receptive_field`` ``None``) when
    the layers do not form one chain from the image to the grid. (Parallel branches of
    equal sizes would pass for a chain and overstate the field; no registered model has
    them before its primary capsules.)
    """
    rf, jump, centre, hw = [1, 1], [1, 1], [0.0, 0.0], tuple(image_hw)
    chained = bool(chain)
    for layer, in_hw, out_hw in chain:
        if in_hw != hw or isinstance(layer.padding, str):
            chained = False
            break
        for a in range(2):
            k, s, p, d = (v if isinstance(v, int) else v[a] for v in (
                layer.kernel_size, layer.stride, layer.padding, getattr(layer, "dilation", 1)))
            centre[a] += (d * (k - 1) / 2 - p) * jump[a]
            rf[a] += d * (k - 1) * jump[a]
            jump[a] *= s
        hw = out_hw
    if chained and hw == tuple(grid_hw):
        return {"receptive_field": tuple(rf), "stride": tuple(jump), "first_centre": tuple(centre)}
    step = [image_hw[a] / grid_hw[a] for a in range(2)]
    return {"receptive_field": None, "stride": tuple(step),
            "first_centre": tuple((s - 1) / 2 for s in step)}


def _place(cell: torch.Tensor, geometry: dict, image_hw: tuple) -> torch.Tensor:
    """Resample the ``(H', W')`` grid onto the ``(H, W)`` image, each cell centred where
    ``geometry`` puts it (bilinear between centres, 0 beyond the outer cells' edges)."""
    gh, gw = cell.shape
    (ch, cw), (jh, jw) = geometry["first_centre"], geometry["stride"]
    # pixel -> grid_sample coordinate: cell index q = (pixel - centre) / jump, -1..1 spans
    # the outer cell edges q = -0.5 .. n - 0.5 (align_corners=False)
    ys = ((torch.arange(image_hw[0]) - ch) / jh + 0.5) / gh * 2 - 1  # (H,)
    xs = ((torch.arange(image_hw[1]) - cw) / jw + 0.5) / gw * 2 - 1  # (W,)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    where = torch.stack([gx, gy], -1)[None].to(cell.dtype)  # (1, H, W, 2), x first
    up = torch.nn.functional.grid_sample(cell[None, None], where, mode="bilinear",
                                         padding_mode="border", align_corners=False)[0, 0]
    return up * ((gx.abs() <= 1) & (gy.abs() <= 1))  # (H, W)


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
        dict with ``map`` ``(H', W')`` (scores summed over types), ``share`` ``(H', W')``
        (``map`` over its sum), ``uniform_share`` (``1 / (H' W')``), ``per_type``
        ``(T, H', W')``, ``upsampled`` ``(H, W)`` (``map`` placed on the image, see
        ``geometry``), ``geometry`` (``receptive_field``, ``stride``, ``first_centre`` in
        input pixels as ``(y, x)``; ``receptive_field`` is ``None`` when the grid could only
        be stretched over the image), ``pred`` (class), ``length`` (its logit), ``grid``,
        ``grid_source`` (``"given"``, ``"primary"``, ``"num_types"`` or ``"square guess"``)
        and ``weight`` (the weighting actually used).
    """
    if weight not in ("length", "coupling"):
        raise ValueError(f"weight must be 'length' or 'coupling', got {weight!r}")
    image = _one_image(model, image)
    seen: dict = {}
    chain: list = []  # (layer, in_hw, out_hw) of conv/pool layers run before the primaries
    handles = []
    primary = getattr(model, "primary", None)

    def record(layer, inputs, output):
        if "done" not in seen and inputs and inputs[0].dim() == 4:
            chain.append((layer, tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])))

    def hook(_module, inputs, output):
        seen["done"] = True
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4:
            seen["in_hw"] = tuple(inputs[0].shape[-2:])
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            seen["u"] = output  # (1, I, D)
            seen["n_out"] = output.shape[1]

    was_training = model.training
    try:
        handles = [m.register_forward_hook(record) for m in model.modules()
                   if isinstance(m, _SPATIAL)]
        if isinstance(primary, nn.Module):
            handles.append(primary.register_forward_hook(hook))
        model.eval()
        out = model(image)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
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
    total = float(cell.sum())
    share = cell / total if total > 0 else torch.zeros_like(cell)  # (H', W')
    hw = tuple(image.shape[-2:])
    # a guessed grid need not be spatial at all: stretch it rather than claim a geometry
    spatial = "done" in seen and source != "square guess"
    geometry = _geometry(chain if spatial else [], hw, (gh, gw))
    return {"map": cell.cpu(), "share": share.cpu(), "uniform_share": 1 / (gh * gw),
            "per_type": per_type.cpu(), "upsampled": _place(cell, geometry, hw).cpu(),
            "geometry": geometry, "pred": pred, "length": float(out.logits[0, pred]),
            "grid": (t, gh, gw), "grid_source": source, "weight": used}


def routing_map_figure(model, image: torch.Tensor, path: str | Path, *, weight: str = "length",
                       grid: tuple[int, int, int] | None = None, dpi: int = 100) -> FigurePath:
    """Write the routing map of one image to ``path`` (PNG, 10 x 4 inches).

    Panels: the input, with the patch the top cell sees outlined; the map over the input,
    each cell placed at the centre of its receptive field (the input's outline in cyan);
    the ``H' x W'`` primary grid itself. Both maps show each cell's share of the class's
    votes on a scale from 0; the colour bar marks the uniform share.

    Returns:
        The path, with ``notes`` (see :class:`~torchcaps.viz.FigurePath`) when the map is
        nearly flat, the grid was guessed or the cells could not be placed on the image.
    """
    r = routing_map(model, image, weight=weight, grid=grid)
    img = _one_image(model, image)[0]
    t, gh, gw = r["grid"]
    geo, pred = r["geometry"], r["pred"]
    share, uniform = 100 * r["share"], 100 * r["uniform_share"]  # percent
    vmax = max(float(share.max()), 2 * uniform)
    top = divmod(int(share.argmax()), gw)  # (h, w) of the top cell
    ratio = float(share.max()) / uniform
    what = "coupling x primary length" if r["weight"] == "length" else "coupling"
    notes = []
    if ratio < 1.5:
        notes.append(f"routing map is nearly flat: the top cell holds {share.max():.1f}% of "
                     f"the votes for class {pred}, {ratio:.2f}x the uniform {uniform:.1f}%")
    if r["grid_source"] == "square guess":
        notes.append(f"routing map: primary grid guessed as one {gh}x{gw} type")
    if geo["receptive_field"] is None:
        notes.append("routing map: receptive fields unknown, grid stretched over the image")

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    (cy, cx), (jy, jx) = geo["first_centre"], geo["stride"]
    show_image(axes[0], img)
    if geo["receptive_field"] is not None:
        rh, rw = geo["receptive_field"]
        y0, x0 = cy + jy * top[0] - rh / 2, cx + jx * top[1] - rw / 2  # pixel edges
        axes[0].add_patch(Rectangle((x0, y0), rw, rh, fill=False, color="tab:orange", lw=1.5))
        axes[0].set_title(f"input; orange: the {rh}x{rw} patch\nthe top cell "
                          f"(row {top[0]}, column {top[1]}) sees", fontsize=8)
    else:
        axes[0].set_title("input", fontsize=8)

    show_image(axes[1], img)
    h, w = img.shape[-2:]
    extent = (cx - jx / 2, cx + jx * (gw - 0.5), cy + jy * (gh - 0.5), cy - jy / 2)
    axes[1].imshow(share.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, extent=extent,
                   interpolation="bilinear")
    gray = img.detach().float().cpu().mean(0)  # (H, W): outline the input over the map
    if float(gray.max()) > float(gray.min()):
        mid = 0.5 * (float(gray.max()) + float(gray.min()))
        axes[1].contour(gray.numpy(), levels=[mid], colors="cyan", linewidths=0.8)
    axes[1].set_xlim(-0.5, w - 0.5)
    axes[1].set_ylim(h - 0.5, -0.5)
    placed = ("each cell at the centre of what it sees" if geo["receptive_field"] is not None
              else "grid stretched over the image (receptive fields unknown)")
    axes[1].set_title(f"over the input:\n{placed}", fontsize=8)

    im = axes[2].imshow(share.numpy(), cmap="inferno", vmin=0, vmax=vmax)
    guessed = ", guessed square" if r["grid_source"] == "square guess" else ""
    axes[2].set_title(f"primary-capsule grid {gh}x{gw}\n(sum of {t} types{guessed})", fontsize=8)
    axes[2].set_xlabel("primary-capsule column (input x, left to right)", fontsize=7)
    axes[2].set_ylabel("primary-capsule row\n(input y, top to bottom)", fontsize=7)
    axes[2].tick_params(labelsize=7)
    bar = fig.colorbar(im, ax=axes[2], fraction=0.05, pad=0.04)
    bar.ax.axhline(uniform, color="cyan", linewidth=2)
    bar.set_label(f"% of class {pred}'s votes per cell\n(cyan: uniform, {uniform:.1f}%)",
                  fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"Predicted class {pred} (score {r['length']:.2f}): where its votes came "
                 f"from ({what}); top cell {ratio:.2f}x the uniform share"
                 + ("\nnearly flat: no region stands out" if ratio < 1.5 else ""), fontsize=9)
    return save(fig, path, dpi, notes)


@torch.inference_mode()
def capsule_length_figure(model, images: torch.Tensor, path: str | Path,
                          labels: torch.Tensor | None = None, *, threshold: float = 0.5,
                          max_images: int = 16, dpi: int = 100) -> FigurePath:
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
    fig = Figure(figsize=(7, 1.8 * n + 0.6))
    axes = fig.subplots(n, 2, squeeze=False, gridspec_kw={"width_ratios": [1, 3]})
    for r in range(n):
        show_image(axes[r, 0], images[r])
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
    return save(fig, path, dpi)
