"""Fully-connected capsule layer: one transform per (child, parent) pair, pluggable routing."""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_dtype_matches, check_tensor
from ..routing import Routing, RoutingContext, RoutingOutput, create_routing

__all__ = ["CapsLinear"]


def _votes_per_pair(routing: Routing, layer: str) -> int:
    """How many votes of ``D`` values per (child, parent) pair ``routing`` takes."""
    k = routing.votes_per_pair
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(
            f"{layer} makes the votes, so it must know how many the routing takes per (child, "
            f"parent) pair; {type(routing).__name__} does not fix it: give it (e.g. "
            f"cluster_size in routing_kwargs)"
        )
    return k


class CapsLinear(nn.Module):
    """Votes ``u_hat_j|i = W_ij u_i`` for every child/parent pair, then routing.

    Letter legend: ``b`` batch, ``i`` children, ``j`` parents, ``k`` child dim, ``d`` parent dim.

    Args:
        in_caps: number of child capsules ``I``.
        in_dim: child capsule dimension ``K``.
        out_caps: number of parent capsules ``J``.
        out_dim: parent capsule dimension ``D``.
        routing: a registered routing name or a :class:`~torchcaps.routing.Routing` instance.
        routing_kwargs: forwarded to :func:`~torchcaps.routing.create_routing`
            together with ``num_parents`` and ``parent_dim``.
        init_std: standard deviation of the normal initialisation of ``W``
            (0.01 as in the reference implementations).

    Every registered routing fits: the layer makes ``routing.votes_per_pair`` votes of ``D``
    values per (child, parent) pair (``K`` for cluster routing, whose ``cluster_size`` must
    then be given; 1 otherwise), and ``forward`` hands its optional child ``activations`` and
    :class:`~torchcaps.routing.RoutingContext` to the routing unchanged.

    Shape:
        input ``(B, I, K)``, optional activations ``(B, I)``; output
        :class:`~torchcaps.routing.RoutingOutput` with poses ``(B, J, D)`` and couplings
        ``(B, I, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        routing: str | Routing = "dynamic",
        routing_kwargs: dict | None = None,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        for n, v in dict(in_caps=in_caps, in_dim=in_dim, out_caps=out_caps, out_dim=out_dim).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        if isinstance(routing, str):
            routing = create_routing(
                routing, num_parents=out_caps, parent_dim=out_dim, **(routing_kwargs or {})
            )
        elif routing_kwargs:
            raise ValueError("routing_kwargs is only used when routing is given by name")
        self.votes_per_pair = _votes_per_pair(routing, "CapsLinear")
        n_out = self.votes_per_pair * out_dim  # values per (child, parent) pair
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, n_out, in_dim) * init_std)
        self.routing = routing

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """Votes ``(B, I, J, D)`` from child poses ``(B, I, K)`` (``(B, I, J, K'*D)`` for a
        routing that takes ``K'`` votes per pair).

        The result is a ``(B, I, J, D)`` view of memory laid out parent-major,
        ``(B, J, I, D)``: routing sums over children ``i`` for each ``(b, j)``, and with
        this layout every such sum is a contiguous block, so the contractions of
        :class:`~torchcaps.routing.DynamicRouting` read the votes in place instead of
        copying them on every iteration. The one copy made here is the only one; the
        batched-GEMM output it comes from is freed at once (also under autograd, whose
        backward of a copy keeps nothing).
        """
        check_tensor(u, "CapsLinear input", ("B", self.in_caps, self.in_dim))
        check_dtype_matches(u, "CapsLinear input", self)
        # (B, I, K) x (I, J, D, K) -> (B, I, J, D): a batched matmul over I, whose output
        # (I, B, J*D) is rearranged once into (B, J, I, D)
        v = torch.einsum("bik,ijdk->bjid", u, self.weight).contiguous()
        return v.transpose(1, 2)

    def forward(
        self,
        u: torch.Tensor,
        activations: torch.Tensor | None = None,
        context: RoutingContext | None = None,
    ) -> RoutingOutput:
        """Votes from ``u``, routed with the child ``activations`` and ``context`` given."""
        return self.routing(self.votes(u), activations, context)

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, "
                f"out_caps={self.out_caps}, out_dim={self.out_dim}")
