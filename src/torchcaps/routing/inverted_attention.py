"""Inverted dot-product attention routing (Tsai, Srivastava, Goh, Salakhutdinov 2020).

"Capsules with inverted dot-product attention routing", ICLR 2020, arXiv 2002.04764;
official code apple/ml-capsules-inverted-attention-routing (``src/layers.py``).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose.

Update equations (paper Procedure 1; Eqs. 1-3 numbered as in the paper, the pose update
and the normalisation are Procedure 1 lines 5-6, numbered 4-5 here), for ``r`` iterations:

    v_ij = W_ij . p_i                        (Eq. 1; made by the capsule layer, not here)
    a_ij = p_j^T v_ij  [* 1/sqrt(D)]         (Eq. 2; agreement, p_j = 0 on iteration 1)
    r_ij = softmax_j(a_ij)                   (Eq. 3; over PARENTS j, for each child i)
    p_j  = sum_i r_ij v_ij                   (4; Procedure 1 line 5, pose update)
    p_j  = LayerNorm(p_j)                    (5; Procedure 1 line 6, replaces the squash)

Shapes:

    =============  ==============  ===========================================
    votes          (B, I, J, D)    v_ij
    poses (in)     (B, J, D)       p_j from a previous iteration (optional)
    agreement      (B, I, J)       a_ij
    couplings      (B, I, J)       r_ij, sums to 1 over J (dim 2)
    poses (out)    (B, J, D)       p_j
    =============  ==============  ===========================================

Checked against the paper (Procedure 1 and Eqs. 1-3, text retrieved with the search tool)
and the official code:

* Iteration 1: "The pose p_j^{L+1} is obtained from the previous iteration of this
  procedure, and will be set to 0 initially", so the first softmax sees all-zero
  agreements and is uniform (``r_ij = 1/J``). The official code does the same with a
  zero ``query_key`` softmaxed over parents. ``iterations`` counts pose computations:
  ``iterations=1`` is one uniform pass, ``iterations=2`` (the paper's CIFAR setting) is
  the uniform pass plus one attention pass.
* Softmax axis: Eq. 3 normalises over parents ``j'`` for each child ``i`` ("higher-level
  capsules compete for attention of lower-level capsules"); the official code uses
  ``softmax(dim=parents)`` too.
* Scaling: Eq. 2 of the paper is the plain dot product, **without** ``1/sqrt(D)``. The
  official code multiplies the agreement by ``1 / sqrt(out_d_capsules)`` (``self.scale``)
  before the softmax, as in Transformer attention. ``scale=True`` (default) follows the
  official code that produced the reported numbers; ``scale=False`` is Eq. 2 as printed.
* LayerNorm is over the pose dimension (``nn.LayerNorm(out_d_capsules)``; for 4x4 matrix
  poses over the 16 flattened entries), with a learnable gain and bias: it needs
  ``parent_dim``. Without ``parent_dim`` (or with ``affine=False``) a parameter-free
  LayerNorm is used so that ``create_routing("inverted_attention")(votes)`` still works.
* The official code re-normalises the softmax output by ``sum + 1e-10`` (a no-op up to
  rounding, omitted) and skips the LayerNorm when the pose dimension is 1 (we do too).

Concurrent routing (paper Sec. 2.2, Fig. 3) updates every layer once per iteration from
the current poses of the layer below; it lives in the model
(:class:`torchcaps.models.inverted_attention.InvertedCapsStack`), which calls
:meth:`InvertedAttentionRouting.step` once per layer per iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_iterations
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["InvertedAttentionRouting", "inverted_attention_routing", "inverted_attention_step"]


def _layer_norm(
    s: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(5): LayerNorm over the pose axis (skipped for ``D == 1``, as in the official code)."""
    if s.shape[-1] == 1:
        return s
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps)


