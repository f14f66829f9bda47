"""Convolutional capsule layers with votes as one batched matrix product.

A convolutional capsule layer (Sabour et al. 2017 Sec. 4 "convolutional capsule layer";
LaLonde & Bagci 2018 SegCaps; the conv capsules behind EM, cluster and inverted-attention
routing) lets the child capsule of type ``t`` at kernel offset ``k`` of output window ``l``
vote for every parent type ``c`` at ``l`` through a transform shared across positions:

    u_hat[b, l, (k, t), c] = W[k, t, c] @ u[b, t, pos(l, k)]        (D_out x D_in) @ (D_in,)

Unlike a plain convolution nothing is summed over ``(k, t)``: each child keeps its own vote,
and routing decides how votes combine. Chen, Li, Lou, Crandall 2021 ("How to accelerate
capsule convolutions in capsule networks", arXiv 2104.02621; only the abstract was reachable
here) observe that a capsule convolution is "multiplication of multiple small matrices plus
tensor-based combination" and restructure it for batched GEMM (4x on GPU). We do the same on
any device with PyTorch's own kernels:

1. *recombination*: one gather collects every window, giving ``A[(k, t), (b, l), :]`` of shape
   ``(K*K*T, B*L, D_in)`` (the "im2col" of capsules, ``K*K`` times the input, small);
2. *one batched GEMM* over ``(k, t)``: ``A @ W[(k, t)]`` with ``W`` of shape
   ``(K*K*T, D_in, C*D_out)`` gives all votes ``(K*K*T, B*L, C*D_out)`` at once.

The votes are returned as a view in the routing layout ``(B*L, K*K*T, C, D_out)`` without a
further copy. :func:`conv_capsule_votes_loop` is the straightforward loop over output
positions and kernel offsets that many ports use; it is the reference for tests and the
baseline of ``benchmarks/conv_caps.py``.

Letter legend: ``b`` batch, ``t`` child types, ``c`` parent types, ``k`` kernel offsets
(``K*K``), ``l`` output positions (``Ho*Wo``), ``n`` children of one window (``K*K*T``).

    ==============  =========================  ========================================
    input ``u``     (B, T, H, W, D_in)         child capsules on a grid (type-major)
    weight          (K*K, T, C, D_out, D_in)   one transform per (offset, child, parent type)
    votes           (B*L, K*K*T, C, D_out)     one routing problem per window
    poses           (B, C, Ho, Wo, D_out)      routed parent capsules
    couplings       (B, Ho*Wo, K*K*T, C)       per window, from the routing algorithm
    ==============  =========================  ========================================

The cost is dominated by writing the votes: ``K*K*T*C*D_out`` values per window for
``K*K*T*C*D_out*D_in`` multiply-adds, i.e. one written value per ``D_in`` multiply-adds,
against one per ``K*K*T*D_in`` for a plain convolution with the same multiply-adds. With a
small ``D_in`` the layer is bound by memory bandwidth, not arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_dtype_matches, check_tensor
from ..routing import Routing, RoutingOutput, create_routing
from .linear import _votes_per_pair

__all__ = ["ConvCaps2d", "conv_capsule_votes", "conv_capsule_votes_loop", "capsule_windows"]


def _check_geometry(kernel_size: int, stride: int, padding: int) -> None:
    for n, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{n} must be an integer >= {low}, got {v!r}")


def _output_size(h: int, w: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    ho = (h + 2 * padding - kernel_size) // stride + 1
    wo = (w + 2 * padding - kernel_size) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {h}x{w} capsule grid with padding {padding} is smaller than the "
                         f"{kernel_size}x{kernel_size} kernel")
    return ho, wo


def capsule_windows(u: torch.Tensor, kernel_size: int, stride: int = 1, padding: int = 0):
    """Every window of a capsule grid, offset- and type-major for the batched GEMM.

    Args:
        u: ``(B, T, H, W, D)`` capsules.

    Returns:
        ``(windows, (Ho, Wo))`` with windows ``(K*K, T, B, Ho*Wo, D)``, contiguous:
        ``windows[ky*K + kx, t, b, oy*Wo + ox] = u[b, t, oy*s + ky - p, ox*s + kx - p]``
        (zeros outside the grid).
    """
    _check_geometry(kernel_size, stride, padding)
    b, t, h, w, d = u.shape
    ho, wo = _output_size(h, w, kernel_size, stride, padding)
    if padding:
        u = F.pad(u, (0, 0, padding, padding, padding, padding))  # pads W then H
    hp, wp = h + 2 * padding, w + 2 * padding
    k = torch.arange(kernel_size, device=u.device)
    rows = (torch.arange(ho, device=u.device) * stride)[None, :] + k[:, None]  # (K, Ho)
    cols = (torch.arange(wo, device=u.device) * stride)[None, :] + k[:, None]  # (K, Wo)
    # flat child position of (ky, kx, oy, ox): (K, 1, Ho, 1) * Wp + (1, K, 1, Wo)
    index = (rows[:, None, :, None] * wp + cols[None, :, None, :]).reshape(-1)  # (K*K*Ho*Wo,)
    flat = u.permute(1, 0, 2, 3, 4).reshape(t, b, hp * wp, d)  # (T, B, Hp*Wp, D)
    win = flat.index_select(2, index).view(t, b, kernel_size * kernel_size, ho * wo, d)
    return win.permute(2, 0, 1, 3, 4).contiguous(), (ho, wo)  # (K*K, T, B, L, D)


def conv_capsule_votes(
    u: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Votes of a convolutional capsule layer by one gather and one batched GEMM.

    Args:
        u: child capsules ``(B, T, H, W, D_in)``.
        weight: ``(K*K, T, C, D_out, D_in)`` with ``K*K`` a square.
        stride, padding: of the window grid.

    Returns:
        ``(votes, (Ho, Wo))``; votes ``(B*Ho*Wo, K*K*T, C, D_out)`` (a view of the GEMM
        output; window ``b*Ho*Wo + l``, child ``k*T + t``).
    """
    kk, t, c, d_out, d_in = weight.shape
    kernel_size = round(kk ** 0.5)
    if kernel_size * kernel_size != kk:
        raise ValueError(f"weight's first dimension must be K*K, got {kk}")
    check_tensor(u, "conv capsule input", ("B", t, "H", "W", d_in))
    win, (ho, wo) = capsule_windows(u, kernel_size, stride, padding)  # (KK, T, B, L, D_in)
    b, n_l = u.shape[0], ho * wo
    a = win.view(kk * t, b * n_l, d_in)  # (KK*T, B*L, D_in)
    w = weight.permute(0, 1, 4, 2, 3).reshape(kk * t, d_in, c * d_out)  # (KK*T, D_in, C*D_out)
    v = torch.bmm(a, w)  # (KK*T, B*L, C*D_out): every vote in one batched GEMM
    return v.view(kk * t, b * n_l, c, d_out).transpose(0, 1), (ho, wo)


