"""Self-attention routing (Mazzia, Salvetti, Chiaberge 2021, "Efficient-CapsNet: capsule
network with self-attention routing", Scientific Reports 11, 2021; arXiv 2101.12491).

Letter legend: ``b`` batch, ``i``/``k`` child capsules, ``j`` parent capsules, ``d`` pose.

One pass, no iterations. For every parent ``j`` the votes of all children form a matrix
``U_j`` (I x D) whose row ``i`` is ``u_hat_j|i``:

    A_j    = U_j U_j^T / sqrt(D)                       (self-attention, I x I, per parent)
    l_ij   = sum_k A_j[i, k]                           (summed agreement of child i)
    c_ij   = exp(l_ij) / sum_j' exp(l_ij')             (softmax over PARENTS j, per child i)
    s_j    = sum_i u_hat_j|i (c_ij + b_ij)             (b: learned log prior, init 0)
    v_j    = (1 - exp(-|s_j|)) s_j / |s_j|             (squash_exp)

What was checked, and against what:

* The paper's Methods section could not be retrieved here (only its abstract), so the
  equations above were verified against the authors' official TensorFlow code,
  ``EscVM/Efficient-CapsNet`` ``utils/layers.py`` (class ``FCCaps``). There, with
  ``u`` of shape (B, J, I, D): the agreement is ``einsum('...ij,...kj->...i', u, u)``, i.e.
  ``u_j|i . sum_k u_j|k`` = the ROW SUM over ``k`` of ``A_j`` (not a sum over parents); it
  is divided by ``sqrt(D)`` with ``D`` the *parent* (vote) dimension (16 in the MNIST
  model); the softmax is over ``axis=1`` = the PARENT axis; then the prior ``b`` of shape
  (J, I, 1), zero-initialised, is ADDED to the softmax output (not to the logits), so
  ``c + b`` need not sum to one; ``s`` sums ``u * (c + b)`` over children. The digest
  ("softmax over parents of the summed agreement") is therefore confirmed. The paper's
  equation numbers are not given here because they could not be checked.
* The row sum is computed as ``u_hat_j|i . (sum_k u_hat_j|k)``, the same number as
  ``sum_k A_j[i, k]`` without materialising the ``(B, J, I, I)`` attention tensor:
  O(B I J D) instead of O(B I^2 J D). ``tests/test_efficient_capsnet.py`` compares it with
  a loop that builds every ``A_j`` explicitly.

Shapes:

    ==============  ============  ==================================================
    votes           (B, I, J, D)  u_hat_j|i
    logits          (B, I, J)     l_ij = sum_k A_j[i, k]
    couplings       (B, I, J)     c_ij, sums to 1 over J (dim 2); the prior is NOT in it
    prior           (I, J)        b_ij, a parameter (needs ``num_children``)
    poses           (B, J, D)     v_j
    ==============  ============  ==================================================

Properties: with the prior at zero (or absent) the routing is invariant to permuting the
children (``l_ij`` depends on the others only through ``sum_k``, and ``s_j`` is a sum over
``i``). A learned prior ``b_ij`` is tied to the child index, so with a non-zero prior the
layer is permutation-*equivariant* only if ``b`` is permuted along with the children.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import squash_exp
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["SelfAttentionRouting", "self_attention_routing"]


def self_attention_routing(
    votes: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of self-attention routing (see the module docstring), the functional core of
    :class:`SelfAttentionRouting`.

    Args:
        votes: ``(B, I, J, D)``.
        prior: learned log prior ``b`` ``(I, J)`` added to the couplings, or None.
        eps: the ``eps`` of :func:`~torchcaps.functional.squash_exp`.

    Returns:
        ``poses v (B, J, D)`` and ``couplings c (B, I, J)`` (softmax over parents, without
        the prior).
    """
    d = votes.shape[-1]
    # sum_k A_j[i, k] = u_hat_j|i . sum_k u_hat_j|k / sqrt(D)
    total = votes.sum(dim=1)  # (B, J, D): sum over children k
    logits = torch.einsum("bijd,bjd->bij", votes, total) / math.sqrt(d)  # (B, I, J)
    c = torch.softmax(logits, dim=2)  # (B, I, J), over parents j
    weights = c if prior is None else c + prior  # (B, I, J)
    # sum_i u_hat_j|i (c_ij + b_ij): (B, I, J) x (B, I, J, D) -> (B, J, D)
    s = torch.einsum("bij,bijd->bjd", weights, votes)
    return squash_exp(s, eps=eps), c  # (B, J, D), (B, I, J)


def _check_size(value: object, name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@register_routing("self_attention")
class SelfAttentionRouting(Routing):
    """Efficient-CapsNet's non-iterative self-attention routing.

    Args:
        num_parents: ``J``; needed for the learned prior.
        parent_dim: ``D``; used for the ``1/sqrt(D)`` scale when given (else read from the
            votes) and to validate the votes' shape.
        num_children: ``I``; needed for the learned prior, which has one entry per
            (child, parent) pair. :class:`~torchcaps.layers.CapsLinear` does not pass it:
            give it in ``routing_kwargs``.
        prior: ``True`` learns the prior ``b`` (I, J), initialised at 0, as in the paper
            (then ``num_children`` and ``num_parents`` are required); ``False`` uses none;
            ``None`` (default) learns it exactly when both sizes are known.
        eps: the ``eps`` of :func:`~torchcaps.functional.squash_exp`.

    Shape:
        votes ``(B, I, J, D)`` -> poses ``(B, J, D)``, couplings ``(B, I, J)`` summing to one
        over parents (``normalized_axis = 2``), activations ``None``.
    """

    normalized_axis = 2

    def __init__(
        self,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        num_children: int | None = None,
        prior: bool | None = None,
        eps: float = 1e-8,
    ) -> None:
        _check_size(num_parents, "num_parents")
        _check_size(parent_dim, "parent_dim")
        _check_size(num_children, "num_children")
        if prior is not None and not isinstance(prior, bool):
            raise ValueError(f"prior must be True, False or None, got {prior!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        super().__init__(num_parents, parent_dim)
        self.num_children = num_children
        self.eps = float(eps)
        sizes_known = num_children is not None and num_parents is not None
        if prior and not sizes_known:
            raise ValueError(
                "prior=True needs num_children and num_parents (the prior has one entry per "
                "(child, parent) pair)"
            )
        if sizes_known if prior is None else prior:
            self.prior = nn.Parameter(torch.zeros(num_children, num_parents))  # b_ij (I, J)
        else:
            self.register_parameter("prior", None)

    def extra_repr(self) -> str:
        return (f"num_children={self.num_children}, num_parents={self.num_parents}, "
                f"parent_dim={self.parent_dim}, prior={self.prior is not None}")

    def vote_shape(self) -> tuple:
        return ("B", self.num_children or "I", self.num_parents, self.parent_dim)

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        v, c = self_attention_routing(votes, self.prior, self.eps)
        return RoutingOutput(poses=v, couplings=c)
