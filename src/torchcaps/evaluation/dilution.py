"""Dilution in capsule routing: how much of a class capsule's input comes from capsules that
carry little information.

Yang & Wang 2019 (arXiv 1903.10588, abstract only here) argue that non-informative primary
capsules, e.g. those looking at empty background, still send votes upward and so dilute the
votes of the informative ones. This module measures that for a trained model whose primary
capsules (:class:`~torchcaps.layers.PrimaryCaps` at ``model.primary``) are routed by one
:class:`~torchcaps.layers.CapsLinear` (``model.digit``), as in ``capsnet``.

Letter legend: ``B`` images, ``I = T H' W'`` primary (child) capsules, ``T`` primary types,
``H', W'`` primary grid, ``J`` class (parent) capsules, ``K`` primary dimension, ``D`` class
dimension. Primary capsules are ordered type-major, ``i = t H' W' + h W' + w``.

The paper's own measure is not known here (only its abstract could be read): the measures
below are this project's, defined so that a constructed case has a known answer.

Quantities, for each image ``b`` (all in the model's last routing iteration):

    u_i                        (B, I, K)     primary capsules as they enter the routed layer
    u_hat_j|i                  (B, I, J, D)  votes, ``CapsLinear.votes(u)``
    c_ij                       (B, I, J)     couplings returned by the routing
    m_ij = c_ij |u_hat_j|i|    (B, I, J)     coupling-weighted vote mass
    L_j = |v_j|                (B, J)        class-capsule lengths (the logits of capsnet)

A *non-informative set* ``S`` is a boolean mask ``(B, I)`` over primary capsules. Two are
built in:

* ``"background"``: capsules at grid positions whose receptive field holds (almost) no ink.
  A pixel is ink when ``|x| > ink`` in some channel (``ink=0``: not exactly zero, the MNIST
  background). The receptive field of a position is the bounding box of input pixels that
  can reach it, traced through the ``Conv2d`` / pooling layers the model calls before
  ``primary`` (they must form a chain: conv1 -> primary conv in capsnet, a 17x17 box with
  stride 2); see :func:`receptive_box`. A position is background when the fraction of ink
  pixels in its box is ``<= background_ink`` (default 0: an empty receptive field). All
  ``T`` capsules at a background position are in the set.
* ``"short"``: capsules with ``|u_i| < threshold``.

Measures, per image ``b`` and set ``S``:

* fraction ``f_b = |S_b| / I``: share of the capsules that are in the set.
* vote share ``share_bj = sum_{i in S_b} m_ij / sum_i m_ij`` ``(B, J)`` (0 when the
  denominator is 0): the part of class ``j``'s coupling-weighted input that comes from the
  set. Reported at the predicted class ``j* = argmax_j logits`` and averaged over classes.
  With ``share = f`` the set sends as much per capsule as the others; ``share << f`` means
  routing already mutes it.
* removal: ``L'_j`` are the class lengths when the capsules in ``S`` are set to zero before
  the routed layer (their votes are then zero, so they add nothing to any ``s_j``; the
  routing is rerun). Reported: ``delta_b = L'_bj* - L_bj*`` at the intact prediction, the
  relative change ``|delta_b| / L_bj*``, and whether the prediction changes
  (``argmax_j L'_bj != j*``).

Per-position maps (for the figure) sum ``m_ij* / sum_i m_ij*`` over the ``T`` types at each
grid position: ``position_share`` ``(B, H', W')`` (all capsules; sums to 1 over positions)
and ``position_share_short`` (short capsules only).

The shares use the couplings of the last routing iteration, which is what the class capsules
are built from; they say nothing about what the model would do with different couplings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

from .._validate import check_tensor
from ..layers import CapsLinear, PrimaryCaps

__all__ = [
    "DilutionResult",
    "analyze_dilution",
    "ink_fraction",
    "receptive_box",
    "check_dilution_model",
    "dilution_figure",
    "vote_mass",
    "vote_share",
]

SETS = ("background", "short")


def check_dilution_model(model: nn.Module, name: str | None = None) -> None:
    """Raise one ``ValueError`` naming the model unless it is primary capsules -> CapsLinear.

    Args:
        model: the model.
        name: the name to quote (e.g. the registered model name); the class name by default.
    """
    primary, digit = getattr(model, "primary", None), getattr(model, "digit", None)
    if not (isinstance(primary, PrimaryCaps) and isinstance(digit, CapsLinear)):
        label = name or type(model).__name__
        raise ValueError(
            f"dilution analysis does not support model {label!r}: it needs primary capsules "
            "(a PrimaryCaps at model.primary) routed by one CapsLinear (model.digit), "
            "as in capsnet")


def vote_mass(couplings: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """Coupling-weighted vote mass ``m_ij = c_ij |u_hat_j|i|``.

    Shape:
        couplings ``(B, I, J)``, votes ``(B, I, J, D)`` -> ``(B, I, J)``.
    """
    check_tensor(votes, "votes", ("B", "I", "J", "D"))
    check_tensor(couplings, "couplings", tuple(votes.shape[:3]))
    return couplings * torch.linalg.vector_norm(votes, dim=-1)


def vote_share(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each parent's vote mass that comes from the children in ``mask``.

    ``share_bj = sum_i mask_bi m_bij / sum_i m_bij`` (0 where the denominator is 0).

    Shape:
        mass ``(B, I, J)``, mask ``(B, I)`` bool -> ``(B, J)``.
    """
    check_tensor(mass, "mass", ("B", "I", "J"))
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (B, I)")
    if mask.shape != mass.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(mass.shape[:2])}, got {tuple(mask.shape)}")
    total = mass.sum(1)  # (B, J)
    part = (mass * mask.unsqueeze(-1).to(mass.dtype)).sum(1)  # (B, I, J) -> (B, J)
    return torch.where(total > 0, part / total.clamp_min(torch.finfo(mass.dtype).tiny),
                       torch.zeros_like(total))


