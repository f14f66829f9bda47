"""EM routing between matrix capsules (Hinton, Sabour, Frosst 2018, "Matrix capsules with EM
routing", ICLR 2018, openreview.net/forum?id=HJWLfGWRb; no arXiv version).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``h``/``d`` pose
element (``D = 16`` for a flattened 4x4 pose matrix; the algorithm works for any ``D``).

Each parent ``j`` is a Gaussian with an axis-aligned covariance over the ``D`` pose elements;
each child ``i`` is a data point (its vote ``V_ij``) weighted by its activation ``a_i``.
Procedure 1 of the paper, ``t`` iterations starting from ``R_ij = 1 / J``:

    M-step, for each parent j:
        R_ij    <- R_ij * a_i                                      (M-step line 2)
        mu_j^h  <- sum_i R_ij V_ij^h / sum_i R_ij                  (line 3)
        (sigma_j^h)^2 <- sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij  (line 4)
        cost^h  <- (beta_u + log sigma_j^h) sum_i R_ij              (line 5)
        a_j     <- logistic(lambda (beta_a - sum_h cost^h))         (line 6; cf. Eq. 2)
    E-step, for each child i:
        p_ij    <- prod_h N(V_ij^h; mu_j^h, (sigma_j^h)^2)          (E-step line 2)
        R_ij    <- a_j p_ij / sum_k a_k p_ik                        (line 3; over PARENTS)

The E-step is computed in log space: ``log R_ij = log a_j + log p_ij - logsumexp_k(...)``
with ``log a_j = logsigmoid(.)``, so vanishing densities never underflow to 0/0. The
divisions use ``max(sum_i R_ij, eps)`` and every variance gets ``+ eps`` (a parent whose votes
coincide, e.g. one with a single child, would otherwise have ``log sigma = -inf``).

Implementation. The votes are copied once into a parent-major buffer ``VV = [V - c, (V - c)^2]``
``(..., J, I, 2D)``, centred on their plain mean ``c`` per parent (an exact shift of ``mu``
that keeps ``E_R[V^2] - mu^2`` accurate when the votes share a large offset). Every use of the
votes is then one batched mat-vec product with ``VV``: the M-step reads ``sum_i R_ij VV_ij``
(``mu`` and ``E_R[V^2]``, so ``sigma^2 = E_R[V^2] - mu^2``), the E-step reads
``sum_h VV_ij^h w_j^h`` (``sum_h (V - mu)^2 / (2 sigma^2)`` expanded), and no
``(..., J, I, D)`` temporary such as ``(V - mu)^2`` is formed. For training, the gradient of
the votes would be one ``(..., J, I, 2D)`` outer product per read under plain autograd; a
custom autograd function (:class:`~torchcaps.routing._factored.FactoredRouting`) instead
records the rank-one factors and
forms the gradient with two batched matrix products of inner size ``2T - 1`` (single backward
only; plain autograd is used under ``torch.compile``).

Shapes:

    =============  ==============  ===========================================
    votes          (B, I, J, D)    V_ij (flattened 4x4 matrices M_i W_ij)
    activations    (B, I)          a_i of the children (default: all ones)
    couplings      (B, I, J)       R_ij used by the last M-step (uniform 1/J when
                                   iterations=1), sums to 1 over J (dim 2)
    poses          (B, J, D)       mu_j
    activations    (B, J)          a_j of the parents (returned)
    beta_u, beta_a (J,)            learned, one pair per parent
    =============  ==============  ===========================================

Checked against the paper text (Sec. 2, Sec. 3 with Eqs. 1-2 and Procedure 1, Sec. 4, Eq. 3):

* The update equations above are Procedure 1 verbatim, including ``beta_u`` inside the
  per-element cost (Eq. 2 of the text writes ``beta_u sum_i r_ij`` once instead of once per
  ``h``; with a learned ``beta_u`` the two differ only by a factor ``H`` in its scale). The
  constant ``(1 + ln 2 pi) / 2`` of Eq. 1 is dropped, as in Procedure 1.
* Couplings are normalised over parents (E-step line 3) and initialised to ``1 / J``.
* "two learned biases per capsule" (Sec. 2): ``beta_u``, ``beta_a`` are one pair per parent
  (per parent *type* in a convolutional layer, shared across positions). Eq. 2's remark that
  ``beta_a`` "is the same for all capsules" contradicts this; we follow Sec. 2.
* **Inverse temperature schedule.** The paper only says "lambda increases at each iteration
  with a fixed schedule" and is "a hyper-parameter"; the values are not given. In the
  OpenReview discussion the authors gave the formula
  ``lambda_t = final_lambda * (1 - 0.95 ** (t + 1))`` for iteration ``t = 0, 1, 2`` with
  ``final_lambda = 0.01`` (quoted in the comments of IBM/matrix-capsules-with-em-routing,
  ``em_routing.py``, by the author of Gritzman 2019, arXiv 1907.00652). That is our default
  ``schedule="openreview"`` with ``inverse_temperature=0.01`` (so lambda = 5.0e-4, 9.75e-4,
  1.43e-3 for three iterations). ``"linear"`` (``lambda_t = inverse_temperature (t+1)/T``),
  ``"constant"`` or an explicit sequence of ``T`` values can be chosen instead. We could not
  open the OpenReview thread itself, but the authors' later open-source release
  (google-research/google-research, ``capsule_em/em_layers.py`` and ``experiment.py``, read
  with the search tool) uses the same formula, ``beta = final_beta (1 - 0.95^(i+1))``, with
  the flag default ``final_beta = 0.01`` (divided by 4 in the class layer), 3 routing
  iterations, and Adam at learning rate 0.01 decayed x0.96 per 20,000 steps, batch 64. That
  release's activation cost is not Procedure 1 verbatim: it reads ``masses * (-sum_h log
  var^h - beta_u D (1 + ln 2 pi)) - 5000 beta_a`` (log variance rather than log sigma, a
  5000-fold activation bias) and damps the mean update (``0.9 new + 0.1 old``); we keep
  Procedure 1.
* **Activation bias scale** (``beta_a_scale``, default 1 = Procedure 1). With lambda near
  0.01, a parent that receives (almost) no votes has ``sum_i R_ij ~ 0``, so its cost is ~0 and
  its activation is ``logistic(lambda beta_a)``: to push it towards 0, ``beta_a`` must reach
  about ``-2 / lambda``, some ``-2000``, which Adam moves toward at most ``lr`` per step.
  Measured on the em_capsnet MNIST run of ``benchmarks/zoo.py`` (2 iterations, so lambda =
  9.75e-4 in the last M-step; Adam 3e-3, 9,460 steps, 98.88% test): the class layer's
  ``beta_a`` had only reached -24.6, and on 1,000 validation images the target class had
  activation 0.9996 (median) while the strongest wrong class sat at 0.497-0.627 (5th-95th
  percentile), so no wrong class can ever be 0.9 below the target: the spread loss (margin
  0.9) stays near its floor of ``9 * 0.4^2 = 1.44`` (training loss 1.47) and its gradient
  on the saturated activations is small. The authors' release writes the bias as
  ``5000 * beta_a`` (above), i.e. it learns ``beta_a`` 5000 times faster under Adam; set
  ``beta_a_scale=5000`` for that (the learned parameter is then 1/5000 of the effective
  bias). Measured: continuing that run from step 9,460 with the checkpoint rescaled to
  ``beta_a_scale=50000`` (same function; ``benchmarks/rescale_em_checkpoint.py`` also rescales
  Adam's moments; 50000 because the continued rate was 3e-4, a tenth of 3e-3) dropped the
  training loss from 1.48 to 0.21 within one epoch and raised validation accuracy from 98.54%
  to 98.62%, 98.72% and 98.74% in three epochs (test 98.92%, 98.95%, 99.03%).

:func:`em_routing` is the functional core, :class:`EMRouting` the module (holding ``beta_u``,
``beta_a`` and the schedule). The core accepts any leading batch shape and an optional
normaliser; :class:`~torchcaps.layers.matrix.ConvMatCaps` passes one in
``RoutingContext(normalize=...)`` to normalise each child over every parent it reaches
across overlapping windows (Gritzman 2019, pitfall 3).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import check_iterations
from ._factored import FactoredRouting, Votes
from .base import ActivationRouting, Normalizer, RoutingContext, RoutingOutput, register_routing

__all__ = ["EMRouting", "em_routing", "lambda_schedule"]

_LOG_2PI = math.log(2.0 * math.pi)

SCHEDULES = ("openreview", "linear", "constant")


def lambda_schedule(
    iterations: int,
    inverse_temperature: float = 0.01,
    schedule: str | Sequence[float] = "openreview",
) -> list[float]:
    """The inverse temperatures ``lambda_t`` for ``t = 0 .. iterations - 1``.

    Args:
        iterations: number of EM iterations ``T``.
        inverse_temperature: the scale of the schedule (``final_lambda`` of the OpenReview
            formula; the value reached at the last iteration for ``"linear"``/``"constant"``).
        schedule: ``"openreview"`` (``s (1 - 0.95^(t+1))``), ``"linear"`` (``s (t+1) / T``),
            ``"constant"`` (``s``), or an explicit sequence of ``T`` positive values.
    """
    if not isinstance(schedule, str):
        values = [float(v) for v in schedule]
        if len(values) != iterations:
            raise ValueError(
                f"schedule has {len(values)} values but iterations is {iterations}"
            )
        if any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"schedule values must be positive and finite, got {values}")
        return values
    if not (inverse_temperature > 0 and math.isfinite(inverse_temperature)):
        raise ValueError(f"inverse_temperature must be positive, got {inverse_temperature!r}")
    if schedule == "openreview":
        return [inverse_temperature * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]
    if schedule == "linear":
        return [inverse_temperature * (t + 1) / iterations for t in range(iterations)]
    if schedule == "constant":
        return [float(inverse_temperature)] * iterations
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES} or pass a sequence")


def _m_step(
    votes: Votes,
    couplings: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    inverse_temperature: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step of Procedure 1 for every parent at once, on parent-major (centred) votes.

    Args:
        votes: the stacked centred votes ``[V, V^2]`` ``(..., J, I, 2D)`` (see :func:`em_routing`).
        couplings: ``R_ij`` ``(..., I, J)``.
        activations: child activations ``a_i`` ``(..., I)``.
        beta_u, beta_a: ``(J,)``.

    Returns:
        ``mu (..., J, D)``, ``var (..., J, D)`` and the activation logit
        ``lambda (beta_a - sum_h cost^h)`` ``(..., J)`` (``a_j`` is its sigmoid).
    """
    r = (couplings * activations.unsqueeze(-1)).transpose(-1, -2)  # R_ij a_i: (..., J, I)
    r_sum = r.sum(dim=-1)  # sum_i R_ij: (..., J)
    # clamped rather than shifted by eps, so mu and sigma stay exactly shift-invariant
    denom = r_sum.clamp_min(eps).unsqueeze(-1)  # (..., J, 1)
    # [sum_i R_ij V_ij, sum_i R_ij V_ij^2] / sum_i R_ij: (..., J, 2D)
    moments = votes.weighted(r) / denom
    mu, second = moments.chunk(2, dim=-1)  # (..., J, D) each
    # (sigma_j^h)^2 = E_R[V^2] - mu^2 (>= 0 up to rounding; votes are centred, so no
    # catastrophic cancellation from a large common offset)
    var = torch.clamp(second - mu * mu, min=0.0) + eps
    # cost^h = (beta_u + log sigma^h) sum_i R_ij, summed over h: (..., J)
    cost = ((beta_u.unsqueeze(-1) + 0.5 * torch.log(var)) * r_sum.unsqueeze(-1)).sum(dim=-1)
    logit = inverse_temperature * (beta_a - cost)  # (..., J)
    return mu, var, logit