def conv_capsule_votes_loop(
    u: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reference: the same votes with Python loops over output positions and kernel offsets.

    Slow (``Ho * Wo * K * K`` small products); for tests and as the benchmark baseline.
    """
    kk, t, c, d_out, d_in = weight.shape
    k = round(kk ** 0.5)
    _check_geometry(k, stride, padding)
    b, _, h, w, _ = u.shape
    ho, wo = _output_size(h, w, k, stride, padding)
    if padding:
        u = F.pad(u, (0, 0, padding, padding, padding, padding))
    windows = []
    for oy in range(ho):
        for ox in range(wo):
            offsets = []
            for ky in range(k):
                for kx in range(k):
                    child = u[:, :, oy * stride + ky, ox * stride + kx]  # (B, T, D_in)
                    # (B, T, D_in) x (T, C, D_out, D_in) -> (B, T, C, D_out)
                    offsets.append(torch.einsum("bti,tcoi->btco", child, weight[ky * k + kx]))
            windows.append(torch.stack(offsets, 1))  # (B, KK, T, C, D_out)
    votes = torch.stack(windows, 1)  # (B, L, KK, T, C, D_out)
    return votes.view(b * ho * wo, kk * t, c, d_out), (ho, wo)


class ConvCaps2d(nn.Module):
    """Convolutional vector capsules with routing inside each window.

    Each output position routes its own window: the ``K*K*T`` children of the window vote for
    the ``C`` parent types there, and any registered routing algorithm combines them (the
    locally constrained routing of SegCaps). A child that lies in several windows is routed
    separately in each; for EM-style normalisation of a child across all the windows it
    reaches, see :class:`~torchcaps.layers.ConvMatCaps`.

    Args:
        in_types: child capsule types ``T``.
        in_dim: child capsule dimension ``D_in``.
        out_types: parent capsule types ``C``.
        out_dim: parent capsule dimension ``D_out``.
        kernel_size, stride, padding: of the window grid.
        routing: a registered routing name or a :class:`~torchcaps.routing.Routing`.
        routing_kwargs: options of the named routing (``num_parents`` and ``parent_dim``
            are filled in).
        init_std: standard deviation of the normal initialisation of ``W``; default
            ``1 / sqrt(D_in)`` keeps the vote scale equal to the input scale.

    Every registered routing fits: the windows are the batch of the routing call
    ``routing(votes)`` (no child activations, no context), and the layer makes
    ``routing.votes_per_pair`` votes per (child, parent type) pair (``K`` for cluster routing).

    Shape:
        ``(B, T, H, W, D_in)`` -> :class:`~torchcaps.routing.RoutingOutput` with poses
        ``(B, C, Ho, Wo, D_out)``, couplings ``(B, Ho*Wo, K*K*T, C)`` and activations
        ``(B, C, Ho, Wo)`` when the routing has them.
    """

    def __init__(
        self,
        in_types: int,
        in_dim: int,
        out_types: int,
        out_dim: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        routing: str | Routing = "dynamic",
        routing_kwargs: dict | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        for n, v in dict(in_types=in_types, in_dim=in_dim, out_types=out_types,
                         out_dim=out_dim).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        _check_geometry(kernel_size, stride, padding)
        self.in_types, self.in_dim, self.out_types, self.out_dim = in_types, in_dim, out_types, out_dim
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        std = in_dim ** -0.5 if init_std is None else init_std
        kk = kernel_size * kernel_size
        if isinstance(routing, str):
            routing = create_routing(routing, num_parents=out_types, parent_dim=out_dim,
                                     **(routing_kwargs or {}))
        elif routing_kwargs:
            raise ValueError("routing_kwargs is only used when routing is given by name")
        self.votes_per_pair = _votes_per_pair(routing, "ConvCaps2d")
        n_out = self.votes_per_pair * out_dim
        self.weight = nn.Parameter(torch.randn(kk, in_types, out_types, n_out, in_dim) * std)
        self.routing = routing

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return _output_size(h, w, self.kernel_size, self.stride, self.padding)

    def votes(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Votes ``(B*Ho*Wo, K*K*T, C, D_out)`` and ``(Ho, Wo)``; see :func:`conv_capsule_votes`."""
        check_tensor(u, "ConvCaps2d input", ("B", self.in_types, "H", "W", self.in_dim))
        check_dtype_matches(u, "ConvCaps2d input", self)
        return conv_capsule_votes(u, self.weight, self.stride, self.padding)

    def forward(self, u: torch.Tensor) -> RoutingOutput:
        votes, (ho, wo) = self.votes(u)
        # one routing problem per window: poses (B*L, C, D_out), couplings (B*L, KK*T, C)
        out = self.routing(votes, activations=None, context=None)
        b, c = u.shape[0], self.out_types
        poses = out.poses.view(b, ho, wo, c, self.out_dim).permute(0, 3, 1, 2, 4)
        act = out.activations
        return RoutingOutput(
            poses=poses,  # (B, C, Ho, Wo, D_out)
            couplings=out.couplings.reshape(b, ho * wo, -1, c),
            activations=None if act is None else act.view(b, ho, wo, c).permute(0, 3, 1, 2),
        )

    def extra_repr(self) -> str:
        return (f"in_types={self.in_types}, in_dim={self.in_dim}, out_types={self.out_types}, "
                f"out_dim={self.out_dim}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