# ----------------------------------------------------------------- receptive fields


def _spatial_layers(model: nn.Module, images: torch.Tensor) -> list[tuple[nn.Module, tuple, tuple]]:
    """The Conv2d/pool layers called before (and including) ``model.primary.conv``, in order,
    each with its input and output spatial size, from one forward pass on ``images[:1]``."""
    calls: list[tuple[nn.Module, tuple, tuple]] = []
    done = {"flag": False}
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)

    def hook(module, inputs, output):
        if not done["flag"] and inputs and isinstance(inputs[0], torch.Tensor):
            calls.append((module, tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])))
        if module is model.primary.conv:
            done["flag"] = True

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()  # no batch-norm statistics are updated by this probe
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not calls or calls[-1][0] is not model.primary.conv:
        raise ValueError("cannot trace the receptive fields: model.primary.conv was not called")
    for (_, _, out_hw), (m, in_hw, _) in zip(calls, calls[1:]):
        if out_hw != in_hw:
            raise ValueError(f"cannot trace the receptive fields: the layers before the primary "
                             f"capsules do not form a chain ({type(m).__name__} receives "
                             f"{in_hw}, the previous layer gives {out_hw})")
    if calls[0][1] != tuple(images.shape[-2:]):
        raise ValueError("cannot trace the receptive fields: the first spatial layer does not "
                         "receive the image")
    return calls


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def receptive_box(layers: list[tuple[nn.Module, tuple, tuple]]) -> tuple[tuple, tuple, tuple]:
    """Kernel, stride and padding ``((kh, kw), (sh, sw), (ph, pw))`` of the chain ``layers``
    seen as one window: position ``(h', w')`` sees input rows ``h' sh - ph .. h' sh - ph + kh - 1``
    (and likewise columns), the bounding box of its receptive field.

    Per axis, over layers ``l`` with kernel ``k_l``, stride ``s_l``, padding ``p_l``, dilation
    ``d_l`` and ``J_l = prod_{m<l} s_m``: ``k = 1 + sum_l d_l (k_l - 1) J_l``,
    ``s = prod_l s_l``, ``p = sum_l p_l J_l``.
    """
    k, s, p = [1, 1], [1, 1], [0, 0]
    for m, _, _ in layers:
        kl = _pair(m.kernel_size)
        sl = _pair(m.stride if m.stride is not None else m.kernel_size)
        pl = _pair(m.padding)
        dl = _pair(getattr(m, "dilation", 1))
        for a in range(2):
            k[a] += dl[a] * (kl[a] - 1) * s[a]
            p[a] += pl[a] * s[a]
            s[a] *= sl[a]
    return tuple(k), tuple(s), tuple(p)