def inverted_attention_step(
    votes: torch.Tensor,
    poses: torch.Tensor | None = None,
    scale: bool = True,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of Procedure 1: new parent poses from votes and current parent poses.

    Args:
        votes: ``(B, I, J, D)``.
        poses: current parent poses ``(B, J, D)``; None means ``p_j = 0``, i.e. uniform
            couplings ``1/J`` (the first iteration).
        scale: multiply the agreement by ``1/sqrt(D)``.
        norm_weight, norm_bias: LayerNorm gain and bias ``(D,)``, or None.
        eps: LayerNorm epsilon.

    Returns:
        ``(poses (B, J, D), couplings (B, I, J))``.
    """
    b, i, j, d = votes.shape
    if poses is None:
        # a_ij = 0 -> softmax over parents is uniform
        c = votes.new_full((b, i, j), 1.0 / j)  # (B, I, J)
    else:
        # Eq. 2, a_ij = p_j . v_ij: (B, I, J, D) x (B, J, D) -> (B, I, J)
        a = torch.einsum("bijd,bjd->bij", votes, poses)
        if scale:
            a = a * (1.0 / math.sqrt(d))
        c = torch.softmax(a, dim=2)  # Eq. 3, over parents
    # (4), sum_i r_ij v_ij: (B, I, J) x (B, I, J, D) -> (B, J, D)
    s = torch.einsum("bij,bijd->bjd", c, votes)
    return _layer_norm(s, norm_weight, norm_bias, eps), c


def inverted_attention_routing(
    votes: torch.Tensor,
    iterations: int = 2,
    poses: torch.Tensor | None = None,
    scale: bool = True,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` steps of :func:`inverted_attention_step` from ``poses`` (None: ``0``),
    the functional core of :class:`InvertedAttentionRouting`; returns the last
    ``(poses (B, J, D), couplings (B, I, J))``."""
    check_iterations(iterations)
    p = poses
    for _ in range(iterations):
        p, c = inverted_attention_step(votes, p, scale, norm_weight, norm_bias, eps)
    return p, c



@register_routing("inverted_attention")
class InvertedAttentionRouting(Routing):
    """Inverted dot-product attention routing with LayerNorm.

    Args:
        iterations: pose computations ``r``; iteration 1 is uniform routing (2 in the paper).
        num_parents: ``J`` (optional; checked against the votes when given).
        parent_dim: ``D``; gives the LayerNorm a learnable gain and bias of size ``D``.
        scale: multiply the agreement by ``1/sqrt(D)`` (official code); False is Eq. 2.
        affine: learnable LayerNorm gain/bias (needs ``parent_dim``); False for a
            parameter-free LayerNorm.
        eps: LayerNorm epsilon (PyTorch's default 1e-5, as in the official code).

    Call as ``routing(votes)``, or ``routing(votes, poses=p)`` (``RoutingContext(poses=p)``)
    to start from parent poses ``p`` instead of ``0``.

    Shape:
        votes ``(B, I, J, D)``, optional initial parent poses ``(B, J, D)`` ->
        :class:`RoutingOutput` with poses ``(B, J, D)``, couplings ``(B, I, J)`` summing
        to one over parents, activations None.
    """

    normalized_axis = 2
    reads = frozenset({"poses"})

    def __init__(
        self,
        iterations: int = 2,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        scale: bool = True,
        affine: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        if parent_dim is not None and (not isinstance(parent_dim, int) or parent_dim < 1):
            raise ValueError(f"parent_dim must be a positive integer or None, got {parent_dim!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.iterations = iterations
        self.scale = bool(scale)
        self.eps = float(eps)
        if affine and parent_dim is not None:
            self.norm = nn.LayerNorm(parent_dim, eps=eps)
        else:
            self.norm = None

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, scale={self.scale}, "
                f"affine={self.norm is not None}")

    def _norm_params(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.norm is None else (self.norm.weight, self.norm.bias)

    def layer_norm(self, s: torch.Tensor) -> torch.Tensor:
        """(5): LayerNorm over the pose axis (skipped for ``D == 1``, as in the official code)."""
        return _layer_norm(s, *self._norm_params(), self.eps)

    def step(
        self, votes: torch.Tensor, poses: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration of Procedure 1 (:func:`inverted_attention_step`) with this module's
        options; concurrent routing calls it once per layer and iteration.

        Args:
            votes: ``(B, I, J, D)``, already validated by the caller.
            poses: current parent poses ``(B, J, D)``; None means ``p_j = 0``, i.e.
                uniform couplings ``1/J`` (the first iteration).

        Returns:
            ``(poses (B, J, D), couplings (B, I, J))``.
        """
        return inverted_attention_step(votes, poses, self.scale, *self._norm_params(), self.eps)

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        """Route; ``context.poses`` ``(B, J, D)``, when given, replaces the start ``p_j = 0``
        (to continue routing, e.g. by concurrent routing)."""
        p, c = inverted_attention_routing(
            votes, self.iterations, None if context is None else context.poses, self.scale,
            *self._norm_params(), self.eps,
        )
        return RoutingOutput(poses=p, couplings=c)
