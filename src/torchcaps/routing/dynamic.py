"""Dynamic routing by agreement (Sabour, Frosst, Hinton 2017, arXiv 1710.09829, Procedure 1).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose.

Update equations, for ``r`` iterations starting from logits ``b_ij = 0``:

    c_ij = softmax_j(b_ij)                 (Eq. 3; over PARENTS j, for each child i)
    s_j  = sum_i c_ij u_hat_j|i  (+ bias_j) (Eq. 2; the bias is in the official code)
    v_j  = squash(s_j)                     (Eq. 1)
    b_ij = b_ij + u_hat_j|i . v_j          (agreement; skipped after the last iteration)

Shapes:

    =============  ==============  ===========================================
    votes          (B, I, J, D)    u_hat_j|i
    logits         (B, I, J)       b_ij
    couplings      (B, I, J)       c_ij, sums to 1 over J (dim 2)
    poses          (B, J, D)       v_j
    =============  ==============  ===========================================

Options beyond the paper, both from the authors' official code:

* ``bias``: a learned per-parent bias ``(J, D)`` added to ``s_j`` before squashing.
* ``leaky``: "leaky routing" adds one all-zero logit per child to the softmax, a
  "none of the above" parent that absorbs votes agreeing with no real parent;
  couplings then sum to at most one over the real parents.
* ``detach_inner``: use ``u_hat.detach()`` in all but the final iteration, so
  gradients flow only through the last pass (an implementation choice of some
  ports, not in the paper; the official code does not detach, so default False).
"""

from __future__ import annotations

import torch

from .._validate import check_iterations
from ..functional import squash
from .base import Routing, RoutingOutput, register_routing

__all__ = ["DynamicRouting"]


@register_routing("dynamic")
class DynamicRouting(Routing):
    """Routing by agreement.

    Args:
        iterations: routing iterations ``r`` (3 in the paper); at least 1.
        num_parents: ``J``; required when ``bias=True``.
        parent_dim: ``D``; required when ``bias=True``.
        bias: learn a per-parent bias added before the squash.
        leaky: leaky routing (an extra zero logit per child).
        detach_inner: detach votes in every iteration but the last.
        bias_init: initial value of the bias (the official code uses 0.1).
    """

    def __init__(
        self,
        iterations: int = 3,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        bias: bool = False,
        leaky: bool = False,
        detach_inner: bool = False,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        self.iterations = iterations
        self.leaky = leaky
        self.detach_inner = detach_inner
        self._init_bias(bias, bias_init)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, leaky={self.leaky}, "
                f"detach_inner={self.detach_inner}, bias={self.bias is not None}")

    def _couplings(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over parents of parent-major logits ``(B, J, I)`` (dim 1)."""
        if not self.leaky:
            return torch.softmax(logits, dim=1)  # (B, J, I), over parents
        leak = logits.new_zeros(logits.shape[:1] + (1,) + logits.shape[2:])
        return torch.softmax(torch.cat([leak, logits], dim=1), dim=1)[:, 1:]

    def route(self, votes: torch.Tensor) -> RoutingOutput:
        b, i, j, d = votes.shape
        # Work parent-major: every contraction below sums over children i for each (b, j).
        # If the votes' memory is (B, J, I, D), as CapsLinear produces it, this is a free view
        # and each einsum is one batched matmul reading the votes in place; otherwise einsum
        # rearranges them as it needs.
        vt = votes.transpose(1, 2)  # (B, J, I, D)
        logits = votes.new_zeros(b, j, i)  # b_ij, stored (B, J, I)
        inner = vt.detach() if self.detach_inner else vt
        for it in range(self.iterations):
            last = it == self.iterations - 1
            u = vt if last else inner
            c = self._couplings(logits)  # (B, J, I), sums to 1 over J
            # s_j = sum_i c_ij u_hat_j|i: (B, J, I) x (B, J, I, D) -> (B, J, D), a bmm over (b, j)
            s = torch.einsum("bji,bjid->bjd", c, u)
            if self.bias is not None:
                s = s + self.bias
            v = squash(s)  # (B, J, D)
            if not last:
                # agreement u_hat_j|i . v_j: (B, J, I, D) x (B, J, D) -> (B, J, I)
                logits = logits + torch.einsum("bjid,bjd->bji", u, v)
        return RoutingOutput(poses=v, couplings=c.transpose(1, 2))  # couplings (B, I, J)
