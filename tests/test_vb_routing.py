"""Variational Bayes routing (De Sousa Ribeiro et al. 2020, arXiv 1905.11455).

The loop reference below is written from Bishop's textbook form of the variational
mixture of Gaussians (PRML 10.46-10.67: weighted mean ``xbar`` and scatter ``S`` per parent,
then the Gaussian-Wishart and Dirichlet posteriors), one b, i, j, d at a time in Python floats,
with its own digamma, so it shares neither the algebra (the module expands (10.62) without
dividing by ``R_j``, and (10.64) into contractions) nor the special function with the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchcaps.routing.base import create_routing, list_routings
from torchcaps.routing.vb import VariationalBayesRouting, vb_routing
from torchcaps.testing import assert_rejects_bad_votes

# ----------------------------------------------------------------------------- reference


def digamma_ref(x: float) -> float:
    """psi(x) for x > 0: recurrence up to x >= 8, then the asymptotic series."""
    acc = 0.0
    while x < 8.0:
        acc -= 1.0 / x
        x += 1.0
    inv2 = 1.0 / (x * x)
    series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240 - inv2 / 132))))
    return acc + math.log(x) - 0.5 / x - series


def vb_routing_loop(votes, acts, beta_a, beta_u, iterations, alpha0=1.0, kappa0=1.0, psi0=1.0,
                    nu0=None, m0=0.0):
    """VB routing with explicit loops; every child needs a positive activation (R_j > 0)."""
    b_n, i_n, j_n, d_n = votes.shape
    nu0 = d_n + 1.0 if nu0 is None else nu0
    v = votes.tolist()
    poses = torch.zeros(b_n, j_n, d_n, dtype=torch.float64)
    coup = torch.zeros(b_n, i_n, j_n, dtype=torch.float64)
    act = torch.zeros(b_n, j_n, dtype=torch.float64)
    for b in range(b_n):
        r = [[1.0 / j_n] * j_n for _ in range(i_n)]
        for t in range(iterations):
            post = []
            for j in range(j_n):
                w = [float(acts[b, i]) * r[i][j] for i in range(i_n)]
                n = sum(w)
                xbar = [sum(w[i] * v[b][i][j][d] for i in range(i_n)) / n for d in range(d_n)]
                s = [sum(w[i] * (v[b][i][j][d] - xbar[d]) ** 2 for i in range(i_n)) / n
                     for d in range(d_n)]
                kappa = kappa0 + n
                m = [(kappa0 * m0 + n * xbar[d]) / kappa for d in range(d_n)]
                psi_inv = [1.0 / psi0 + n * s[d] + kappa0 * n / (kappa0 + n) * (xbar[d] - m0) ** 2
                           for d in range(d_n)]
                post.append({"alpha": alpha0 + n, "kappa": kappa, "nu": nu0 + n, "m": m,
                             "psi_inv": psi_inv})
            alpha_hat = sum(p["alpha"] for p in post)
            for p in post:
                p["eln_pi"] = digamma_ref(p["alpha"]) - digamma_ref(alpha_hat)
                p["eln_det"] = (sum(digamma_ref((p["nu"] + 1 - k) / 2) for k in range(1, d_n + 1))
                                + d_n * math.log(2) - sum(math.log(x) for x in p["psi_inv"]))
            used = [row[:] for row in r]
            if t < iterations - 1:
                for i in range(i_n):
                    ln_rho = []
                    for j, p in enumerate(post):
                        maha = sum((v[b][i][j][d] - p["m"][d]) ** 2 / p["psi_inv"][d]
                                   for d in range(d_n))
                        e_quad = d_n / p["kappa"] + p["nu"] * maha
                        ln_rho.append(p["eln_pi"] + 0.5 * p["eln_det"]
                                      - 0.5 * d_n * math.log(2 * math.pi) - 0.5 * e_quad)
                    top = max(ln_rho)
                    e = [math.exp(x - top) for x in ln_rho]
                    r[i] = [x / sum(e) for x in e]
        for j, p in enumerate(post):
            poses[b, j] = torch.tensor(p["m"], dtype=torch.float64)
            entropy = 0.5 * d_n * math.log(2 * math.pi * math.e) - 0.5 * p["eln_det"]
            logit = float(beta_a[j]) - (math.exp(p["eln_pi"]) * entropy + float(beta_u[j]))
            act[b, j] = 1.0 / (1.0 + math.exp(-logit))
            for i in range(i_n):
                coup[b, i, j] = used[i][j]
    return poses, coup, act


def _routing(j, d, **kw):
    r = VariationalBayesRouting(num_parents=j, parent_dim=d, **kw).double()
    with torch.no_grad():
        r.beta_a.copy_(torch.linspace(-0.5, 0.7, j))
        r.beta_u.copy_(torch.linspace(0.3, -0.2, j))
    return r


# ----------------------------------------------------------------------------- tests


def test_digamma_reference_matches_torch():
    xs = torch.tensor([0.05, 0.5, 1.0, 2.5, 7.9, 8.0, 30.0, 1e3], dtype=torch.float64)
    ours = torch.tensor([digamma_ref(float(x)) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(ours, torch.digamma(xs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 4, 1, 2), (2, 3, 4, 1)])
@pytest.mark.parametrize("with_acts", [False, True])
def test_vb_matches_loop_reference(iterations, shape, with_acts):
    g = torch.Generator().manual_seed(sum(shape) + iterations)
    b, i, j, d = shape
    votes = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    acts = (torch.rand(b, i, generator=g, dtype=torch.float64) * 0.8 + 0.2 if with_acts
            else torch.ones(b, i, dtype=torch.float64))
    r = _routing(j, d, iterations=iterations)
    out = r(votes, acts) if with_acts else r(votes)
    ref = vb_routing_loop(votes, acts, r.beta_a.detach(), r.beta_u.detach(), iterations)
    for got, want in zip((out.poses, out.couplings, out.activations), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_vb_matches_loop_reference_with_other_priors():
    g = torch.Generator().manual_seed(7)
    votes = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64) + 2.0
    acts = torch.rand(2, 6, generator=g, dtype=torch.float64) * 0.9 + 0.1
    priors = {"alpha0": 0.3, "kappa0": 2.5, "psi0": 0.4, "nu0": 2.2, "m0": 0.7}
    r = _routing(3, 3, iterations=3, **priors)
    out = r(votes, acts)
    ref = vb_routing_loop(votes, acts, r.beta_a.detach(), r.beta_u.detach(), 3, **priors)
    for got, want in zip((out.poses, out.couplings, out.activations), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_single_parent_posterior_mean_in_closed_form():
    """J = 1: r = 1, so m = (kappa0 m0 + sum_i a_i V_i) / (kappa0 + sum_i a_i) (10.61)."""
    votes = torch.randn(3, 7, 1, 5, dtype=torch.float64)
    acts = torch.rand(3, 7, dtype=torch.float64)
    out = _routing(1, 5, kappa0=2.0, m0=0.5)(votes, acts)
    want = (2.0 * 0.5 + (acts[..., None] * votes[:, :, 0]).sum(1)) / (2.0 + acts.sum(1))[:, None]
    torch.testing.assert_close(out.poses[:, 0], want)
    torch.testing.assert_close(out.couplings, torch.ones_like(out.couplings))


def test_couplings_sum_to_one_over_parents_and_start_uniform():
    votes = torch.randn(3, 8, 5, 4, dtype=torch.float64) * 3
    out = _routing(5, 4, iterations=3)(votes)
    torch.testing.assert_close(out.couplings.sum(dim=2), torch.ones(3, 8, dtype=torch.float64))
    assert VariationalBayesRouting.normalized_axis == 2
    first = _routing(5, 4, iterations=1)(votes)
    torch.testing.assert_close(first.couplings, torch.full_like(first.couplings, 0.2))
    assert ((out.activations > 0) & (out.activations < 1)).all()


def test_routing_separates_two_clusters():
    """Votes agreeing with parent 0 for half the children and parent 1 for the others."""
    votes = torch.randn(1, 8, 2, 3, dtype=torch.float64)
    votes[0, :4, 0] = torch.randn(4, 3, dtype=torch.float64) * 0.01 + 1.0  # tight for parent 0
    votes[0, 4:, 1] = torch.randn(4, 3, dtype=torch.float64) * 0.01 - 1.0  # tight for parent 1
    votes[0, :4, 1] = torch.randn(4, 3, dtype=torch.float64) * 5  # scattered elsewhere
    votes[0, 4:, 0] = torch.randn(4, 3, dtype=torch.float64) * 5
    out = VariationalBayesRouting(iterations=5, num_parents=2).double()(votes)
    assert (out.couplings[0, :4, 0] > 0.5).all() and (out.couplings[0, 4:, 1] > 0.5).all()


def test_permuting_children_leaves_parents_unchanged():
    g = torch.Generator().manual_seed(3)
    votes = torch.randn(2, 7, 3, 4, generator=g, dtype=torch.float64)
    acts = torch.rand(2, 7, generator=g, dtype=torch.float64)
    perm = torch.randperm(7, generator=g)
    r = _routing(3, 4)
    a, b = r(votes, acts), r(votes[:, perm], acts[:, perm])
    torch.testing.assert_close(a.poses, b.poses)
    torch.testing.assert_close(a.activations, b.activations)
    torch.testing.assert_close(a.couplings[:, perm], b.couplings)


def test_inactive_children_are_ignored():
    """A child with a_i = 0 adds nothing to the sufficient statistics: parents as without it."""
    g = torch.Generator().manual_seed(5)
    votes = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    acts = torch.rand(2, 6, generator=g, dtype=torch.float64) * 0.9 + 0.1
    acts[:, 2] = 0.0
    keep = [0, 1, 3, 4, 5]
    r = _routing(3, 4)
    a, b = r(votes, acts), r(votes[:, keep], acts[:, keep])
    torch.testing.assert_close(a.poses, b.poses)
    torch.testing.assert_close(a.activations, b.activations)
    torch.testing.assert_close(a.couplings[:, keep], b.couplings)


def test_functional_accepts_leading_dims():
    votes = torch.randn(2, 3, 5, 4, 2, dtype=torch.float64)  # (B1, B2, I, J, D)
    acts = torch.rand(2, 3, 5, dtype=torch.float64)
    ba, bu = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    m, r, a = vb_routing(votes, acts, beta_u=bu, beta_a=ba, iterations=3)
    m2, r2, a2 = vb_routing(votes.flatten(0, 1), acts.flatten(0, 1), beta_u=bu, beta_a=ba,
                            iterations=3)
    torch.testing.assert_close(m.flatten(0, 1), m2)
    torch.testing.assert_close(r.flatten(0, 1), r2)
    torch.testing.assert_close(a.flatten(0, 1), a2)


def test_vb_gradcheck():
    g = torch.Generator().manual_seed(0)
    votes = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    acts = (torch.rand(1, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    ba = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    bu = torch.tensor([0.3, 0.0], dtype=torch.float64, requires_grad=True)

    def f(v, a, x, y):
        return vb_routing(v, a, beta_u=y, beta_a=x, iterations=3, alpha0=1.0, kappa0=1.0,
                          psi0=1.0, nu0=None, m0=0.2)

    assert torch.autograd.gradcheck(f, (votes, acts, ba, bu))


@pytest.mark.parametrize("case", ["identical", "zero", "inactive", "one_child"])
def test_gradients_finite_at_degenerate_votes(case):
    shape = (2, 1 if case == "one_child" else 4, 3, 4)
    votes = torch.randn(shape, dtype=torch.float64)
    if case == "identical":
        votes = votes[:, :1, :1].expand(shape).clone()  # every child, every parent: same vote
    elif case == "zero":
        votes = torch.zeros(shape, dtype=torch.float64)
    votes.requires_grad_()
    acts = torch.zeros(shape[:2], dtype=torch.float64) if case == "inactive" else None
    r = _routing(3, 4)
    out = r(votes, acts)
    loss = out.poses.square().sum() + out.activations.sum() + out.couplings[..., 0].sum()
    loss.backward()
    for t in (votes.grad, r.beta_a.grad, r.beta_u.grad, out.poses, out.activations, out.couplings):
        assert torch.isfinite(t).all()


def test_float32_large_offset_stays_finite():
    votes = torch.randn(2, 16, 4, 16) * 10 + 1e3
    out = VariationalBayesRouting(num_parents=4, parent_dim=16)(votes)
    assert torch.isfinite(out.poses).all() and torch.isfinite(out.activations).all()
    torch.testing.assert_close(out.couplings.sum(2), torch.ones(2, 16))


def test_registry_and_defaults():
    assert "vb" in list_routings()
    r = create_routing("vb", num_parents=3, parent_dim=2)
    assert isinstance(r, VariationalBayesRouting) and r.iterations == 3 and r.nu0 is None
    assert sum(p.numel() for p in r.parameters()) == 6  # beta_a, beta_u per parent
    out = r(torch.randn(2, 5, 3, 2))
    assert out.poses.shape == (2, 3, 2) and out.activations.shape == (2, 3)
    out = create_routing("vb", num_parents=2)(torch.randn(1, 2, 2, 7))  # any D
    assert out.poses.shape == (1, 2, 7)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_iterations(bad):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        VariationalBayesRouting(iterations=bad, num_parents=2)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        vb_routing(torch.randn(1, 2, 2, 2), torch.ones(1, 2), torch.zeros(2), torch.zeros(2), bad)


def test_bad_options():
    with pytest.raises(ValueError, match="num_parents"):
        VariationalBayesRouting()
    for name in ("alpha0", "kappa0", "psi0"):
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            VariationalBayesRouting(num_parents=2, **{name: 0.0})
    with pytest.raises(ValueError, match="nu0 must exceed D - 1 = 3"):
        VariationalBayesRouting(num_parents=2, parent_dim=4, nu0=3.0)
    with pytest.raises(ValueError, match="m0 must be finite"):
        VariationalBayesRouting(num_parents=2, m0=float("nan"))
    r = VariationalBayesRouting(num_parents=2, nu0=2.5)  # D unknown until the votes arrive
    with pytest.raises(ValueError, match="nu0 must exceed D - 1 = 4"):
        r(torch.randn(1, 3, 2, 5))


def test_bad_votes_and_activations():
    r = VariationalBayesRouting(num_parents=3, parent_dim=4)
    assert_rejects_bad_votes(r, 3, 4)
    votes = torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"activations must have shape \(2, 5\)"):
        r(votes, torch.ones(2, 4))
    with pytest.raises(ValueError, match="activations must lie in"):
        r(votes, torch.full((2, 5), 1.5))
    with pytest.raises(ValueError, match="activations contains non-finite"):
        r(votes, torch.full((2, 5), float("nan")))
    with pytest.raises(TypeError, match="votes has dtype torch.float64"):
        r(votes.double())


def test_tiny_overfit():
    """Votes from a linear map of 12 random inputs; the parent activations learn the labels."""
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    y = torch.arange(12) % 3
    i_n, j_n, d_n = 4, 3, 4
    proj = torch.nn.Linear(6, i_n * j_n * d_n)
    routing = VariationalBayesRouting(iterations=3, num_parents=j_n, parent_dim=d_n)
    opt = torch.optim.Adam([*proj.parameters(), *routing.parameters()], lr=0.05)
    target = torch.nn.functional.one_hot(y, j_n).float()
    for _ in range(150):
        a = routing(proj(x).view(12, i_n, j_n, d_n)).activations
        loss = torch.nn.functional.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a = routing(proj(x).view(12, i_n, j_n, d_n)).activations
    assert (a.argmax(1) == y).float().mean() == 1.0


# ----------------------------------------------------------------------------- gradient paths
# With gradients, vb_routing assembles the votes' gradient from rank-one factors
# (routing._factored.FactoredRouting); under torch.compile it uses plain autograd.


def _vb_grads(inputs, weights, m0=0.0):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    votes, acts, beta_a, beta_u = leaves
    outs = vb_routing(votes, acts, beta_u=beta_u, beta_a=beta_a, iterations=3, m0=m0)
    sum(((o * w).sum() for o, w in zip(outs, weights, strict=True))).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("m0", [0.0, 0.7])
def test_vb_factored_gradient_matches_plain_autograd(monkeypatch, m0):
    g = torch.Generator().manual_seed(5)
    b, i, j, d = 2, 6, 3, 4
    inputs = [torch.randn(b, i, j, d, generator=g, dtype=torch.float64),
              torch.rand(b, i, generator=g, dtype=torch.float64) * 0.8 + 0.2,
              torch.randn(j, generator=g, dtype=torch.float64),
              torch.randn(j, generator=g, dtype=torch.float64)]
    weights = [torch.randn(s, generator=g, dtype=torch.float64)
               for s in ((b, j, d), (b, i, j), (b, j))]  # weights of m, r, a in the loss
    votes = inputs[0].clone().requires_grad_(True)
    _, acts, beta_a, beta_u = inputs
    out = vb_routing(votes, acts, beta_u=beta_u, beta_a=beta_a, iterations=3, m0=m0)
    assert type(out[1].grad_fn).__name__ == "FactoredRoutingBackward"
    fast = _vb_grads(inputs, weights, m0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain = _vb_grads(inputs, weights, m0)
    for got, want in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        assert want.abs().max() > 1e-6  # every input gets a real gradient
    # and the values of both paths agree with the loop reference
    ref = vb_routing_loop(*inputs, 3, m0=m0)
    with torch.no_grad():
        got_all = vb_routing(inputs[0], acts, beta_u=beta_u, beta_a=beta_a, iterations=3, m0=m0)
        for got, want in zip(got_all, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
