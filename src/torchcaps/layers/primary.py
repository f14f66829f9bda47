"""Primary capsules: a convolution whose channels are regrouped into capsules.

Optionally the primary capsules are *restrained* before they vote: short (weak) capsules are
shrunk or removed so that they dilute the class capsules' input less.

Restraints are this project's interpretation of Yang & Wang 2019, "Reducing the dilution: an
analysis of the information sensitiveness of capsule network with a practical solution"
(arXiv 1903.10588). Only the abstract could be read here; it argues that primary capsules
are on the whole too long, so that non-informative (e.g. background) capsules dilute what
the informative ones send upward, and proposes "sparsifying and restraining the activation
value of capsules in primary capsule layer to suppress non-informative capsules and
highlight discriminative capsules". The paper's own function is not known: none of the
three restraints below is claimed to be it.

Letter legend: ``B`` batch, ``T`` capsule types, ``N = H' * W'`` positions of the capsule
grid, ``I = T * N`` primary capsules, ``D`` capsule dimension. A restraint maps capsules
``u`` ``(B, T, N, D)`` to capsules of the same shape; ``|u|`` is the capsule length,
computed as ``sqrt(|u|^2 + eps)`` (``eps = 1e-8``) so that gradients stay finite at zero.

* ``"power"`` (:class:`PowerRestraint`, ``p``, default 2): ``u' = u |u|^(p - 1)``, so
  ``|u'| = |u|^p``. For squashed capsules (lengths in ``[0, 1)``) and ``p > 1`` every
  capsule shrinks, the short ones relatively most (``|u'| / |u| = |u|^(p-1)``); the order
  of lengths is kept. ``0 < p < 1`` does the opposite. No parameters.
* ``"topk"`` (:class:`TopKRestraint`, ``k``, ``group`` = ``"position"`` or ``"image"``):
  keep the ``k`` longest capsules of each group unchanged and set the others to zero.
  ``"position"``: a group is the ``T`` capsules (one per type) at one grid position;
  ``"image"``: a group is all ``I`` capsules of one image. The mask is not differentiated
  (zeroed capsules get no gradient). Ties are broken by :func:`torch.topk`. No parameters.
* ``"gate"`` (:class:`GateRestraint`, ``threshold``, ``temperature``): a learned soft
  threshold on length, per type ``t``:
  ``g = sigmoid((|u| - theta_t) / tau_t)``, ``u' = g u``, with ``theta_t`` (init
  ``threshold``, default 0.25) and ``tau_t = exp(log_tau_t)`` (init ``temperature``,
  default 0.1) learned. Capsules shorter than ``theta_t`` are suppressed, longer ones pass
  almost unchanged; the gate never amplifies (``g < 1``) and keeps the order of lengths
  within a type (``g |u|`` increases with ``|u|``). ``2 T`` parameters.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .._validate import check_dtype_matches, check_tensor
from .conv2d import Conv2d
from .squash import SQUASHES

__all__ = [
    "PrimaryCaps",
    "channels_to_capsules",
    "CapsuleRestraint",
    "PowerRestraint",
    "TopKRestraint",
    "GateRestraint",
    "RESTRAINTS",
    "create_restraint",
]

_EPS = 1e-8  # floor under the square root of a capsule length


def channels_to_capsules(x: torch.Tensor, num_types: int, dim: int) -> torch.Tensor:
    """Regroup conv channels into capsules: ``(B, T*D, H, W)`` -> ``(B, T*H*W, D)``.

    Channel ``t*D + d`` at position ``(h, w)`` is element ``d`` of the capsule of type
    ``t`` at ``(h, w)``: the ``D`` values of a capsule are ``D`` channels at one
    position. A plain ``x.view(B, -1, D)`` would instead group ``D`` neighbouring
    *pixels* of one channel into a "capsule", a known bug of several ports.
    Capsules are ordered type-major: index ``t*H*W + h*W + w``.
    """
    b, c, h, w = x.shape
    if c != num_types * dim:
        raise ValueError(f"expected {num_types}*{dim}={num_types * dim} channels, got {c}")
    # (B, T, D, H, W) -> (B, T, H, W, D) -> (B, T*H*W, D)
    return x.view(b, num_types, dim, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, dim)


def _length(u: torch.Tensor) -> torch.Tensor:
    """``sqrt(|u|^2 + eps)`` over the last axis: ``(*, D)`` -> ``(*, 1)``."""
    return torch.sqrt((u * u).sum(-1, keepdim=True) + _EPS)


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class CapsuleRestraint(nn.Module):
    """Base class of the primary-capsule restraints (see the module docstring).

    Args:
        num_types: capsule types ``T``.
        dim: capsule dimension ``D``.

    Shape:
        ``(B, T, N, D)`` -> ``(B, T, N, D)``.
    """

    def __init__(self, num_types: int, dim: int) -> None:
        super().__init__()
        self.num_types, self.dim = num_types, dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PowerRestraint(CapsuleRestraint):
    """``u' = u |u|^(p - 1)``: lengths become ``|u|^p`` (this project's interpretation).

    Args:
        p: the exponent, ``> 0``; ``p > 1`` suppresses short capsules (default 2).
    """

    def __init__(self, num_types: int, dim: int, p: float = 2.0) -> None:
        super().__init__(num_types, dim)
        p = _finite_number("power restraint p", p)
        if p <= 0:
            raise ValueError(f"power restraint p must be > 0, got {p}")
        self.p = p

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * _length(u).pow(self.p - 1.0)  # (B, T, N, D) * (B, T, N, 1)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TopKRestraint(CapsuleRestraint):
    """Keep the ``k`` longest capsules per group, zero the rest (this project's interpretation).

    Args:
        k: capsules kept per group, ``1 <= k <=`` the group size.
        group: ``"position"`` (the ``T`` types at one grid position; ``k <= T``) or
            ``"image"`` (all ``T * N`` capsules of an image; checked on the first input).
    """

    GROUPS = ("position", "image")

    def __init__(self, num_types: int, dim: int, k: int | None = None,
                 group: str = "position") -> None:
        super().__init__(num_types, dim)
        if group not in self.GROUPS:
            raise ValueError(f"topk restraint group must be one of {self.GROUPS}, got {group!r}")
        if k is None:
            raise ValueError("topk restraint needs k, the number of capsules kept per group")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"topk restraint k must be a positive integer, got {k!r}")
        if group == "position" and k > num_types:
            raise ValueError(f"topk restraint k={k} is larger than the {num_types} capsule "
                             "types at each position (group='position')")
        self.k, self.group = k, group

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, t, n, d = u.shape
        lengths = (u * u).sum(-1)  # (B, T, N); squared lengths rank the same
        if self.group == "position":
            idx = lengths.topk(self.k, dim=1).indices  # (B, k, N)
            mask = torch.zeros_like(lengths).scatter_(1, idx, 1.0)  # (B, T, N)
        else:
            if self.k > t * n:
                raise ValueError(f"topk restraint k={self.k} is larger than the {t * n} "
                                 "primary capsules of an image (group='image')")
            flat = lengths.reshape(b, t * n)
            idx = flat.topk(self.k, dim=1).indices  # (B, k)
            mask = torch.zeros_like(flat).scatter_(1, idx, 1.0).view(b, t, n)
        return u * mask.unsqueeze(-1)  # (B, T, N, D) * (B, T, N, 1)

    def extra_repr(self) -> str:
        return f"k={self.k}, group={self.group!r}"


class GateRestraint(CapsuleRestraint):
    """Learned soft length threshold per type (this project's interpretation).

    ``u' = sigmoid((|u| - theta_t) / tau_t) u`` with ``theta_t``, ``tau_t = exp(log_tau_t)``
    learned per type ``t``.

    Args:
        threshold: initial ``theta_t`` (0.25). Too high a start can gate out almost every
            capsule of a freshly initialised network (whose lengths depend on the input
            scale), which then has to grow its capsules back before it learns.
        temperature: initial ``tau_t`` (0.1), ``> 0``; smaller is a harder threshold.
    """

    def __init__(self, num_types: int, dim: int, threshold: float = 0.25,
                 temperature: float = 0.1) -> None:
        super().__init__(num_types, dim)
        threshold = _finite_number("gate restraint threshold", threshold)
        temperature = _finite_number("gate restraint temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"gate restraint temperature must be > 0, got {temperature}")
        self.threshold = nn.Parameter(torch.full((num_types,), threshold))  # theta_t
        self.log_temperature = nn.Parameter(torch.full((num_types,), math.log(temperature)))

    def gate(self, u: torch.Tensor) -> torch.Tensor:
        """Gate values ``(B, T, N, 1)`` in (0, 1) for capsules ``(B, T, N, D)``."""
        theta = self.threshold.view(1, -1, 1, 1)  # (1, T, 1, 1)
        tau = self.log_temperature.exp().view(1, -1, 1, 1)
        return torch.sigmoid((_length(u) - theta) / tau)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.gate(u)

    def extra_repr(self) -> str:
        return f"num_types={self.num_types}"


#: Restraints by name, as used by ``PrimaryCaps(restraint=...)``.
RESTRAINTS: dict[str, type[CapsuleRestraint]] = {
    "power": PowerRestraint, "topk": TopKRestraint, "gate": GateRestraint,
}


def create_restraint(name: str, num_types: int, dim: int, **kwargs) -> CapsuleRestraint:
    """Build restraint ``name`` for ``num_types`` types of ``dim``-D capsules.

    Raises:
        ValueError: unknown name, an option the restraint does not take, or a bad value.
    """
    if name not in RESTRAINTS:
        raise ValueError(f"unknown primary-capsule restraint {name!r}; "
                         f"choose from {sorted(RESTRAINTS)} or None")
    cls = RESTRAINTS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "num_types", "dim")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"restraint {name!r} takes {accepted}, not {unknown}")
    return cls(num_types, dim, **kwargs)


class PrimaryCaps(nn.Module):
    """Convolution -> capsules -> squash (Sabour et al. 2017, Sec. 4) -> optional restraint.

    Args:
        in_channels: channels of the input feature map.
        num_types: capsule types (32 in CapsNet).
        dim: capsule dimension (8 in CapsNet).
        kernel_size, stride, padding: of the convolution (9, 2, 0 in CapsNet).
        squash: squash variant name, or ``None`` for no nonlinearity.
        restraint: ``None`` (default: the layer of Sabour et al., unchanged), or ``"power"``,
            ``"topk"``, ``"gate"``: a restraint applied after the squash (see the module
            docstring; this project's interpretation of Yang & Wang 2019, not their function).
        restraint_kwargs: options of the restraint (``p``; ``k``, ``group``;
            ``threshold``, ``temperature``).

    Shape:
        input ``(B, C_in, H, W)`` -> output ``(B, num_types * H' * W', dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_types: int = 32,
        dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        padding: int = 0,
        squash: str | None = "sabour",
        restraint: str | None = None,
        restraint_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if squash is not None and squash not in SQUASHES:
            raise ValueError(f"unknown squash variant {squash!r}; choose from {sorted(SQUASHES)}")
        if restraint is None and restraint_kwargs:
            raise ValueError(f"restraint_kwargs {restraint_kwargs} given without a restraint")
        self.in_channels, self.num_types, self.dim = in_channels, num_types, dim
        self.squash = squash
        self.conv = Conv2d(in_channels, num_types * dim, kernel_size, stride, padding)
        self.restraint = (None if restraint is None
                          else create_restraint(restraint, num_types, dim, **(restraint_kwargs or {})))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial size ``(H', W')`` of the capsule grid for an ``h x w`` input."""
        k, s, p = self.conv.kernel_size, self.conv.stride, self.conv.padding
        return ((h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1)

    def num_capsules(self, h: int, w: int) -> int:
        oh, ow = self.output_size(h, w)
        return self.num_types * oh * ow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "PrimaryCaps input", ("B", self.in_channels, "H", "W"))
        check_dtype_matches(x, "PrimaryCaps input", self)
        u = channels_to_capsules(self.conv(x), self.num_types, self.dim)  # (B, I, D)
        u = SQUASHES[self.squash](u) if self.squash else u
        if self.restraint is None:
            return u
        b, i, d = u.shape
        # type-major order t*N + n: (B, I, D) -> (B, T, N, D) -> restrained -> (B, I, D)
        return self.restraint(u.reshape(b, self.num_types, i // self.num_types, d)).reshape(b, i, d)
