"""Variational Bayes routing (De Sousa Ribeiro, Leontidis, Kollias 2020, "Capsule Routing via
Variational Bayes", AAAI 2020, arXiv 1905.11455; official code: github.com/fabio-deep/
Variational-Capsule-Routing, ``src/vb_routing.py``).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose element
(``D = 16`` for a flattened 4x4 pose matrix; the algorithm works for any ``D >= 1``).

The parents are the components of a Bayesian mixture of Gaussians fitted to the votes
``V_ij`` of the children, weighted by the child activations ``a_i``. The priors are conjugate:
a Dirichlet ``Dir(pi | alpha_0)`` on the mixing coefficients and a Gaussian-Wishart
``N(mu_j | m_0, (kappa_0 Lambda_j)^-1) W(Lambda_j | Psi_0, nu_0)`` on each parent's mean and
precision. The precision is **diagonal** (``cov='diag'``, the setting of the official README;
the official code also has ``cov='full'``, not implemented here), so ``Psi_j`` is stored as the
diagonal of its inverse, ``psi_inv_j``. Mean-field ``q(z) q(pi, mu, Lambda)`` gives the standard
variational mixture-of-Gaussians updates (Bishop 2006, PRML Sec. 10.2; equation numbers below
are Bishop's, see "What was checked"). ``T`` iterations start from ``r_ij = 1 / J``:

    update q(pi, mu, Lambda) (every iteration; "M-step"):
        w_ij     = a_i r_ij                                      (child activation weighting)
        R_j      = sum_i w_ij                                    (10.51)
        alpha_j  = alpha_0 + R_j                                 (10.58)
        kappa_j  = kappa_0 + R_j                                 (10.60)
        nu_j     = nu_0 + R_j                                    (10.63)
        m_j      = (kappa_0 m_0 + sum_i w_ij V_ij) / kappa_j      (10.61)
        psi_inv_j = 1/psi_0 + sum_i w_ij (V_ij - m_0)^2 - (sum_i w_ij (V_ij - m_0))^2 / kappa_j
                                                                 (10.62, diagonal; see below)
    update q(z) (every iteration but the last; "E-step"):
        E[ln pi_j]      = psi(alpha_j) - psi(sum_k alpha_k)      (10.66)
        E[ln|Lambda_j|] = sum_{d=1..D} psi((nu_j + 1 - d) / 2) + D ln 2 - sum_d ln psi_inv_jd
                                                                 (10.65)
        E[quad_ij]      = D / kappa_j + nu_j sum_d (V_ijd - m_jd)^2 / psi_inv_jd      (10.64)
        ln rho_ij = E[ln pi_j] + E[ln|Lambda_j|] / 2 - D ln(2 pi) / 2 - E[quad_ij] / 2 (10.46)
        r_ij      = rho_ij / sum_k rho_ik                        (10.49; over PARENTS)
    parent activations (after the last update):
        H_j = D (1 + ln 2 pi) / 2 - E[ln|Lambda_j|] / 2          (entropy, see below)
        a_j = sigmoid(beta_a_j - (exp(E[ln pi_j]) H_j + beta_u_j))

``psi`` is the digamma function. Child activations enter only through the weights ``w_ij`` of
the sufficient statistics, as in EM routing; the E-step uses the votes alone. (10.62) in
Bishop's form is ``W0^-1 + R S + kappa_0 R / (kappa_0 + R) (xbar - m_0)^2`` with the weighted
mean ``xbar`` and scatter ``S``; expanding it gives the line above, which needs no division by
``R_j`` and so stays finite when every child is inactive (``R_j = 0``; the official code divides
by ``R_j`` there). It is >= ``1/psi_0`` by Cauchy-Schwarz; rounding is clamped to that bound.
``E[quad]`` is computed as ``V^2 . P - 2 V . (P m) + m^2 . P`` with ``P = nu / psi_inv`` (one
batched product with a parent-major ``[V, V^2]`` buffer instead of a ``(B, I, J, D)``
difference; the sufficient statistics are one product with the same buffer), clamped at 0. The E-step is in
log space (``log_softmax``), so vanishing densities never give 0/0. Everything is smooth in the
votes: identical or all-zero votes give finite values and finite gradients.

Shapes:

    ===============  ==============  =============================================
    votes            (B, I, J, D)    V_ij
    activations      (B, I)          a_i of the children (default: all ones)
    couplings        (B, I, J)       r_ij used by the last update of q(pi, mu, Lambda)
                                     (uniform 1/J when iterations=1), sum to 1 over J
    poses            (B, J, D)       m_j, the posterior means
    activations      (B, J)          a_j of the parents (returned)
    beta_u, beta_a   (J,)            learned, one pair per parent (zeros at init)
    ===============  ==============  =============================================

Defaults are those of the official README: ``alpha_0 = 1``, ``m_0 = 0``, ``kappa_0 = 1``,
``Psi_0 = I`` (``psi_0 = 1``), ``nu_0 = D + 1``, 3 iterations; couplings start at ``1 / J``.
``nu_0 > D - 1`` is required (the Wishart is proper and the digamma arguments positive).

What was checked, and against what:

* **The paper's own method section could not be read.** The stored copies of the paper
  reachable here (AAAI text at object.cloud.sdsc.edu, bytez.com, ar5iv 1905.11455) only
  return the abstract and the start of the introduction. The abstract confirms: VB for a
  "mixture of transforming gaussians", uncertainty over pose parameters against variance
  collapse; a third-party summary (liner.com review) confirms that parent activation measures
  agreement with "the differential entropy of a higher capsule's Gaussian-Wishart variational
  posterior". **The paper's equation numbers, its Algorithm 1 and its activation equation are
  therefore unverified**; the numbers above are Bishop's PRML numbers, written from the
  standard derivation (the stored PRML page retrieved here, book page 482, carries 10.74-10.77,
  consistent with 10.46-10.67 a few pages earlier; those pages themselves were not retrieved).
* **The update equations were checked against the authors' official code** (two stored
  revisions of ``src/vb_routing.py``, commits 9908079 and 1482128, read, not copied; the
  README's example call gives the priors): the priors and defaults above; the
  updates of alpha, kappa, nu, m, Psi^-1 exactly as (10.58)-(10.63) (the code keeps only the
  ``m_0 = 0, kappa_0 = 1`` special case; the general form here reduces to it); ``E[ln|Lambda|]``
  with digamma arguments ``(nu_j - d) / 2`` for ``d = 0..D-1``; ``E[quad] = D/kappa_j +
  nu_j sum_d (V - m_j)^2 / psi_inv``; ``R_ij <- R_ij a_i`` before the statistics; couplings
  initialised to ``1 / J``; the E-step skipped in the last iteration; ``iter=3``.
* **Diagonal precision.** As in the official ``cov='diag'`` branch, ``Psi_j`` is diagonal but
  ``E[ln|Lambda_j|]`` keeps the full-Wishart digamma sum (10.65) with ``nu_j`` shared by all
  ``D`` elements (independent Gamma precisions per element would give ``D psi(nu_j / 2)``
  instead); we follow the code.
* **Normalisation of the E-step.** Revision 9908079 normalises ``exp(E[ln pi_j] + ln p_ij)``
  over all parents a child reaches (10.49), as here. Revision 1482128 divides ``exp(ln p_ij)``
  (without ``E[ln pi_j]``) by ``sum_k exp(E[ln pi_k] + ln p_ik)``, whose rows do not sum to
  one; we follow (10.49).
* **Parent activation** follows the official code: ``beta_a - (exp(E[ln pi_j]) H_j + beta_u)``
  with ``H_j = D ln(2 pi e) / 2 - E[ln|Lambda_j|] / 2`` (the entropy of a Gaussian whose log
  precision determinant is replaced by its posterior expectation; not the full
  Gaussian-Wishart entropy). The code then applies a non-affine ``BatchNorm`` over the batch
  before the sigmoid, and a ``BatchNorm`` to the poses; both are **omitted** here so that each
  sample is routed independently (add a normalisation in the model if wanted). A third-party
  audit note (read via the code index) states that this code form is "not claimed identical
  to paper equation 14"; what Eq. 14 of the paper says could not be read (**unverified**).
* Convolutional VB routing lives in :class:`~torchcaps.layers.ConvMatCaps` (``routing="vb"``):
  the layer passes ``RoutingContext(normalize=...)`` so that a child's couplings sum to one
  over every parent it reaches across overlapping windows, or, with ``per_window=True``, over
  the parent types of each window separately, which is what the official
  ``VariationalBayesRouting2d`` does (its E-step ``logsumexp`` runs over the parent-type axis
  with the window positions kept, and its statistics sum over the ``K x K`` children of each
  window). The model :class:`~torchcaps.models.VBCapsNet` follows the official ``CapsuleNet``.
* Not implemented: full covariance, learned ``alpha_0``, the Capsule-VAE sampling of the
  paper.

:func:`vb_routing` is the functional core; it accepts any leading batch shape.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .._validate import check_iterations
from ._factored import FactoredRouting, Votes
from .base import ActivationRouting, Normalizer, RoutingContext, RoutingOutput, register_routing

__all__ = ["VariationalBayesRouting", "vb_routing"]

_LN2 = math.log(2.0)
_LN2PI = math.log(2.0 * math.pi)


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


def _update_posterior(
    votes: Votes,
    weights: torch.Tensor,
    alpha0: float,
    kappa0: float,
    psi0: float,
    nu0: float,
) -> tuple[torch.Tensor, ...]:
    """q(pi, mu, Lambda) from the weighted votes: (10.51), (10.58), (10.60)-(10.63).

    Args:
        votes: ``[y, y^2]`` with ``y = V - m_0``, parent-major ``(..., J, I, 2D)``.
        weights: ``w_ij = a_i r_ij`` ``(..., I, J)``.

    Returns:
        ``alpha, kappa, nu (..., J)``, ``m - m_0 (..., J, D)`` and ``psi_inv (..., J, D)``.
    """
    d_n = votes.vv.shape[-1] // 2
    r_j = weights.sum(dim=-2)  # R_j: (..., J)
    alpha, kappa, nu = alpha0 + r_j, kappa0 + r_j, nu0 + r_j  # (..., J)
    # sum_i w_ij [y_ij, y_ij^2]: one (1, I) x (I, 2D) product per parent: (..., J, 2D)
    s = votes.weighted(weights.transpose(-1, -2))
    s1, s2 = s[..., :d_n], s[..., d_n:]  # (..., J, D) each
    m = s1 / kappa.unsqueeze(-1)  # (10.61) with m_0 = 0 in the shifted frame: (..., J, D)
    # (10.62): Psi0^-1 + R S + kappa0 R / kappa (ybar)^2 == Psi0^-1 + s2 - s1^2 / kappa (>= Psi0^-1)
    scatter = torch.clamp(s2 - s1 * m, min=0.0)  # (..., J, D)
    psi_inv = 1.0 / psi0 + scatter  # (..., J, D)
    return alpha, kappa, nu, m, psi_inv


def _expectations(
    alpha: torch.Tensor, nu: torch.Tensor, psi_inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[ln pi_j]`` (10.66) and ``E[ln|Lambda_j|]`` (10.65), both ``(..., J)``."""
    d_n = psi_inv.shape[-1]
    e_ln_pi = torch.digamma(alpha) - torch.digamma(alpha.sum(dim=-1, keepdim=True))
    k = torch.arange(d_n, dtype=nu.dtype, device=nu.device)  # d - 1 for d = 1..D: (D,)
    digammas = torch.digamma(0.5 * (nu.unsqueeze(-1) - k)).sum(dim=-1)  # (..., J)
    e_ln_det = digammas + d_n * _LN2 - torch.log(psi_inv).sum(dim=-1)  # ln|Psi_j| = -sum ln psi_inv
    return e_ln_pi, e_ln_det


