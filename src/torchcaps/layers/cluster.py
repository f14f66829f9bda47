"""Convolutional capsule layer with non-iterative cluster routing (Zhao & Cheng 2021,
Neural Networks 143; arXiv 2109.09213; official code github.com/ZHAOZHIHAO/ClusterRouting).

Letter legend: ``b`` batch, ``i`` input capsule channels, ``j`` output capsule channels,
``k`` votes in a cluster, ``d`` pose element, ``h, w`` grid position.

A *capsule channel* is an ``H x W`` grid of ``D``-dim capsules, stored ``(D, H, W)``.
Input channel ``i`` owns one convolution (its ``K*J*D_out`` filters see only channel
``i``'s ``D_in`` maps) that casts, at every output position, a cluster of ``K`` votes for
every output channel ``j``. Cluster routing (:func:`torchcaps.routing.cluster.cluster_route`,
CR1-CR4) then runs at every position and pose element, and a LayerNorm over
``(D, H', W')`` follows:

    v_ijk  = conv_i(u_i)[k, j]                              (K votes of child i for parent j)
    s_j    = sum_i softmax_i(-log sigma_ij) * mu_ij         (CR1-CR4, element-wise in d, h, w)
    out_j  = LayerNorm_(D, H', W')(s_j)                     (one LayerNorm shared by all j)

Checked against the official code (``CapsLayerWithClusterRouting``; the paper body was not
reachable from here):

* one 3x3 convolution (padding 1, with bias) per input channel, with output channels
  laid out ``(K, C_out, D_out)``; this layer uses the same layout, so an official
  checkpoint's per-channel weights concatenated over ``i`` load into :attr:`weight`.
  All ``C_in`` convolutions run as **one grouped convolution** (``groups = C_in``).
* std/mean over the ``K`` votes (population std) and the softmax over input channels
  are per element ``(d, h, w)``.
* the nonlinearity is ``nn.LayerNorm([D_out, H', W'])`` (affine, default eps 1e-5), one
  module applied to every output channel, so its affine parameters are shared over ``j``.
* the first layer of the network feeds the image itself to all ``C_in`` convolutions.
  Here a 4-D input ``(B, D_in, H, W)`` means exactly that ("shared input") and runs the
  same weight as an ungrouped convolution, equal to the grouped one on ``C_in`` copies.
* the official layer builds ``C_out`` convolutions but uses only the first ``C_in``; with
  ``C_out > C_in`` (the class layer) the rest are unused parameters. This layer has
  exactly ``C_in`` groups.
* deviation: the official ``-log(std)`` has no epsilon; here ``eps=1e-8`` is added to the
  variance (``eps=0`` restores the official formula, see :mod:`torchcaps.routing.cluster`).

Shapes:

    ==============  ============================  ======================================
    input           (B, C_in, D_in, H, W)         capsule channels u_i (or (B, D_in, H, W)
                                                  shared by all C_in children)
    conv output     (B, C_in*K*C_out*D, H', W')   grouped conv, C_in groups
    votes           (B, C_in, K, C_out, D, H', W')
    weights         (B, C_in, C_out, D, H', W')   sum to 1 over C_in (dim 1)
    output          (B, C_out, D, H', W')         after the LayerNorm
    ==============  ============================  ======================================
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .._validate import check_tensor
from ..routing.cluster import cluster_statistics, combine_clusters

__all__ = ["ClusterConvCaps", "RECOMPUTE_BYTES"]

#: in training with ``recompute=True``, the votes of about this many bytes of samples are
#: made (and routed) at a time, in forward and again in backward
RECOMPUTE_BYTES = 32 * 2**20


def _pair(x: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (x, x) if isinstance(x, int) else tuple(x)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}")
    return pair  # type: ignore[return-value]


class ClusterConvCaps(nn.Module):
    """Convolutional capsule layer with cluster routing and LayerNorm.

    Args:
        in_caps: input capsule channels ``C_in`` (the children).
        in_dim: input capsule dimension ``D_in`` (image channels for the first layer).
        out_caps: output capsule channels ``C_out`` (the parents).
        out_dim: output capsule dimension ``D``.
        cluster_size: votes per cluster ``K`` (at least 2).
        in_size: input grid ``(H, W)`` (an int for square); fixes the LayerNorm shape and
            is checked on every input. May be ``None`` only with ``layer_norm=False``.
        kernel_size, stride: of each child's convolution (3 and 1 or 2 in the paper).
        padding: defaults to ``kernel_size // 2`` (1 in the paper).
        bias: convolution bias (on in the official code).
        layer_norm: apply ``LayerNorm((D, H', W'))`` to each output channel.
        eps: added to the cluster variance before the log (0 = official formula).
        norm_eps: the LayerNorm's epsilon (PyTorch default 1e-5, as in the official code).
        recompute: in training, keep only the layer's input for backward and make the
            votes again there (``torch.utils.checkpoint``), :data:`RECOMPUTE_BYTES` of
            votes at a time: the votes are ``K * C_out`` times larger than the input, so
            this trades one more convolution for most of the layer's activation memory.
            Results are the same either way (to round-off in the weight gradients, which
            are summed over groups of samples).

    Shape:
        input ``(B, C_in, D_in, H, W)`` or shared ``(B, D_in, H, W)`` -> output
        ``(B, C_out, D, H', W')``; with ``return_weights=True`` also the routing weights
        ``(B, C_in, C_out, D, H', W')``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        cluster_size: int,
        in_size: int | tuple[int, int] | None = None,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        bias: bool = True,
        layer_norm: bool = True,
        eps: float = 1e-8,
        norm_eps: float = 1e-5,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(in_caps=in_caps, in_dim=in_dim, out_caps=out_caps, out_dim=out_dim)
        for n, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        if not isinstance(cluster_size, int) or isinstance(cluster_size, bool) or cluster_size < 2:
            raise ValueError(f"cluster_size must be an integer >= 2, got {cluster_size!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(
            tuple(k // 2 for k in self.kernel_size) if padding is None else padding, "padding"
        )
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"need kernel_size >= 1, stride >= 1, padding >= 0; got {self.kernel_size}, "
                f"{self.stride}, {self.padding}"
            )
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.cluster_size = cluster_size
        self.eps = float(eps)
        self.recompute = bool(recompute)

        self.in_size = None if in_size is None else _pair(in_size, "in_size")
        self.out_size = None if self.in_size is None else self.output_size(*self.in_size)
        if self.out_size is not None and min(self.out_size) < 1:
            raise ValueError(f"in_size {self.in_size} is too small for this kernel and padding")
        if layer_norm:
            if self.out_size is None:
                raise ValueError("layer_norm=True needs in_size to fix the LayerNorm shape")
            self.norm = nn.LayerNorm((out_dim, *self.out_size), eps=norm_eps)
        else:
            self.norm = None

        n_out = in_caps * cluster_size * out_caps * out_dim  # conv channels, (C_in, K, C_out, D)
        # one (K*C_out*D, D_in, kh, kw) filter bank per child, stacked along the outputs:
        # the weight layout of nn.Conv2d(C_in*D_in, n_out, groups=C_in)
        self.weight = nn.Parameter(torch.empty(n_out, in_dim, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default initialisation, per child's convolution (fan-in D_in*kh*kw)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_dim * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Grid size ``(H', W')`` of the output for an ``h x w`` input."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """Vote clusters ``(B, C_in, K, C_out, D, H', W')`` from the input capsules."""
        hw = self.in_size if self.in_size is not None else ("H", "W")
        check_tensor(u, "ClusterConvCaps input", None, finite=False)  # type; shape below
        if u.dim() not in (4, 5):
            raise ValueError(
                "ClusterConvCaps input must be (B, C_in, D_in, H, W) or shared (B, D_in, H, W), "
                f"got shape {tuple(u.shape)}"
            )
        if u.dim() == 4:  # shared input: every child convolves the same maps
            check_tensor(u, "ClusterConvCaps input", ("B", self.in_dim, *hw))
            groups = 1
        else:
            check_tensor(u, "ClusterConvCaps input", ("B", self.in_caps, self.in_dim, *hw))
            u = u.flatten(1, 2)  # (B, C_in*D_in, H, W), channel-major: group i = channel i
            groups = self.in_caps
        out = F.conv2d(u, self.weight, self.bias, self.stride, self.padding, groups=groups)
        b, _, h, w = out.shape  # (B, C_in*K*C_out*D, H', W')
        return out.view(b, self.in_caps, self.cluster_size, self.out_caps, self.out_dim, h, w)

    def _route(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses ``(B, C_out, D, H', W')`` and weights ``(B, C_in, C_out, D, H', W')``:
        cluster statistics over k (dim 2 of the votes), softmax and sum over children i."""
        mu, var = cluster_statistics(self.votes(u), 2)  # (B, C_in, C_out, D, H', W') each
        return combine_clusters(mu, var, child_dim=1, eps=self.eps)

    def forward(
        self, u: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.recompute and torch.is_grad_enabled() and u.shape[0] > 0:
            # keep only the layer's input for backward, where the votes and the routing are
            # made again, a group of samples at a time (each sample is routed alone), so that
            # votes and their gradient exist for one group only
            h, w = self.output_size(*u.shape[-2:])
            per_sample = self.weight.shape[0] * h * w * u.element_size()
            rows = max(1, RECOMPUTE_BYTES // per_sample)
            parts = [checkpoint(self._route, part, use_reentrant=False) for part in u.split(rows)]
            poses = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
            weights = torch.cat([w for _, w in parts]) if len(parts) > 1 else parts[0][1]
        else:
            poses, weights = self._route(u)
        if self.norm is not None:
            poses = self.norm(poses)  # LayerNorm over (D, H', W') of every output channel
        return (poses, weights) if return_weights else poses  # (B, C_out, D, H', W')

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, cluster_size={self.cluster_size}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"in_size={self.in_size}, bias={self.bias is not None}, eps={self.eps}"
        )