def _ink_fraction(inked: torch.Tensor, box, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Fraction of ink pixels in each position's receptive box: ``(B, 1, H, W)`` 0/1 ->
    ``(B, H', W')``; padding counts as blank."""
    k, s, p = box
    count = nnf.conv2d(inked, inked.new_ones(1, 1, *k), stride=s, padding=p)  # (B, 1, H', W')
    if tuple(count.shape[-2:]) != tuple(grid_hw):
        raise ValueError(f"cannot trace the receptive fields: the layers before the primary "
                         f"capsules give a {tuple(count.shape[-2:])} grid, not {tuple(grid_hw)}")
    return count[:, 0] / (k[0] * k[1])


def ink_fraction(model: nn.Module, images: torch.Tensor, ink: float = 0.0) -> torch.Tensor:
    """Fraction of ink pixels (``|x| > ink`` in any channel) in the receptive field of each
    primary grid position (see :func:`receptive_box`).

    Shape:
        images ``(B, C, H, W)`` -> ``(B, H', W')``; 0 means an empty receptive field.
    """
    check_dilution_model(model)
    check_tensor(images, "images", ("B", "C", "H", "W"))
    images = images.to(next(model.parameters()).dtype)
    layers = _spatial_layers(model, images)
    inked = (images.abs() > ink).any(1, keepdim=True).to(images.dtype)  # (B, 1, H, W)
    return _ink_fraction(inked, receptive_box(layers), layers[-1][2])


# ------------------------------------------------------------------------ analysis


@dataclass
class DilutionResult:
    """Per-image measures (see the module docstring); ``summary()`` averages them.

    Attributes:
        threshold: length below which a primary capsule is "short".
        ink: pixel magnitude above which a pixel is ink.
        background_ink: largest ink fraction of a background position's receptive field.
        grid: ``(T, H', W')`` of the primary capsules.
        logits: ``(B, J)`` model logits; ``predicted`` ``(B,)`` their argmax.
        labels: ``(B,)`` true labels, or None.
        lengths: ``(B, J)`` class-capsule lengths ``L``.
        background: ``(B, H', W')`` bool, background positions.
        ink_fraction: ``(B, H', W')`` ink fraction of each position's receptive field.
        primary_lengths: ``(B, I)`` lengths ``|u_i|``.
        fraction, share, removed_lengths: per set name (``"background"``, ``"short"``):
            ``(B,)``, ``(B, J)`` and ``(B, J)`` (``L'``).
        position_share, position_share_short: ``(B, H', W')`` maps at the predicted class.
        box: the receptive box ``(kernel, stride, padding)`` (see :func:`receptive_box`).
    """

    threshold: float
    ink: float
    background_ink: float
    grid: tuple[int, int, int]
    logits: torch.Tensor
    predicted: torch.Tensor
    labels: torch.Tensor | None
    lengths: torch.Tensor
    background: torch.Tensor
    ink_fraction: torch.Tensor
    primary_lengths: torch.Tensor
    fraction: dict[str, torch.Tensor] = field(default_factory=dict)
    share: dict[str, torch.Tensor] = field(default_factory=dict)
    removed_lengths: dict[str, torch.Tensor] = field(default_factory=dict)
    position_share: torch.Tensor | None = None
    position_share_short: torch.Tensor | None = None
    box: tuple | None = None

    def capsule_mask(self, name: str) -> torch.Tensor:
        """The set ``name`` as a ``(B, I)`` bool mask over primary capsules."""
        if name == "short":
            return self.primary_lengths < self.threshold
        if name == "background":
            t = self.grid[0]
            b = self.background.shape[0]
            return self.background.reshape(b, 1, -1).expand(b, t, -1).reshape(b, -1)
        raise ValueError(f"unknown set {name!r}; choose from {SETS}")

    def at_predicted(self, x: torch.Tensor) -> torch.Tensor:
        """``x[b, predicted[b]]`` for ``x`` ``(B, J)``."""
        return x.gather(1, self.predicted[:, None])[:, 0]

    def length_change(self, name: str) -> torch.Tensor:
        """``L'_bj* - L_bj*`` ``(B,)`` when set ``name`` is removed."""
        return self.at_predicted(self.removed_lengths[name] - self.lengths)

    def summary(self) -> dict:
        """Means over images, as plain floats (JSON-ready)."""
        n = int(self.predicted.shape[0])
        out: dict = {"images": n, "threshold": self.threshold, "ink": self.ink,
                     "background_ink": self.background_ink,
                     "grid": list(self.grid),
                     "mean_primary_length": float(self.primary_lengths.mean())}
        if self.labels is not None:
            out["accuracy"] = float((self.predicted == self.labels).double().mean())
        fg = ~self.capsule_mask("background")
        for name, mask in (("background", ~fg), ("foreground", fg)):
            k = mask.sum()
            out[f"mean_primary_length_{name}"] = (
                float((self.primary_lengths * mask).sum() / k) if int(k) else None)
        base = self.at_predicted(self.lengths)
        for name in SETS:
            delta = self.length_change(name)
            flips = self.removed_lengths[name].argmax(1) != self.predicted
            out[name] = {
                "fraction": float(self.fraction[name].mean()),
                "share_predicted": float(self.at_predicted(self.share[name]).mean()),
                "share_all_classes": float(self.share[name].mean()),
                "length_change_predicted": float(delta.mean()),
                "relative_length_change_predicted": float(
                    (delta.abs() / base.clamp_min(1e-12)).mean()),
                "prediction_changed": float(flips.double().mean()),
            }
        return out


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def analyze_dilution(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    threshold: float = 0.1,
    ink: float = 0.0,
    background_ink: float = 0.0,
    batch_size: int = 128,
    name: str | None = None,
) -> DilutionResult:
    """Measure dilution on ``images`` (see the module docstring for the definitions).

    Args:
        model: a model with ``primary`` (PrimaryCaps) feeding ``digit`` (CapsLinear), e.g.
            ``capsnet``; put in eval mode for the analysis and restored afterwards.
        images: float images ``(N, C, H, W)`` (background 0).
        labels: optional true labels ``(N,)`` (only for the accuracy in the summary).
        threshold: primary capsules shorter than this are "short" (``>= 0``).
        ink: pixels with ``|x| > ink`` are ink (``>= 0``).
        background_ink: positions whose receptive field is at most this fraction ink are
            background (in ``[0, 1)``; 0: empty receptive field).
        batch_size: images per forward pass.
        name: the model name to quote in errors.

    Returns:
        a :class:`DilutionResult`.
    """
    check_dilution_model(model, name)
    check_tensor(images, "images", ("N", "C", "H", "W"))
    if images.shape[0] < 1:
        raise ValueError("images is empty")
    for what, v in (("threshold", threshold), ("ink", ink), ("background_ink", background_ink)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
    if background_ink >= 1:
        raise ValueError(f"background_ink must be below 1, got {background_ink!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if labels is not None and labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    param = next(model.parameters())
    images = images.to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        layers = _spatial_layers(model, images)
        box = receptive_box(layers)
        parts = [_analyze_batch(model, images[s], box, float(threshold), float(ink),
                                float(background_ink))
                 for s in _batches(images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "grid"}
    return DilutionResult(
        threshold=float(threshold), ink=float(ink), background_ink=float(background_ink),
        grid=parts[0]["grid"],
        logits=cat["logits"], predicted=cat["logits"].argmax(1),
        labels=None if labels is None else labels.detach().cpu(),
        lengths=cat["lengths"], background=cat["background"], ink_fraction=cat["ink_fraction"],
        primary_lengths=cat["primary_lengths"],
        fraction={s: cat[f"fraction_{s}"] for s in SETS},
        share={s: cat[f"share_{s}"] for s in SETS},
        removed_lengths={s: cat[f"removed_{s}"] for s in SETS},
        position_share=cat["position_share"], position_share_short=cat["position_share_short"],
        box=box,
    )


def _analyze_batch(model, x: torch.Tensor, box, threshold: float, ink: float,
                   background_ink: float) -> dict:
    """All per-image measures of one batch, moved to the CPU."""
    seen: dict = {}

    def grab_input(_module, inputs):
        seen["u"] = inputs[0]  # (B, I, K): primary capsules as routed

    def grab_output(_module, _inputs, output):
        seen["routed"] = output  # RoutingOutput: poses (B, J, D), couplings (B, I, J)

    def grab_primary(_module, inputs, output):
        seen["primary"] = output
        seen["primary_hw"] = tuple(inputs[0].shape[-2:])

    handles = [model.digit.register_forward_pre_hook(grab_input),
               model.digit.register_forward_hook(grab_output),
               model.primary.register_forward_hook(grab_primary)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    u = seen.get("u")
    if u is None or seen.get("primary") is None or u.shape != seen["primary"].shape:
        raise ValueError(f"dilution analysis of {type(model).__name__}: the routed layer does "
                         "not receive the primary capsules")
    b = u.shape[0]
    t = model.primary.num_types
    gh, gw = model.primary.output_size(*seen["primary_hw"])
    routed = seen["routed"]
    votes = model.digit.votes(u)  # (B, I, J, D)
    mass = vote_mass(routed.couplings, votes)  # (B, I, J)
    lengths = torch.linalg.vector_norm(routed.poses, dim=-1)  # (B, J)
    logits = out.logits  # (B, J)
    pred = logits.argmax(1)  # (B,)

    inked = (x.abs() > ink).any(1, keepdim=True).to(x.dtype)  # (B, 1, H, W)
    inkf = _ink_fraction(inked, box, (gh, gw))  # (B, H', W')
    background = inkf <= background_ink
    plen = torch.linalg.vector_norm(u, dim=-1)  # (B, I)
    masks = {"background": background.reshape(b, 1, -1).expand(b, t, -1).reshape(b, -1),
             "short": plen < threshold}
    res = {"grid": (t, gh, gw), "logits": logits, "lengths": lengths, "background": background,
           "ink_fraction": inkf, "primary_lengths": plen}
    for name, mask in masks.items():
        res[f"fraction_{name}"] = mask.to(x.dtype).mean(1)
        res[f"share_{name}"] = vote_share(mass, mask)
        removed = model.digit(u * (~mask).unsqueeze(-1).to(u.dtype))  # zeroed before routing
        res[f"removed_{name}"] = torch.linalg.vector_norm(removed.poses, dim=-1)
    # per-position share of the predicted class's mass: (B, I) -> (B, T, H', W') -> sum over T
    m_pred = mass.gather(2, pred.view(b, 1, 1).expand(b, mass.shape[1], 1))[..., 0]  # (B, I)
    total = m_pred.sum(1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    res["position_share"] = (m_pred / total).view(b, t, gh, gw).sum(1)
    res["position_share_short"] = (m_pred * masks["short"] / total).view(b, t, gh, gw).sum(1)
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}


# ------------------------------------------------------------------------- figure


def dilution_figure(result: DilutionResult, images: torch.Tensor, path: str | Path,
                    index: int = 0, dpi: int = 100) -> Path:
    """Write a PNG summary of ``result`` to ``path`` and return the path.

    Panels, left to right: input ``images[index]`` with its background positions marked;
    share of the predicted class's vote mass per primary position (background positions
    crossed); the part of it from short capsules; histogram of the predicted class's length
    change ``L' - L`` over all images when background or short capsules are removed;
    histogram of primary capsule lengths at background and foreground positions with the
    threshold.

    Drawn with ``matplotlib.figure.Figure`` and the Agg canvas (no pyplot, no global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = result.predicted.shape[0]
    if not (isinstance(index, int) and 0 <= index < n):
        raise ValueError(f"index must be in [0, {n - 1}], got {index!r}")
    if images.shape[0] != n:
        raise ValueError(f"images holds {images.shape[0]} images, the result {n}")
    t, gh, gw = result.grid
    img = images[index].detach().float().cpu().mean(0)  # (H, W)
    h, w = img.shape
    bg = result.background[index]  # (H', W')
    pred = int(result.predicted[index])

    fig = Figure(figsize=(18, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5)
    # primary position (h', w') drawn at the centre of its receptive box (or of its cell when
    # the grid is laid over the image, if the box is unknown)
    if result.box is not None:
        (kh, kw), (sh, sw), (ph, pw) = result.box
        cy = torch.arange(gh) * sh - ph + (kh - 1) / 2
        cx = torch.arange(gw) * sw - pw + (kw - 1) / 2
    else:
        cy = (torch.arange(gh) + 0.5) * h / gh - 0.5
        cx = (torch.arange(gw) + 0.5) * w / gw - 0.5
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    ax = axes[0]
    ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=max(1.0, float(img.max())))
    ax.scatter(xx[bg].numpy(), yy[bg].numpy(), marker="x", s=14, c="tab:red", linewidths=0.8)
    what = ("an empty receptive field" if result.background_ink == 0
            else f"<= {result.background_ink:.0%} ink in the receptive field")
    ax.set_title(f"input (x: centres of the {int(bg.sum())}/{gh * gw} positions\nwith {what})",
                 fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])

    share = result.position_share[index]
    vmax = float(share.max()) or 1.0
    for ax, m, title in ((axes[1], share, f"share of class {pred}'s vote mass\nper position "
                          f"(sum of {t} types)"),
                         (axes[2], result.position_share_short[index],
                          f"... from short capsules (|u| < {result.threshold:g})\n"
                          f"total {float(result.position_share_short[index].sum()):.1%}")):
        im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        gy, gx = torch.nonzero(bg, as_tuple=True)
        ax.scatter(gx.numpy(), gy.numpy(), marker="x", s=20, c="tab:red", linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("primary-capsule column (input x)", fontsize=8)
        ax.set_ylabel("primary-capsule row (input y)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    ax = axes[3]
    for name, colour in (("background", "tab:red"), ("short", "tab:blue")):
        d = result.length_change(name)
        ax.hist(d.numpy(), bins=30, alpha=0.6, color=colour,
                label=f"remove {name} (mean {float(d.mean()):+.3f})")
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(f"change of the predicted class length\nover {n} images", fontsize=8)
    ax.set_xlabel("class length after removal minus before", fontsize=8)
    ax.legend(fontsize=7)

    ax = axes[4]
    bg_caps = result.capsule_mask("background")
    lengths = result.primary_lengths
    for mask, label, colour in ((bg_caps, "background", "tab:red"),
                                (~bg_caps, "foreground", "tab:green")):
        if bool(mask.any()):
            ax.hist(lengths[mask].numpy(), bins=40, range=(0, max(1.0, float(lengths.max()))),
                    alpha=0.6, color=colour, density=True, label=label)
    ax.axvline(result.threshold, color="black", linestyle="--", linewidth=0.8, label="threshold")
    ax.set_title("primary capsule lengths |u|", fontsize=8)
    ax.legend(fontsize=7)
    for a in axes:
        a.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