def _log_rho(
    votes: Votes,
    kappa: torch.Tensor,
    nu: torch.Tensor,
    m: torch.Tensor,
    psi_inv: torch.Tensor,
    e_ln_pi: torch.Tensor,
    e_ln_det: torch.Tensor,
) -> torch.Tensor:
    """Unnormalised log responsibilities ``ln rho_ij`` (10.46) with (10.64), ``(..., I, J)``."""
    d_n = votes.vv.shape[-1] // 2
    prec = nu.unsqueeze(-1) / psi_inv  # E[Lambda_j] diagonal: (..., J, D)
    # sum_d (y - m)^2 prec = [y, y^2] . [-2 prec m, prec] + m^2 . prec: (..., J, I)
    coef = torch.cat([-2.0 * prec * m, prec], dim=-1)  # (..., J, 2D)
    quad = votes.project(coef) + (prec * m * m).sum(dim=-1, keepdim=True)
    e_quad = d_n / kappa.unsqueeze(-1) + torch.clamp(quad, min=0.0)  # (10.64): (..., J, I)
    per_parent = e_ln_pi + 0.5 * e_ln_det - 0.5 * d_n * _LN2PI  # (..., J)
    return (per_parent.unsqueeze(-1) - 0.5 * e_quad).transpose(-1, -2)  # (..., I, J)


