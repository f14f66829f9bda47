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

Implementation. Each iteration reads the votes twice (the weighted sum ``s_j`` and the
agreement), so a plain loop reads them ``2r - 1`` times (5 for 3 iterations).
Both reads are batched mat-vec products on parent-major votes ``(B, J, I, D)`` (the layout
:class:`~torchcaps.layers.CapsLinear` makes), the agreement written ``v^T U^T`` (a row
vector times the transposed view, about twice as fast on CPU as ``U v``). Without autograd
on a CPU the batch is routed in chunks of about :data:`CHUNK_BYTES` of votes per thread, so
that a chunk stays in cache across all its iterations and the votes come from memory about
once; results are those of the whole batch at once (each sample is routed alone). As for
every routing, NaN/Inf votes are detected on the output (see
:meth:`~torchcaps.routing.Routing.check_finite_votes`), not in a separate pass.
"""

from __future__ import annotations

import torch

from .._validate import check_iterations
from ..functional import squash
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["DynamicRouting", "dynamic_routing", "CHUNK_BYTES"]

#: bytes of votes per intra-op thread routed at a time on a CPU without autograd (each chunk
#: is read from memory once and then from cache by every iteration; 3 MiB measured best
#: among 0.8 to 12 MiB with one thread, votes (128, 1152, 10, 16))
CHUNK_BYTES = 3 * 2**20


def _couplings(logits: torch.Tensor, leaky: bool) -> torch.Tensor:
    """Softmax over parents of parent-major logits ``(B, J, I)`` (dim 1)."""
    if not leaky:
        return torch.softmax(logits, dim=1)  # (B, J, I), over parents
    leak = logits.new_zeros(logits.shape[:1] + (1,) + logits.shape[2:])
    return torch.softmax(torch.cat([leak, logits], dim=1), dim=1)[:, 1:]


def _route(
    vt: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int,
    leaky: bool,
    detach_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterations on parent-major votes ``vt`` ``(B, J, I, D)``: poses ``(B, J, D)`` and
    couplings ``(B, J, I)``."""
    b, j, i, _ = vt.shape
    inner = vt.detach() if detach_inner else vt
    logits = None  # b_ij, stored (B, J, I); all zero before the first agreement
    for it in range(iterations):
        last = it == iterations - 1
        u = vt if last else inner
        if logits is None:
            # zero logits: every c_ij is 1/J (1/(J+1) when leaky), so s_j = sum_i u_hat_j|i / J
            c = None
            s = u.sum(dim=2) * (1.0 / (j + 1 if leaky else j))  # (B, J, D)
        else:
            c = _couplings(logits, leaky)  # (B, J, I), sums to 1 over J
            # s_j = sum_i c_ij u_hat_j|i: (B, J, 1, I) @ (B, J, I, D) -> (B, J, D), a bmm over (b, j)
            s = (c.unsqueeze(-2) @ u).squeeze(-2)
        if bias is not None:
            s = s + bias
        v = squash(s)  # (B, J, D)
        if not last:
            # agreement u_hat_j|i . v_j: (B, J, 1, D) @ (B, J, D, I) -> (B, J, 1, I)
            agree = v.unsqueeze(-2) @ u.transpose(-1, -2)
            logits = agree.squeeze(-2) if logits is None else logits + agree.squeeze(-2)
    if c is None:  # a single iteration: uniform couplings
        c = vt.new_full((b, j, i), 1.0 / (j + 1 if leaky else j))
    return v, c


def dynamic_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None = None,
    iterations: int = 3,
    leaky: bool = False,
    detach_inner: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by agreement (see the module docstring), the functional core of
    :class:`DynamicRouting`.

    Args:
        votes: ``(B, I, J, D)``; fastest when laid out parent-major in memory,
            ``(B, J, I, D)``, as :class:`~torchcaps.layers.CapsLinear` makes them.
        bias: per-parent bias ``(J, D)`` added before the squash, or None.
        iterations: ``r >= 1``.
        leaky: leaky routing (an extra zero logit per child).
        detach_inner: detach the votes in every iteration but the last.

    Returns:
        ``poses v (B, J, D)`` and ``couplings c (B, I, J)`` (those of the last iteration).
    """
    check_iterations(iterations)
    b, i, j, d = votes.shape
    # Work parent-major: every contraction sums over children i for each (b, j). If the
    # votes' memory is (B, J, I, D), as CapsLinear produces it, this is a free view and each
    # product reads the votes in place; otherwise matmul rearranges them as it needs.
    vt = votes.transpose(1, 2)  # (B, J, I, D)
    per_sample = i * j * d * votes.element_size()
    # each intra-op thread works on its share of a chunk
    step = max(1, CHUNK_BYTES * torch.get_num_threads() // max(per_sample, 1))
    graph = torch.is_grad_enabled() and (
        votes.requires_grad or (bias is not None and bias.requires_grad))
    if graph or votes.device.type != "cpu" or step >= b or torch.compiler.is_compiling():
        v, c = _route(vt, bias, iterations, leaky, detach_inner)
        return v, c.transpose(1, 2)  # poses (B, J, D), couplings (B, I, J)
    poses = votes.new_empty(b, j, d)
    couplings = votes.new_empty(b, j, i)  # (B, J, I), returned as a (B, I, J) view
    for start in range(0, b, step):
        v, c = _route(vt[start:start + step], bias, iterations, leaky, detach_inner)
        poses[start:start + step] = v
        couplings[start:start + step] = c
    return poses, couplings.transpose(1, 2)


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

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        v, c = dynamic_routing(votes, self.bias, self.iterations, self.leaky, self.detach_inner)
        return RoutingOutput(poses=v, couplings=c)
