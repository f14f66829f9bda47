"""Locally-constrained capsule layers of SegCaps, in 2D and 3D, convolutional and transposed.

LaLonde & Bagci 2018, "Capsules for Object Segmentation" (arXiv 1804.04241), Sec. 3. A child
capsule type ``t`` does not vote with each capsule of its window separately (as
:class:`~torchcaps.layers.ConvCaps2d` does) but convolves its whole ``k x k (x k)`` window of
poses with one kernel per parent type, giving ONE vote per (child type, parent type) pair at
every output position ``o``:

    u_hat[b, o, t, c] = sum_{kappa} W_t[c, kappa] @ u[b, t, o * s + kappa - p]       (conv)
    u_hat[b, o, t, c] = sum_{x, kappa: x * s + kappa - p = o} W_t[c, kappa] @ u[b, t, x]  (deconv)

with ``W_t[c, kappa]`` a ``D_out x D_in`` matrix (``W_t = W`` for every ``t`` when the kernel
is shared, the paper's design). Routing is then local: each output position is its own
routing problem whose children are the ``T`` child types and whose parents are the ``C``
parent types, with the dynamic routing of Sabour et al. 2017 (paper Eq. 1-3, Procedure 1):

    c_tc = softmax_c(b_tc)              (over PARENT types c, for each child type t)
    s_c  = sum_t c_tc u_hat_c|t + beta_c (beta: a learned per-parent bias, shared by positions)
    v_c  = squash(s_c)
    b_tc = b_tc + u_hat_c|t . v_c

The routing runs through the registered interface: ``create_routing("dynamic", ...)`` with
``bias=True, bias_init=0.1`` and ONE call ``routing(votes)`` per layer, the positions folded
into the routing batch.

Checked in the authors' Keras code (``capsule_layers.py``, ``capsnet.py``):

* weights: ``ConvCapsuleLayer`` holds one kernel ``W (k, k, D_in, C*D_out)`` and convolves
  every child type with it (types folded into the batch), so ``share_weight=True`` is the
  official layer and its parameter count does not depend on ``T``. The transposed layer
  (``DeconvCapsuleLayer``, ``upsamp_type='deconv'``) holds ``W (k, k, C*D_out, D_in)``, also
  shared. ``share_weight=False`` (one kernel per child type, a grouped convolution) is the
  option of 3D-UCaps (Nguyen et al. 2021, ``ConvSlimCapsule3D``).
* no convolution bias; one routing bias ``b (1, 1, C, D_out)`` initialised to 0.1 and tiled
  over positions (here the routing's ``(C, D_out)`` bias).
* routing: logits of shape ``(B, T, H, W, C)``, ``softmax(logits, dim=-1)``, i.e. over
  parent types; agreement by dot product (3D-UCaps uses cosine similarity instead);
  iterations per layer: 1 for the primary capsules, 3 for every other layer of SegCaps R3.
* padding ``'same'`` everywhere, with TensorFlow's rule: for a convolution of stride ``s`` the
  output has ``ceil(n / s)`` positions and the ``max((ceil(n/s) - 1) s + k - n, 0)`` padding
  zeros go ``floor(half)`` before and the rest after (kernel 5, stride 2, even ``n``: 1 before,
  2 after, not the symmetric 2 and 2). ``padding=None`` reproduces it (``k // 2`` on both
  sides for stride 1 and odd ``k``). For the transposed layer (kernel 4, stride 2) ``'same'``
  gives exactly ``n * s`` positions, i.e. PyTorch's ``padding=1, output_padding=0``; in
  general the ``max(k - s, 0)`` cropped positions go ``floor(half)`` before.
* initialisation: Keras ``he_normal``, a normal truncated at two standard deviations with
  ``std = sqrt(2 / fan_in)``; Keras computes ``fan_in`` from the kernel shape, which for the
  transposed kernel ``(k, k, C*D_out, D_in)`` is ``k*k*C*D_out``. ``init_std=None`` reproduces
  both.

Deviation: the squash divides by ``sqrt(|s|^2 + eps)`` (``eps = 1e-8``, finite at zero); the
official squash divides by ``|s|``.

Letter legend: ``b`` batch, ``t`` child types, ``c`` parent types, ``i`` child pose
(``D_in``), ``d`` parent pose (``D_out``), ``o`` output positions (``L`` of them), ``S`` the
spatial sizes (``(H, W)`` or ``(D, H, W)``), ``K`` the kernel size, ``G`` 1 when the kernel is
shared, else ``T``.

    ===============  ==========================  ======================================
    input ``u``      (B, T, *S, D_in)            child capsules on a grid (type-major)
    weight (conv)    (G*C*D_out, D_in, *K)       ``F.conv2d/3d`` layout, ``groups=G``
    weight (deconv)  (G*D_in, C*D_out, *K)       ``F.conv_transpose2d/3d`` layout
    votes            (B*L, T, C, D_out)          one routing problem per output position
    poses            (B, C, *S_out, D_out)       routed parent capsules
    couplings        (B, L, T, C)                sum to 1 over C (parent types)
    ===============  ==========================  ======================================

:func:`local_capsule_votes_loop` computes the same votes with Python loops over positions
and kernel offsets, straight from the two equations above; it is the tests' reference.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_dtype_matches, check_tensor
from ..routing import RoutingOutput, create_routing

__all__ = ["LocalConvCaps", "LocalDeconvCaps", "local_capsule_votes", "local_capsule_votes_loop"]

_AXES = {2: ("H", "W"), 3: ("D", "H", "W")}
_CONV = {2: F.conv2d, 3: F.conv3d}
_DECONV = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_geometry(kernel_size: int, stride: int, padding: int | None, output_padding: int,
                    transposed: bool) -> None:
    _check_int("kernel_size", kernel_size, 1)
    _check_int("stride", stride, 1)
    if padding is not None:
        _check_int("padding", padding, 0)
    _check_int("output_padding", output_padding, 0)
    if output_padding and not transposed:
        raise ValueError("output_padding only applies to the transposed layer (LocalDeconvCaps)")
    if output_padding and padding is None:
        raise ValueError("output_padding needs an explicit padding; padding=None already gives "
                         "'same' sizes (n * stride)")
    if output_padding >= stride:
        raise ValueError(f"output_padding must be smaller than the stride ({stride}), "
                         f"got {output_padding}")


def axis_geometry(size: int, kernel_size: int, stride: int, padding: int | None,
                  transposed: bool = False, output_padding: int = 0) -> tuple[int, int, int]:
    """``(before, after, out)`` along one spatial axis of ``size`` positions.

    Convolution: ``before``/``after`` zeros are padded on each side and ``out`` is
    ``(size + before + after - K) // stride + 1``. Transposed convolution: of the full output
    ``(size - 1) * stride + K``, ``before`` positions are cropped at the start and ``after`` at
    the end (a negative ``after`` appends zeros), leaving ``out``. ``padding=None`` is
    TensorFlow's ``'same'`` (see the module docstring).
    """
    if transposed:
        full = (size - 1) * stride + kernel_size
        if padding is None:
            before, out = max(kernel_size - stride, 0) // 2, size * stride
        else:
            before, out = padding, full - 2 * padding + output_padding
        after = full - before - out
    else:
        if padding is None:
            out = -(-size // stride)  # ceil(size / stride)
            total = max((out - 1) * stride + kernel_size - size, 0)
            before, after = total // 2, total - total // 2
        else:
            before = after = padding
        out = (size + before + after - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(f"a capsule grid axis of {size} positions gives no output with kernel "
                         f"{kernel_size}, stride {stride} and padding {padding}")
    return before, after, out


def _check_weight(weight: torch.Tensor, t: int, d_in: int, out_types: int, transposed: bool,
                  share_weight: bool) -> int:
    """Validate the kernel's layout and return ``D_out``."""
    check_tensor(weight, "weight", None, finite=False)
    if weight.dim() not in (4, 5):
        raise ValueError(f"weight must have 2 + spatial_dims (4 or 5) dimensions, got shape "
                         f"{tuple(weight.shape)}")
    g = 1 if share_weight else t
    rows, cols = weight.shape[:2]
    parent = cols if transposed else rows // g  # C * D_out
    expect_in = g * d_in if transposed else d_in
    if (rows if transposed else cols) != expect_in or parent % out_types or parent == 0 or (
            not transposed and rows % g):
        layout = "(G*D_in, C*D_out, *K)" if transposed else "(G*C*D_out, D_in, *K)"
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {layout} with "
                         f"G={g}, D_in={d_in}, C={out_types}")
    if len(set(weight.shape[2:])) != 1:
        raise ValueError(f"the kernel must be cubic (equal sizes), got {tuple(weight.shape[2:])}")
    return parent // out_types