def vb_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int = 3,
    alpha0: float = 1.0,
    kappa0: float = 1.0,
    psi0: float = 1.0,
    nu0: float | None = None,
    m0: float = 0.0,
    normalize: Normalizer | None = None,
    logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``iterations`` rounds of VB routing (see the module docstring).

    The argument order ``(votes, activations, beta_u, beta_a, ...)`` is that of
    :func:`~torchcaps.routing.em.em_routing`.

    Args:
        votes: ``(..., I, J, D)``.
        activations: child activations ``(..., I)`` (weights of the sufficient statistics).
        beta_u, beta_a: ``(J,)`` (or broadcastable to ``(..., J)``).
        iterations: number of updates of q(pi, mu, Lambda), ``T >= 1``.
        alpha0: Dirichlet prior concentration (> 0).
        kappa0: prior precision scaling of the parent means (> 0).
        psi0: Wishart prior scale ``Psi_0 = psi0 I`` (> 0).
        nu0: Wishart prior degrees of freedom (> D - 1); ``None`` gives ``D + 1``.
        m0: prior mean of every pose element.
        normalize: maps ``ln rho (..., I, J)`` to couplings; the default is a softmax over
            ``J`` (10.49). Convolutional layers pass a normaliser over every parent a child
            reaches across overlapping windows (:class:`~torchcaps.layers.ConvMatCaps`); the
            initial couplings are ``normalize(zeros)``.
        logits: return the pre-sigmoid activation logits instead of ``a_j`` (for a model that
            normalises them before the sigmoid, as the official code's ``BN_a``).

    Returns:
        ``poses m (..., J, D)``, ``couplings r (..., I, J)`` (those of the last update, summing
        to 1 over ``J``, or over the normaliser's set) and parent ``activations a_j (..., J)``
        (or their logits).
    """
    check_iterations(iterations)
    *lead, i_n, j_n, d_n = votes.shape
    nu0 = float(d_n + 1) if nu0 is None else float(nu0)
    if not (nu0 > d_n - 1 and math.isfinite(nu0)):
        raise ValueError(
            f"nu0 must exceed D - 1 = {d_n - 1} for pose dimension D = {d_n}, got {nu0}"
        )
    votes_t = votes.transpose(-3, -2)  # parent-major view (..., J, I, D)
    stack = functools.partial(_stack, m0=m0)
    iterate = functools.partial(
        _vb_iterations, iterations=iterations, priors=(alpha0, kappa0, psi0, nu0),
        normalize=normalize, shape=(*lead, i_n, j_n),
    )
    inputs = (votes_t, activations, beta_u, beta_a)
    if (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
            and not torch.compiler.is_compiling()):
        m, r, logit, _ = FactoredRouting.apply(votes_t, stack, iterate, activations, beta_u,
                                               beta_a)
    else:
        vv, _ = stack(votes_t)
        m, r, logit = iterate(Votes(vv), activations, beta_u, beta_a)
    return m + m0, r, (logit if logits else torch.sigmoid(logit))


def _stack(votes_t: torch.Tensor, m0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[y, y^2]`` with ``y = V - m_0``, parent-major ``(..., J, I, 2D)``, and ``m_0``."""
    y = votes_t - m0 if m0 else votes_t  # the frame where the prior mean is 0: (..., J, I, D)
    if torch.is_grad_enabled() and y.requires_grad:  # plain autograd (torch.compile)
        return torch.cat([y, y * y], dim=-1), votes_t.new_tensor(m0)
    d = y.shape[-1]
    vv = y.new_empty(*y.shape[:-1], 2 * d)  # written in place; the votes read once
    vv[..., :d].copy_(y)
    torch.mul(vv[..., :d], vv[..., :d], out=vv[..., d:])
    return vv, votes_t.new_tensor(m0)


def _vb_iterations(
    votes: Votes,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int,
    priors: tuple[float, float, float, float],
    normalize: Normalizer | None,
    shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The updates on stacked votes: ``m - m_0 (..., J, D)``, ``r (..., I, J)``, the logit."""
    d_n = votes.vv.shape[-1] // 2
    if normalize is None:
        r = votes.vv.new_full(shape, 1.0 / shape[-1])  # r_ij = 1 / J: (..., I, J)
    else:
        r = normalize(votes.vv.new_zeros(shape))  # uniform over the parents reached
    a_in = activations.unsqueeze(-1)  # (..., I, 1)
    for t in range(iterations):
        alpha, kappa, nu, m, psi_inv = _update_posterior(votes, r * a_in, *priors)
        e_ln_pi, e_ln_det = _expectations(alpha, nu, psi_inv)
        if t < iterations - 1:
            log_rho = _log_rho(votes, kappa, nu, m, psi_inv, e_ln_pi, e_ln_det)
            # (10.49), over parents j: (..., I, J)
            r = torch.softmax(log_rho, dim=-1) if normalize is None else normalize(log_rho)
    entropy = 0.5 * d_n * (1.0 + _LN2PI) - 0.5 * e_ln_det  # H_j: (..., J)
    logit = beta_a - (torch.exp(e_ln_pi) * entropy + beta_u)  # (..., J)
    return m, r, logit


@register_routing("vb")
class VariationalBayesRouting(ActivationRouting):
    """Variational Bayes routing (De Sousa Ribeiro et al. 2020) with diagonal precisions.

    Call as ``routing(votes)``, ``routing(votes, activations)`` or ``routing(votes,
    activations, RoutingContext(normalize=...))``; child activations default to ones (every
    child fully present); ``context.normalize`` replaces the softmax over parents (see
    :func:`vb_routing`).

    Args:
        iterations: routing iterations ``T`` (3 in the official code); at least 1.
        num_parents: ``J``; required (``beta_a``, ``beta_u`` are per parent).
        parent_dim: ``D`` or ``None`` to accept any.
        alpha0, kappa0, psi0, nu0, m0: the priors (see :func:`vb_routing`); ``nu0=None``
            gives ``D + 1``.
        logits: return the pre-sigmoid logits of the parent activations (a model may
            normalise them before its own sigmoid, as the official code's ``BN_a``).

    Shape:
        votes ``(B, I, J, D)``, activations ``(B, I)`` -> :class:`RoutingOutput` with poses
        ``(B, J, D)`` (posterior means), couplings ``(B, I, J)`` summing to 1 over ``J`` and
        activations ``(B, J)`` in (0, 1).
    """

    normalized_axis = 2
    reads = frozenset({"normalize"})

    def __init__(
        self,
        iterations: int = 3,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        alpha0: float = 1.0,
        kappa0: float = 1.0,
        psi0: float = 1.0,
        nu0: float | None = None,
        m0: float = 0.0,
        logits: bool = False,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        if not isinstance(num_parents, int) or isinstance(num_parents, bool) or num_parents < 1:
            raise ValueError(
                f"VariationalBayesRouting needs num_parents (a positive integer) for its "
                f"per-parent beta_a and beta_u, got {num_parents!r}"
            )
        self.iterations = iterations
        self.alpha0 = _positive(alpha0, "alpha0")
        self.kappa0 = _positive(kappa0, "kappa0")
        self.psi0 = _positive(psi0, "psi0")
        if nu0 is not None:
            nu0 = float(nu0)
            low = parent_dim - 1 if parent_dim is not None else 0
            if not (nu0 > low and math.isfinite(nu0)):
                raise ValueError(f"nu0 must exceed D - 1 = {low}, got {nu0!r}")
        self.nu0 = nu0
        if not math.isfinite(float(m0)):
            raise ValueError(f"m0 must be finite, got {m0!r}")
        self.m0 = float(m0)
        self.logits = bool(logits)
        self.beta_a = nn.Parameter(torch.zeros(num_parents))
        self.beta_u = nn.Parameter(torch.zeros(num_parents))

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, num_parents={self.num_parents}, "
                f"alpha0={self.alpha0}, kappa0={self.kappa0}, psi0={self.psi0}, "
                f"nu0={self.nu0}, m0={self.m0}")

    def route(
        self, votes: torch.Tensor, activations: torch.Tensor, context: RoutingContext | None = None
    ) -> RoutingOutput:
        m, r, a = vb_routing(
            votes, activations, self.beta_u.to(votes.dtype), self.beta_a.to(votes.dtype),
            self.iterations, self.alpha0, self.kappa0, self.psi0, self.nu0, self.m0,
            normalize=None if context is None else context.normalize, logits=self.logits,
        )
        return RoutingOutput(poses=m, couplings=r, activations=a)