def _log_likelihood(votes: Votes, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log p_ij = sum_h log N(V_ij^h; mu_j^h, var_j^h)`` as ``(..., I, J)``.

    ``sum_h (V - mu)^2 / (2 var)`` is expanded as ``V . (-mu/var) + V^2 . 1/(2var) +
    mu^2 . 1/(2var)``, so the big ``(..., J, I, 2D)`` tensor is only read by one batched
    mat-vec product.
    """
    inv = 0.5 / var  # (..., J, D)
    w = torch.cat([-2.0 * mu * inv, inv], dim=-1)  # weights of [V, V^2]: (..., J, 2D)
    quad = votes.project(w)  # (..., J, I)
    const = (mu * mu * inv).sum(-1) + 0.5 * (torch.log(var) + _LOG_2PI).sum(dim=-1)  # (..., J)
    return -(quad + const.unsqueeze(-1)).transpose(-1, -2)  # (..., I, J)


def _softmax_parents(log_r: torch.Tensor) -> torch.Tensor:
    return torch.softmax(log_r, dim=-1)  # over parents j


def _centre_and_stack(votes_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred votes and their squares side by side, and the centre.

    Args:
        votes_t: parent-major votes ``(..., J, I, D)``, any strides (a permuted view of a vote
            product is read once, by the copy into ``VV``).

    Returns:
        ``VV = [V - c, (V - c)^2]`` ``(..., J, I, 2D)`` (contiguous) and ``c`` = the plain mean
        of each parent's votes, ``(..., J, 1, D)``. Centring is an exact shift of ``mu`` (and
        leaves ``sigma``, ``p`` and ``R`` unchanged); it keeps ``E[V^2] - mu^2`` accurate when
        the votes share a large offset.
    """
    if torch.is_grad_enabled() and votes_t.requires_grad:  # plain autograd (torch.compile)
        offset = votes_t.mean(dim=-2, keepdim=True)  # (..., J, 1, D)
        centred = votes_t - offset  # (..., J, I, D)
        return torch.cat([centred, centred * centred], dim=-1), offset
    d = votes_t.shape[-1]
    vv = votes_t.new_empty(*votes_t.shape[:-1], 2 * d)  # (..., J, I, 2D), written in place
    v = vv[..., :d]
    v.copy_(votes_t)  # the votes, read once in any layout
    offset = v.mean(dim=-2, keepdim=True)  # (..., J, 1, D)
    v.sub_(offset)
    torch.mul(v, v, out=vv[..., d:])
    return vv, offset


def _em_iterations(
    votes: Votes,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambdas: Sequence[float],
    eps: float,
    norm: Normalizer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1 on centred votes: centred ``mu (..., J, D)``, ``R (..., I, J)``, logit."""
    *lead, j_n, i_n, _ = votes.vv.shape
    r = norm(votes.vv.new_zeros(*lead, i_n, j_n))  # R_ij = 1 / (number of parents): (..., I, J)
    for t, lam in enumerate(lambdas):
        mu, var, logit = _m_step(votes, r, activations, beta_u, beta_a, lam, eps)
        if t < len(lambdas) - 1:
            # E-step in log space: log a_j + log p_ij, normalised over the parents of i
            log_r = F.logsigmoid(logit).unsqueeze(-2) + _log_likelihood(votes, mu, var)
            r = norm(log_r)  # (..., I, J)
    return mu, r, logit


def em_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambdas: Sequence[float],
    eps: float = 1e-6,
    normalize: Normalizer | None = None,
    parent_major: bool = False,
    logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Procedure 1 for ``len(lambdas)`` iterations.

    Args:
        votes: ``(..., I, J, D)``, or ``(..., J, I, D)`` with ``parent_major=True``.
        activations: ``(..., I)`` child activations.
        beta_u, beta_a: ``(J,)``.
        lambdas: inverse temperature per iteration (see :func:`lambda_schedule`).
        eps: lower bound of ``sum_i R_ij`` in the divisions; added to the variances.
        normalize: maps unnormalised log couplings ``log a_j + log p_ij`` ``(..., I, J)`` to
            couplings; default: softmax over parents ``J`` (the last axis). It also sets the
            initial couplings, as ``normalize(zeros)`` (``1 / J`` for the default).
        parent_major: the votes are laid out ``(..., J, I, D)`` (any strides, e.g. a permuted
            view: they are copied once into the internal layout).
        logits: return the activation logits ``lambda (beta_a - sum_h cost^h)`` instead of
            ``a_j`` (for a model that normalises them before its own sigmoid).

    Returns:
        ``poses mu (..., J, D)``, ``couplings R (..., I, J)`` (those of the last M-step) and
        parent ``activations a_j (..., J)`` (or their logits).

    The argument order ``(votes, activations, beta_u, beta_a, ...)`` is that of
    :func:`~torchcaps.routing.vb.vb_routing`.

    When gradients are needed (and not under ``torch.compile``) the votes' gradient is
    assembled by :class:`~torchcaps.routing._factored.FactoredRouting` (one backward only);
    otherwise plain autograd is used.
    """
    norm = normalize or _softmax_parents
    votes_t = votes if parent_major else votes.transpose(-3, -2)  # (..., J, I, D)
    lambdas = tuple(float(v) for v in lambdas)
    inputs = (votes_t, activations, beta_u, beta_a)
    if (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
            and not torch.compiler.is_compiling()):
        iterate = functools.partial(_em_iterations, lambdas=lambdas, eps=eps, norm=norm)
        mu, r, logit, offset = FactoredRouting.apply(votes_t, _centre_and_stack, iterate,
                                                     activations, beta_u, beta_a)
        mu = mu + offset.squeeze(-2)
    else:
        vv, offset = _centre_and_stack(votes_t)
        mu, r, logit = _em_iterations(Votes(vv), activations, beta_u, beta_a, lambdas, eps, norm)
        mu = mu + offset.squeeze(-2)
    return mu, r, (logit if logits else torch.sigmoid(logit))


@register_routing("em")
class EMRouting(ActivationRouting):
    """EM routing (Procedure 1 of Hinton et al. 2018) with learned ``beta_u``, ``beta_a``.

    Call as ``routing(votes)``, ``routing(votes, activations)`` or ``routing(votes,
    activations, RoutingContext(normalize=...))``; child activations default to ones (every
    child fully present); ``context.normalize`` replaces the softmax over parents of the
    E-step (and sets the initial couplings), see :func:`em_routing`.

    Args:
        iterations: EM iterations ``T`` (3 in the paper); at least 1.
        num_parents: ``J``; required (the betas are per parent).
        parent_dim: ``D`` (16 for 4x4 matrices) or ``None`` to accept any.
        inverse_temperature: scale of the lambda schedule (0.01, see the module docstring).
        schedule: ``"openreview"``, ``"linear"``, ``"constant"`` or ``T`` explicit values.
        eps: added to variances; lower bound of ``sum_i R_ij`` in divisions.
        beta_a_scale: ``beta_a`` enters the activation logit as ``beta_a_scale * beta_a``
            (1: Procedure 1; the authors' release uses 5000, see "Activation bias scale" in
            the module docstring). The learned parameter stays ``beta_a``.
        logits: return the pre-sigmoid activation logits as ``activations``.

    Shape:
        votes ``(B, I, J, D)``, activations ``(B, I)`` -> :class:`RoutingOutput` with poses
        ``(B, J, D)``, couplings ``(B, I, J)`` summing to 1 over ``J`` and activations ``(B, J)``.
    """

    normalized_axis = 2
    reads = frozenset({"normalize"})

    def __init__(
        self,
        iterations: int = 3,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        inverse_temperature: float = 0.01,
        schedule: str | Sequence[float] = "openreview",
        eps: float = 1e-6,
        beta_a_scale: float = 1.0,
        logits: bool = False,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        if not isinstance(num_parents, int) or num_parents < 1:
            raise ValueError(
                f"EMRouting needs num_parents (a positive integer) for its per-parent "
                f"beta_u and beta_a, got {num_parents!r}"
            )
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if not (beta_a_scale > 0 and math.isfinite(beta_a_scale)):
            raise ValueError(f"beta_a_scale must be positive and finite, got {beta_a_scale!r}")
        self.beta_a_scale = float(beta_a_scale)
        self.iterations = iterations
        self.inverse_temperature = float(inverse_temperature)
        self.schedule = schedule if isinstance(schedule, str) else tuple(float(v) for v in schedule)
        self.lambdas = lambda_schedule(iterations, self.inverse_temperature, self.schedule)
        self.eps = float(eps)
        self.logits = bool(logits)
        self.beta_u = nn.Parameter(torch.zeros(num_parents))
        self.beta_a = nn.Parameter(torch.zeros(num_parents))

    def activation_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``beta_a`` of the activation logit: ``beta_a_scale * beta_a`` ``(J,)``."""
        return self.beta_a.to(dtype) * self.beta_a_scale

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, num_parents={self.num_parents}, "
                f"inverse_temperature={self.inverse_temperature}, schedule={self.schedule!r}, "
                f"beta_a_scale={self.beta_a_scale}")

    def route(
        self, votes: torch.Tensor, activations: torch.Tensor, context: RoutingContext | None = None
    ) -> RoutingOutput:
        mu, r, a = em_routing(
            votes, activations, self.beta_u.to(votes.dtype), self.activation_bias(votes.dtype),
            self.lambdas, self.eps, normalize=None if context is None else context.normalize,
            logits=self.logits,
        )
        return RoutingOutput(poses=mu, couplings=r, activations=a)