def local_capsule_votes(
    u: torch.Tensor,
    weight: torch.Tensor,
    out_types: int,
    stride: int = 1,
    padding: int | None = None,
    *,
    transposed: bool = False,
    share_weight: bool = True,
    output_padding: int = 0,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Votes of a locally-constrained capsule layer by one (grouped) convolution.

    Args:
        u: child capsules ``(B, T, *S, D_in)``, ``len(S)`` 2 or 3.
        weight: see the module docstring's table (the layout follows ``transposed`` and
            ``share_weight``).
        out_types: parent types ``C``.
        stride, padding, output_padding: of the (transposed) convolution; ``padding=None``
            is TensorFlow's ``'same'``.
        transposed: a transposed convolution (deconvolutional capsules).
        share_weight: one kernel for every child type (child types folded into the batch);
            else one per type (a grouped convolution with ``T`` groups).

    Returns:
        ``(votes, S_out)`` with votes ``(B*L, T, C, D_out)``, parent-major in memory (the
        layout dynamic routing reads in place); vote ``b*L + o`` is output position ``o``
        (row-major over ``S_out``) of sample ``b``.
    """
    n = weight.dim() - 2
    b, t, d_in = u.shape[0], u.shape[1], u.shape[-1]
    d_out = _check_weight(weight, t, d_in, out_types, transposed, share_weight)
    if u.dim() != 3 + n:
        raise ValueError(f"a {n}D kernel needs capsules (B, T, {', '.join(_AXES[n])}, D_in), got "
                         f"shape {tuple(u.shape)}")
    k, sizes, c = weight.shape[-1], u.shape[2:-1], out_types
    _check_geometry(k, stride, padding, output_padding, transposed)
    geo = [axis_geometry(s, k, stride, padding, transposed, output_padding) for s in sizes]
    out_sizes = tuple(g[2] for g in geo)
    x = u.movedim(-1, 2)  # (B, T, D_in, *S)
    if share_weight:
        x, groups = x.reshape(b * t, d_in, *sizes), 1  # child types folded into the batch
    else:
        x, groups = x.reshape(b, t * d_in, *sizes), t  # child types as groups
    before = [g[0] for g in geo]
    after = [g[1] for g in geo]
    if transposed:
        # crop ``before`` through PyTorch's padding; output_padding covers after < before
        extra = [max(bf - af, 0) for bf, af in zip(before, after)]
        y = _DECONV[n](x, weight, stride=stride, padding=tuple(before), output_padding=tuple(extra),
                       groups=groups)
        if any(af > bf for bf, af in zip(before, after)):  # odd crop: one more at the end
            y = y[(..., *(slice(0, o) for o in out_sizes))]
    elif before == after:
        y = _CONV[n](x, weight, stride=stride, padding=tuple(before), groups=groups)
    else:  # TensorFlow's asymmetric 'same' padding
        pad = [p for bf, af in zip(reversed(before), reversed(after)) for p in (bf, af)]
        y = _CONV[n](F.pad(x, pad), weight, stride=stride, groups=groups)
    n_l = math.prod(out_sizes)
    y = y.reshape(b, t, c, d_out, n_l)  # (B*T or B, G*C*D_out, *S_out) -> (B, T, C, D_out, L)
    # (B, L, C, T, D_out) in memory, seen as (B*L, T, C, D_out): parent-major votes
    votes = y.permute(0, 4, 2, 1, 3).reshape(b * n_l, c, t, d_out).transpose(1, 2)
    return votes, out_sizes


def local_capsule_votes_loop(
    u: torch.Tensor,
    weight: torch.Tensor,
    out_types: int,
    stride: int = 1,
    padding: int | None = None,
    *,
    transposed: bool = False,
    share_weight: bool = True,
    output_padding: int = 0,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Reference: :func:`local_capsule_votes` with Python loops over positions and offsets.

    Reads the module docstring's equations literally: a convolution gathers, for each output
    position and kernel offset, the child at ``o * s + kappa - before``; a transposed
    convolution scatters each child at ``x`` to ``x * s + kappa - before``. Slow; for tests.
    """
    n = weight.dim() - 2
    b, t, d_in = u.shape[0], u.shape[1], u.shape[-1]
    d_out = _check_weight(weight, t, d_in, out_types, transposed, share_weight)
    k, sizes, c = weight.shape[-1], tuple(u.shape[2:-1]), out_types
    _check_geometry(k, stride, padding, output_padding, transposed)
    geo = [axis_geometry(s, k, stride, padding, transposed, output_padding) for s in sizes]
    before, out_sizes = [g[0] for g in geo], tuple(g[2] for g in geo)
    # per-type vote matrices w[t, c, d, i, *K]
    if transposed:  # (G*D_in, C*D_out, *K)
        w = weight.reshape(-1, d_in, c, d_out, *weight.shape[2:]).movedim(1, 3)
    else:  # (G*C*D_out, D_in, *K)
        w = weight.reshape(-1, c, d_out, d_in, *weight.shape[2:])
    w = w.expand(t, *w.shape[1:])  # shared: the same kernel for every child type
    votes = u.new_zeros(b, *out_sizes, t, c, d_out)
    offsets = list(itertools.product(range(k), repeat=n))
    if transposed:
        for x in itertools.product(*(range(s) for s in sizes)):
            child = u[(slice(None), slice(None), *x)]  # (B, T, D_in)
            for kappa in offsets:
                o = tuple(xi * stride + ki - bi for xi, ki, bi in zip(x, kappa, before))
                if all(0 <= oi < so for oi, so in zip(o, out_sizes)):
                    # (T, C, D_out, D_in) x (B, T, D_in) -> (B, T, C, D_out)
                    votes[(slice(None), *o)] += torch.einsum("tcdi,bti->btcd", w[(..., *kappa)], child)
    else:
        for o in itertools.product(*(range(s) for s in out_sizes)):
            for kappa in offsets:
                x = tuple(oi * stride + ki - bi for oi, ki, bi in zip(o, kappa, before))
                if all(0 <= xi < s for xi, s in zip(x, sizes)):  # outside: zero padding
                    child = u[(slice(None), slice(None), *x)]  # (B, T, D_in)
                    votes[(slice(None), *o)] += torch.einsum("tcdi,bti->btcd", w[(..., *kappa)], child)
    return votes.reshape(b * math.prod(out_sizes), t, c, d_out), out_sizes


