"""Scaled-distance-agreement (SDA) routing (Peer, Stabinger, Rodriguez-Sanchez; used by
Gugglberger, Peer, Rodriguez-Sanchez 2021).

SDA routing was introduced in Peer, Stabinger, Rodriguez-Sanchez, "Increasing the
adversarial robustness and explainability of capsule networks with gamma-capsules"
(arXiv 1812.09707; earlier title "... through scaled distance agreements") and is one of
the three routings of Gugglberger, Peer, Rodriguez-Sanchez 2021, "Training deep capsule
networks with residual connections" (arXiv 2104.07393; code moejoe95/res-capsnet).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose.

Update equations (numbered S1-S6 here; the papers' own equation numbers are not known
to us, see "Verification" below), for ``r`` iterations starting from ``b_ij = 0``:

    u_hat_ij <- u_hat_ij min(1, |u_i| / |u_hat_ij|)   (S1; clip: |u_hat_ij| <= |u_i|)
    c_ij  = softmax_j(b_ij)                           (S2; over PARENTS j, per child i)
    s_j   = sum_i c_ij u_hat_ij  (+ bias_j)           (S3)
    v_j   = squash(s_j)                               (S4)
    d_ij  = |v_j - u_hat_ij|,  d_o = mean(d_ij),  d_p = rho d_o          (S5)
    b_ij  = t d_ij,  t = log(p (J - 1) / (1 - p)) / (d_p - d_o)          (S6)

(S5, S6 are skipped after the last iteration.) ``t`` is chosen so that a vote at
distance ``d_p`` from its parent, while the child's other ``J - 1`` votes lie at the
mean distance ``d_o``, gets coupling exactly ``p``: ``exp(t d_p) / (exp(t d_p) +
(J - 1) exp(t d_o)) = p``. With ``p = 0.9`` and ``rho = 0.5`` (the authors' constants)
``t < 0``, so closer votes get larger logits. Note that the logits are *replaced* each
iteration, not accumulated as in dynamic routing. Equivalently
``b_ij = -log(p (J-1) / (1-p)) / (1 - rho) * d_ij / d_o``, which is how it is computed
(bounded even when ``d_o`` is tiny; ``d_o`` is clamped at ``eps`` so all-zero distances
give uniform couplings instead of ``0 * inf``).

Shapes:

    =============  ==============  ===========================================
    votes          (B, I, J, D)    u_hat_ij
    child_norms    (B, I)          |u_i| (optional; enables the clip S1)
    distances      (B, I, J)       d_ij
    logits         (B, I, J)       b_ij
    couplings      (B, I, J)       c_ij, sums to 1 over J (dim 2)
    poses          (B, J, D)       v_j
    =============  ==============  ===========================================

Verification. The papers' text could not be retrieved with the search tool (only their
abstracts), so the equations above are taken from the first author's own code,
peerdavid/gamma-capsule-network ``capsule/gamma_capsule_layer.py`` (TensorFlow), which
implements S1-S6 exactly as written, with ``p = 0.9``, ``rho = 0.5``, the softmax over the
parent axis, a learned per-parent bias (initialised to 0.1) added before the squash, and
``iterations = 3`` there (``2`` in the res-capsnet layers). The PyTorch digest in
``shared/PAPERS.md`` ("clip vote norms to the child's norm; d_ij = |v_j - u_hat_ij|;
b_ij = t d_ij with t chosen so the mean distance maps to a fixed coupling ratio") agrees.
What differs between the available implementations, and what we chose:

* ``mean_over``: the authors' code takes ``d_o`` as ONE mean over the whole batch, so an
  image's couplings depend on the other images in its batch. The default ``"sample"``
  takes the mean per example (over ``i, j``); ``"batch"`` reproduces the authors' code.
* A PyTorch port of res-capsnet computes ``t = log(p (J-1)) - log(1 - p) / (d_p - d_o)``
  (operator precedence); we follow the TensorFlow code, whose ``t`` satisfies the
  defining equation above.
* That port also detaches the votes on inner iterations; the TensorFlow code does not.
  ``detach_inner`` (default False) selects this, as in dynamic routing.
* The clip S1 needs the child poses' norms ``|u_i|``, which the routing interface does not
  carry: pass them as ``context.child_norms`` (or ``routing(votes, child_norms=n)``);
  without them S1 is skipped. :class:`~torchcaps.layers.CapsStack` passes them.

Still **unverified**: whether the paper text states the clip, the constants and the batch
mean exactly as the code does; the equation numbering.
"""

