"""Non-iterative cluster routing (Zhao & Cheng 2021, "Capsule networks with non-iterative
cluster routing", Neural Networks 143, 690-697; arXiv 2109.09213; official code
github.com/ZHAOZHIHAO/ClusterRouting).

Letter legend: ``b`` batch, ``i`` children, ``j`` parents, ``k`` votes in one cluster,
``d`` pose element.

Instead of one vote per (child, parent) pair, child ``i`` casts a *cluster* of ``K``
votes ``v_ijk`` for parent ``j``. The cluster sends its centroid; centroids from tight
clusters (small spread) get large weights. No iterations, no squash:

    mu_ijd     = 1/K sum_k v_ijkd                           (CR1: cluster centroid)
    sigma_ijd  = sqrt(1/K sum_k (v_ijkd - mu_ijd)^2)         (CR2: population std, per element)
    w_ijd      = softmax_i(-log sigma_ijd)                  (CR3: over CHILDREN i)
               = (1 / sigma_ijd) / sum_i' (1 / sigma_i'jd)
    s_jd       = sum_i w_ijd mu_ijd                          (CR4: parent pose)

CR1-CR4 are this module's labels, not the paper's equation numbers: the paper's body
was not reachable from here (only its abstract, which states the rule in words:
"each vote cluster sends its centroid ... the centroid that comes from a cluster with a
smaller variance is assigned a larger weight"). The exact form was checked against the
official code (``CapsLayerWithClusterRouting.cluster_routing`` in
``src/capsule_network.py``):

* ``sigma`` is the population std (``torch.std_mean(..., unbiased=False)``) over the
  ``K`` votes of a cluster, computed **per pose element** ``d`` (and, in the
  convolutional layer, per position): the confidence ``-log sigma`` is *not* summed or
  averaged over the capsule's ``D`` elements, so each element of a parent has its own
  weights over children.
* The softmax runs over the children (``dim=1`` of the stacked centroids ``(B, C_in, D,
  H, W)``): for each parent element the weights sum to one over children, so
  ``normalized_axis = 1``.
* No epsilon in the official code: ``-log(std)`` is ``+inf`` (and the softmax NaN) as
  soon as all ``K`` votes of a cluster coincide. Here the log-std is computed as
  ``-0.5 log(var + eps)`` with ``eps = 1e-8`` by default, which keeps values and
  gradients finite at ``var = 0`` (``d/dvar`` is ``1/(var + eps)``; the form
  ``-log(sqrt(var) + eps)`` would still have an infinite ``d sqrt/dvar`` at 0).
  ``eps = 0`` reproduces the official formula exactly (then identical votes give NaN).
* The LayerNorm that follows in the paper's network belongs to the layer
  (:class:`torchcaps.layers.cluster.ClusterConvCaps`), not to the routing.

Generic-interface mapping. ``Routing`` votes are ``(B, I, J, D)``; here every (i, j) pair
needs ``K`` votes, so :class:`ClusterRouting` accepts either

* 5-D votes ``(B, I, J, K, D)``, or
* 4-D votes ``(B, I, J, K*D)``, the cluster flattened vote-major
  (``votes[b, i, j, k*D + d]`` is element ``d`` of vote ``k``); ``K`` comes from
  ``cluster_size`` or, failing that, from ``parent_dim`` (``K = last / parent_dim``).

Shapes:

    =============  =================  ==============================================
    votes          (B, I, J, K, D)    v_ijk (or (B, I, J, K*D), vote-major)
    centroids      (B, I, J, D)       mu_ij
    weights        (B, I, J, D)       w_ijd, sum to 1 over I (dim 1), per element
    couplings      (B, I, J)          mean_d w_ijd, sums to 1 over I (dim 1)
    poses          (B, J, D)          s_j (no squash)
    =============  =================  ==============================================

The per-element weights are what the algorithm uses; :class:`RoutingOutput` holds one
number per (i, j), so ``couplings`` is their mean over ``d`` (still normalised over
children). :func:`cluster_route` returns the per-element weights.
"""

from __future__ import annotations

import torch

from .._validate import check_dtype_matches, check_tensor
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["ClusterRouting", "cluster_route", "cluster_statistics", "combine_clusters",
           "CHUNK_BYTES"]