class _LocalCaps(nn.Module):
    """Shared body of :class:`LocalConvCaps` and :class:`LocalDeconvCaps`."""

    transposed = False

    def __init__(
        self,
        in_types: int,
        in_dim: int,
        out_types: int,
        out_dim: int,
        kernel_size: int,
        stride: int,
        padding: int | None,
        output_padding: int,
        spatial_dims: int,
        routing_iterations: int,
        share_weight: bool,
        bias: bool,
        bias_init: float,
        init_std: float | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for n, v in dict(in_types=in_types, in_dim=in_dim, out_types=out_types,
                         out_dim=out_dim).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {n} must be a positive integer, got {v!r}")
        if spatial_dims not in _AXES:
            raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        _check_geometry(kernel_size, stride, padding, output_padding, self.transposed)
        self.in_types, self.in_dim, self.out_types, self.out_dim = in_types, in_dim, out_types, out_dim
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_padding, self.spatial_dims = output_padding, spatial_dims
        self.share_weight = bool(share_weight)
        g = 1 if self.share_weight else in_types
        kernel = (kernel_size,) * spatial_dims
        if self.transposed:
            shape = (g * in_dim, out_types * out_dim, *kernel)
            fan_in = kernel_size ** spatial_dims * out_types * out_dim  # Keras' fan_in of (k, k, C*D, D_in)
        else:
            shape = (g * out_types * out_dim, in_dim, *kernel)
            fan_in = kernel_size ** spatial_dims * in_dim
        std = math.sqrt(2.0 / fan_in) if init_std is None else init_std
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std))
        # one routing problem per output position: T children, C parents, per-parent bias
        self.routing = create_routing("dynamic", num_parents=out_types, parent_dim=out_dim,
                                      iterations=routing_iterations, bias=bias, bias_init=bias_init)

    def output_size(self, *sizes: int) -> tuple[int, ...]:
        """Spatial sizes of the parent grid for a child grid of ``sizes``."""
        if len(sizes) != self.spatial_dims:
            raise ValueError(f"{type(self).__name__} is {self.spatial_dims}D: give "
                             f"{self.spatial_dims} sizes, got {sizes}")
        return tuple(axis_geometry(s, self.kernel_size, self.stride, self.padding, self.transposed,
                                   self.output_padding)[2] for s in sizes)

    def _check_input(self, u: torch.Tensor) -> None:
        name, n = type(self).__name__, self.spatial_dims
        axes = (*_AXES[n], "D_in")
        if isinstance(u, torch.Tensor) and u.dim() != 3 + n:
            given = u.dim() - 3
            kind = f"a {given}D capsule grid" if given in _AXES else f"a {u.dim()}-dimensional tensor"
            raise ValueError(f"{name} is a {n}D layer and takes capsules (B, T, {', '.join(axes)}); "
                             f"got {kind} of shape {tuple(u.shape)}")
        check_tensor(u, f"{name} input", ("B", self.in_types, *axes[:-1], self.in_dim))
        check_dtype_matches(u, f"{name} input", self)

    def votes(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Votes ``(B*L, T, C, D_out)`` and ``S_out``; see :func:`local_capsule_votes`."""
        self._check_input(u)
        return local_capsule_votes(u, self.weight, self.out_types, self.stride, self.padding,
                                   transposed=self.transposed, share_weight=self.share_weight,
                                   output_padding=self.output_padding)

    def forward(self, u: torch.Tensor) -> RoutingOutput:
        votes, out_sizes = self.votes(u)  # (B*L, T, C, D_out)
        # one routing call for the layer: poses (B*L, C, D_out), couplings (B*L, T, C)
        out = self.routing(votes, activations=None, context=None)
        b, c, n_l = u.shape[0], self.out_types, math.prod(out_sizes)
        poses = out.poses.view(b, *out_sizes, c, self.out_dim).movedim(-2, 1)
        return RoutingOutput(
            poses=poses,  # (B, C, *S_out, D_out)
            couplings=out.couplings.reshape(b, n_l, self.in_types, c),  # (B, L, T, C)
        )

    def extra_repr(self) -> str:
        s = (f"in_types={self.in_types}, in_dim={self.in_dim}, out_types={self.out_types}, "
             f"out_dim={self.out_dim}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, spatial_dims={self.spatial_dims}, "
             f"share_weight={self.share_weight}")
        return s + (f", output_padding={self.output_padding}" if self.output_padding else "")


class LocalConvCaps(_LocalCaps):
    """SegCaps' convolutional capsules with locally-constrained dynamic routing.

    Each child type convolves its ``K^n`` window of poses into one vote per parent type at
    every output position; the ``T`` votes at a position are routed to the ``C`` parent
    types there (couplings: a softmax over parent types). See the module docstring for the
    equations and what was checked in the official code.

    Args:
        in_types: child capsule types ``T``.
        in_dim: child pose dimension ``D_in``.
        out_types: parent capsule types ``C``.
        out_dim: parent pose dimension ``D_out``.
        kernel_size: ``K`` (5 in SegCaps; 1 for the final segmentation capsules).
        stride: 1, or 2 to halve the grid.
        padding: zeros on each side, or None for TensorFlow's ``'same'`` (the official code):
            ``K // 2`` per side at stride 1 and odd ``K``; at stride 2 the output has
            ``ceil(n / 2)`` positions and the odd padding zero goes after.
        spatial_dims: 2 (grids ``(H, W)``) or 3 (``(D, H, W)``).
        routing_iterations: dynamic routing iterations (1 for SegCaps' primary capsules, 3
            elsewhere).
        share_weight: one kernel shared by all child types (SegCaps); False: one per type.
        bias: learn the per-parent routing bias ``(C, D_out)``.
        bias_init: its initial value (0.1 in the official code).
        init_std: std of the truncated-normal weight init; None: Keras ``he_normal``.

    Shape:
        ``(B, T, *S, D_in)`` -> :class:`~torchcaps.routing.RoutingOutput` with poses
        ``(B, C, *S_out, D_out)`` and couplings ``(B, L, T, C)``, ``L = prod(S_out)``.
    """

    def __init__(
        self,
        in_types: int,
        in_dim: int,
        out_types: int,
        out_dim: int,
        kernel_size: int = 5,
        stride: int = 1,
        padding: int | None = None,
        spatial_dims: int = 2,
        routing_iterations: int = 3,
        share_weight: bool = True,
        bias: bool = True,
        bias_init: float = 0.1,
        init_std: float | None = None,
    ) -> None:
        super().__init__(in_types, in_dim, out_types, out_dim, kernel_size, stride, padding, 0,
                         spatial_dims, routing_iterations, share_weight, bias, bias_init, init_std)


class LocalDeconvCaps(_LocalCaps):
    """SegCaps' deconvolutional (transposed-convolution) capsules with local routing.

    As :class:`LocalConvCaps`, with the votes made by a transposed convolution: each child
    spreads ``W_t[c, kappa] @ u`` to the output positions ``x * s + kappa - before`` and the
    contributions landing on one position are summed into that position's vote. SegCaps
    uses kernel 4, stride 2 and ``'same'`` padding, which doubles every size exactly.

    Args:
        in_types, in_dim, out_types, out_dim: as :class:`LocalConvCaps`.
        kernel_size: ``K`` (4 in SegCaps).
        stride: the upsampling factor (2 in SegCaps).
        padding: positions cropped from each side of the full output
            ``(n - 1) * stride + K`` (PyTorch's ``ConvTranspose`` padding), or None for
            TensorFlow's ``'same'``: exactly ``n * stride`` positions (``K=4, stride=2``:
            ``padding=1``).
        output_padding: positions added at the end with an explicit ``padding`` (as in
            ``nn.ConvTranspose2d``), e.g. ``K=3, stride=2, padding=1, output_padding=1``
            doubles the size.
        spatial_dims, routing_iterations, share_weight, bias, bias_init, init_std: as
            :class:`LocalConvCaps`; the default ``he_normal`` std uses Keras' ``fan_in`` of the
            official transposed kernel, ``K^n * C * D_out``.

    Shape:
        ``(B, T, *S, D_in)`` -> poses ``(B, C, *S_out, D_out)``, couplings ``(B, L, T, C)``;
        ``S_out = S * stride`` with ``padding=None``.
    """

    transposed = True

    def __init__(
        self,
        in_types: int,
        in_dim: int,
        out_types: int,
        out_dim: int,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int | None = None,
        output_padding: int = 0,
        spatial_dims: int = 2,
        routing_iterations: int = 3,
        share_weight: bool = True,
        bias: bool = True,
        bias_init: float = 0.1,
        init_std: float | None = None,
    ) -> None:
        super().__init__(in_types, in_dim, out_types, out_dim, kernel_size, stride, padding,
                         output_padding, spatial_dims, routing_iterations, share_weight, bias,
                         bias_init, init_std)