from __future__ import annotations

import math

import torch

from .._validate import check_iterations
from ..functional import squash
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["ScaledDistanceRouting", "clip_votes", "scaled_distance_logits", "scaled_distance_routing"]


def clip_votes(votes: torch.Tensor, child_norms: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """S1: rescale each vote so that ``|u_hat_ij| <= |u_i|`` (direction unchanged).

    Computed as ``u_hat_ij * n_i / max(|u_hat_ij|, n_i)``, which is finite (and has a
    finite gradient) at zero votes and zero norms.

    Shape:
        votes ``(B, I, J, D)``, child_norms ``(B, I)`` -> ``(B, I, J, D)``.
    """
    vote_norm = torch.linalg.vector_norm(votes, dim=-1)  # (B, I, J)
    n = child_norms.unsqueeze(-1)  # (B, I, 1)
    factor = n / torch.maximum(vote_norm, n).clamp_min(eps)  # (B, I, J), <= 1
    return votes * factor.unsqueeze(-1)


def _log_odds(num_parents: int, p: float) -> float:
    """``log(p (J - 1) / (1 - p))``, the numerator of ``t`` in S6; must be positive."""
    odds = p * (num_parents - 1) / (1.0 - p)
    if odds <= 1.0:
        raise ValueError(
            f"target_coupling must exceed 1/J = {1.0 / num_parents:.4g} for "
            f"{num_parents} parents, got {p}"
        )
    return math.log(odds)


def scaled_distance_logits(
    votes: torch.Tensor,
    poses: torch.Tensor,
    target_coupling: float = 0.9,
    distance_ratio: float = 0.5,
    mean_over: str = "sample",
    eps: float = 1e-12,
) -> torch.Tensor:
    """S5-S6: scaled-distance logits ``b_ij = t d_ij`` ``(B, I, J)`` from votes
    ``(B, I, J, D)`` and parent poses ``(B, J, D)``."""
    j = votes.shape[2]
    # d_ij = |v_j - u_hat_ij|: (B, J, D) - (B, I, J, D) -> (B, I, J)
    d = torch.linalg.vector_norm(poses.unsqueeze(1) - votes, dim=-1)
    if j == 1:  # one parent: the softmax is 1 whatever the logits
        return torch.zeros_like(d)
    if mean_over == "sample":
        d_o = d.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    else:
        d_o = d.mean()  # () one mean over the batch, as in the authors' code
    # t d_ij with t = L / (d_p - d_o) = -L / ((1 - rho) d_o)
    scale = -_log_odds(j, target_coupling) / (1.0 - distance_ratio)
    return scale * d / d_o.clamp_min(eps)


def scaled_distance_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None = None,
    iterations: int = 2,
    child_norms: torch.Tensor | None = None,
    target_coupling: float = 0.9,
    distance_ratio: float = 0.5,
    mean_over: str = "sample",
    detach_inner: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S1-S6 (see the module docstring), the functional core of :class:`ScaledDistanceRouting`.

    Args:
        votes: ``(B, I, J, D)``.
        bias: per-parent bias ``(J, D)`` added before the squash, or None.
        iterations: ``r >= 1``.
        child_norms: ``|u_i|`` ``(B, I)``; when given, votes are clipped to them first (S1).
        target_coupling, distance_ratio, mean_over, detach_inner, eps: see
            :class:`ScaledDistanceRouting`.

    Returns:
        ``poses v (B, J, D)`` and ``couplings c (B, I, J)`` (those of the last iteration).
    """
    if child_norms is not None:
        votes = clip_votes(votes, child_norms, eps)  # S1
    b, i, j, _ = votes.shape
    logits = votes.new_zeros(b, i, j)  # b_ij
    inner = votes.detach() if detach_inner else votes
    for it in range(iterations):
        last = it == iterations - 1
        u = votes if last else inner
        c = torch.softmax(logits, dim=2)  # S2, (B, I, J) over parents
        # S3, sum_i c_ij u_hat_ij: (B, I, J) x (B, I, J, D) -> (B, J, D)
        s = torch.einsum("bij,bijd->bjd", c, u)
        if bias is not None:
            s = s + (bias if last or not detach_inner else bias.detach())
        v = squash(s)  # S4, (B, J, D)
        if not last:
            # S5-S6, replaces the previous logits
            logits = scaled_distance_logits(u, v, target_coupling, distance_ratio, mean_over, eps)
    return v, c


@register_routing("scaled_distance")
class ScaledDistanceRouting(Routing):
    """Scaled-distance-agreement routing.

    Args:
        iterations: routing iterations ``r`` (2 in Gugglberger et al.); at least 1.
        num_parents: ``J``; required when ``bias=True``.
        parent_dim: ``D``; required when ``bias=True``.
        target_coupling: ``p`` in S6, the coupling a vote at distance ``d_p`` gets (0.9).
        distance_ratio: ``rho`` in S5, ``d_p = rho d_o`` (0.5); in ``[0, 1)``.
        mean_over: ``"sample"`` (per-example mean distance, default) or ``"batch"``
            (one mean over the batch, as in the authors' code).
        bias: learn a per-parent bias ``(J, D)`` added before the squash (authors' code).
        bias_init: initial bias value (0.1 in the authors' code).
        detach_inner: detach votes in every iteration but the last.
        eps: floor of ``d_o`` and of vote norms in the clip.

    Shape:
        votes ``(B, I, J, D)``, optional child_norms ``(B, I)`` -> :class:`RoutingOutput`
        with poses ``(B, J, D)``, couplings ``(B, I, J)`` summing to one over parents.
    """

    normalized_axis = 2
    reads = frozenset({"child_norms"})

    def __init__(
        self,
        iterations: int = 2,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        target_coupling: float = 0.9,
        distance_ratio: float = 0.5,
        mean_over: str = "sample",
        bias: bool = False,
        bias_init: float = 0.1,
        detach_inner: bool = False,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        if not 0.0 < target_coupling < 1.0:
            raise ValueError(f"target_coupling must lie in (0, 1), got {target_coupling!r}")
        if not 0.0 <= distance_ratio < 1.0:
            raise ValueError(f"distance_ratio must lie in [0, 1), got {distance_ratio!r}")
        if mean_over not in ("sample", "batch"):
            raise ValueError(f"mean_over must be 'sample' or 'batch', got {mean_over!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if num_parents is not None and num_parents > 1:
            _log_odds(num_parents, target_coupling)  # raises if p <= 1/J
        self.iterations = iterations
        self.target_coupling = float(target_coupling)
        self.distance_ratio = float(distance_ratio)
        self.mean_over = mean_over
        self.detach_inner = detach_inner
        self.eps = float(eps)
        self._init_bias(bias, bias_init)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, target_coupling={self.target_coupling}, "
                f"distance_ratio={self.distance_ratio}, mean_over={self.mean_over!r}, "
                f"bias={self.bias is not None}, detach_inner={self.detach_inner}")

    def logits(self, votes: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        """S5-S6: scaled-distance logits ``b_ij = t d_ij`` ``(B, I, J)``."""
        return scaled_distance_logits(votes, poses, self.target_coupling, self.distance_ratio,
                                      self.mean_over, self.eps)

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        """Route; with ``context.child_norms`` ``(B, I)`` (non-negative), votes are first
        clipped to their child's norm (S1)."""
        v, c = scaled_distance_routing(
            votes, self.bias, self.iterations, None if context is None else context.child_norms,
            self.target_coupling, self.distance_ratio, self.mean_over, self.detach_inner, self.eps,
        )
        return RoutingOutput(poses=v, couplings=c)