#: bytes of centred votes formed at a time when computing the cluster variances
CHUNK_BYTES = 4 * 2**20


def cluster_route(
    votes: torch.Tensor, child_dim: int = 1, cluster_dim: int = 3, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster routing on any layout (CR1-CR4): statistics over ``cluster_dim``, softmax
    and weighted sum over ``child_dim``; every other axis is element-wise.

    Args:
        votes: vote clusters, e.g. ``(B, I, J, K, D)`` (the defaults) or the
            convolutional layout ``(B, I, K, J, D, H, W)`` (``cluster_dim=2``).
        child_dim: axis of the children ``i`` (non-negative).
        cluster_dim: axis of the ``K`` votes of a cluster (non-negative, not ``child_dim``).
        eps: added to the variance inside the log; ``0`` is the official formula.

    Returns:
        ``(poses, weights)``: ``poses`` has both ``child_dim`` and ``cluster_dim`` removed,
        ``weights`` has ``cluster_dim`` removed and sums to one over the children.

    Shape:
        ``(B, I, J, K, D)`` -> poses ``(B, J, D)``, weights ``(B, I, J, D)`` with the defaults.
    """
    if not (0 <= child_dim < votes.dim() and 0 <= cluster_dim < votes.dim()):
        raise ValueError(
            f"child_dim and cluster_dim must be non-negative axes of a {votes.dim()}-D tensor, "
            f"got {child_dim} and {cluster_dim}"
        )
    if child_dim == cluster_dim:
        raise ValueError("child_dim and cluster_dim must differ")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mu, var = cluster_statistics(votes, cluster_dim)  # CR1, CR2: (B, I, J, D) each
    i_dim = child_dim if child_dim < cluster_dim else child_dim - 1
    return combine_clusters(mu, var, i_dim, eps)


def cluster_statistics(votes: torch.Tensor, cluster_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CR1, CR2: centroid ``mu`` and population variance of the clusters along ``cluster_dim``
    (removed from both). Backward keeps only the votes (see :class:`_ClusterStats`)."""
    return _ClusterStats.apply(votes, cluster_dim)


def combine_clusters(
    mu: torch.Tensor, var: torch.Tensor, child_dim: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """CR3, CR4 from the cluster statistics: ``(poses, weights)``, the weights a softmax of
    ``-log sigma`` over ``child_dim`` and the poses their weighted sum of centroids."""
    logits = -0.5 * torch.log(var + eps)  # -log sigma_ijd
    weights = torch.softmax(logits, dim=child_dim)  # CR3: over children, per element
    # CR4: element-wise weighted sum over children; (B, I, J, D) -> (B, J, D). An einsum
    # would only turn this into B*J*D dot products of length I: nothing to save.
    poses = (weights * mu).sum(dim=child_dim)
    return poses, weights


def _cluster_stats(votes: torch.Tensor, k_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over ``k_dim``, two-pass (centred) for accuracy.

    ``torch.var_mean`` over a non-innermost axis falls back to a slow strided kernel on CPU
    (97% of cluster_capsnet's inference time); a mean and a mean of squares are vectorised
    reductions. The centred votes are formed :data:`CHUNK_BYTES` at a time along the first
    axis (each sample's statistics are its own), never for the whole batch.
    """
    mu = votes.mean(dim=k_dim)
    if k_dim == 0 or votes.shape[0] < 2:
        return mu, (votes - mu.unsqueeze(k_dim)).square_().mean(dim=k_dim)
    # centre a few samples at a time: the temporary stays small (and in cache)
    var = torch.empty_like(mu)
    rows = max(1, CHUNK_BYTES // max(votes[0].numel() * votes.element_size(), 1))
    for start in range(0, votes.shape[0], rows):
        part = slice(start, start + rows)
        centred = votes[part] - mu[part].unsqueeze(k_dim)
        torch.mean(centred.square_(), dim=k_dim, out=var[part])
    return mu, var


class _ClusterStats(torch.autograd.Function):
    """``(mu, var)`` of the vote clusters, saving only the votes for backward.

    Under plain autograd the centred votes, their square and four vote-sized gradient
    temporaries are all alive in backward; here the gradient is formed in one buffer:

        d mu / d v_k  = 1 / K
        d var / d v_k = 2 (v_k - mu) / K      (the mean's own term sums to zero)
        dL/dv_k       = (dL/dmu + 2 dL/dvar (v_k - mu)) / K
    """

    @staticmethod
    def forward(ctx, votes: torch.Tensor, k_dim: int):
        mu, var = _cluster_stats(votes, k_dim)
        ctx.save_for_backward(votes, mu)
        ctx.k_dim = k_dim
        return mu, var

    @staticmethod
    def backward(ctx, grad_mu, grad_var):
        votes, mu = ctx.saved_tensors
        k = ctx.k_dim
        n = votes.shape[k]
        if grad_var is None:
            grad = (grad_mu / n).unsqueeze(k).expand_as(votes).contiguous()
            return grad, None
        grad = votes - mu.unsqueeze(k)  # the only vote-sized buffer, then scaled in place
        grad.mul_((grad_var * (2.0 / n)).unsqueeze(k))
        if grad_mu is not None:
            grad.add_((grad_mu / n).unsqueeze(k))
        return grad, None


@register_routing("cluster")
class ClusterRouting(Routing):
    """Non-iterative cluster routing for fully-connected votes.

    Args:
        cluster_size: ``K``, votes per (child, parent) cluster, at least 2 (a single vote
            has zero spread). Optional: 5-D votes carry ``K`` in their shape, and 4-D
            votes can get it from ``parent_dim``.
        num_parents: ``J``, checked against the votes when given.
        parent_dim: ``D``, checked against the votes when given.
        eps: added to the cluster variance before the log (see the module docstring);
            ``0`` is the official code's formula.

    Shape:
        votes ``(B, I, J, K, D)`` or ``(B, I, J, K*D)`` -> poses ``(B, J, D)``,
        couplings ``(B, I, J)`` summing to one over children, activations ``None``.
    """

    normalized_axis = 1

    def __init__(
        self,
        cluster_size: int | None = None,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        if cluster_size is not None and (
            not isinstance(cluster_size, int) or isinstance(cluster_size, bool) or cluster_size < 2
        ):
            raise ValueError(f"cluster_size must be an integer >= 2, got {cluster_size!r}")
        if not eps >= 0:  # also rejects NaN
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.cluster_size = cluster_size
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"cluster_size={self.cluster_size}, eps={self.eps}"

    @property
    def votes_per_pair(self) -> int | None:
        """``K``: a layer makes ``K`` votes of ``D`` values per (child, parent) pair
        (``None`` until ``cluster_size`` is given)."""
        return self.cluster_size

    def check_votes(self, votes: torch.Tensor, shape=None) -> torch.Tensor:
        """Validate and view the votes as ``(B, I, J, K, D)``."""
        check_tensor(votes, "votes", None, finite=False)  # type first; shape below
        j, d, k = self.num_parents, self.parent_dim, self.cluster_size
        if votes.dim() == 5:
            check_tensor(votes, "votes", ("B", "I", j, k, d), finite=False)
        else:
            flat = k * d if (k is not None and d is not None) else None
            check_tensor(votes, "votes", ("B", "I", j, flat), finite=False)
            last = votes.shape[-1]
            if k is None and d is None:
                raise ValueError(
                    "4-D cluster votes (B, I, J, K*D) need cluster_size or parent_dim to "
                    "split the last axis; pass one, or give votes as (B, I, J, K, D)"
                )
            if k is None:
                if last % d:
                    raise ValueError(f"votes' last axis {last} is not a multiple of parent_dim {d}")
                k = last // d
            elif last % k:
                raise ValueError(f"votes' last axis {last} is not a multiple of cluster_size {k}")
            votes = votes.unflatten(-1, (k, last // k))  # (B, I, J, K, D), vote-major
        check_dtype_matches(votes, "votes", self)
        if votes.shape[3] < 2:
            raise ValueError(f"a vote cluster needs at least 2 votes, got K={votes.shape[3]}")
        return votes

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        """Route ``(B, I, J, K, D)`` vote clusters (already validated by :meth:`forward`)."""
        poses, weights = cluster_route(votes, child_dim=1, cluster_dim=3, eps=self.eps)
        couplings = weights.mean(dim=-1)  # (B, I, J), still sums to 1 over I
        return RoutingOutput(poses=poses, couplings=couplings)
