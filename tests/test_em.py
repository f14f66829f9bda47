"""EM routing, matrix-capsule layers, spread loss and the EM CapsNet model.

Loop references (float64, one capsule at a time) live here: Procedure 1 of Hinton et al.
2018 with explicit loops over b, j (M-step) and b, i (E-step), and a convolutional version
that enumerates, for every child, every (parent position, parent type) whose window covers it
(Gritzman 2019, arXiv 1907.00652).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchcaps
from reference import matrix_window_votes_loop
from torchcaps.functional import spread_loss
from torchcaps.layers.matrix import ClassMatCaps, ConvMatCaps, PrimaryMatCaps, window_index
from torchcaps.models.em_capsnet import EMCapsNet
from torchcaps.routing.base import create_routing, list_routings
from torchcaps.routing.em import EMRouting, em_routing, lambda_schedule

EPS = 1e-6

# ----------------------------------------------------------------------------- references


def _m_step_one(votes_list, r_list, a_list, beta_u, beta_a, lam, eps):
    """M-step for one parent: votes_list[i] (D,), r_list[i], a_list[i] floats."""
    rs = [r * a for r, a in zip(r_list, a_list, strict=True)]
    s = sum(rs)
    den = max(s, eps)
    d = votes_list[0].shape[0]
    mu = torch.zeros(d, dtype=torch.float64)
    for r, v in zip(rs, votes_list, strict=True):
        mu += r * v
    mu /= den
    var = torch.zeros(d, dtype=torch.float64)
    for r, v in zip(rs, votes_list, strict=True):
        var += r * (v - mu) ** 2
    var = var / den + eps
    cost = sum((beta_u + 0.5 * math.log(float(var[h]))) * s for h in range(d))
    a = 1.0 / (1.0 + math.exp(-lam * (beta_a - cost)))
    return mu, var, a


def _log_p(v, mu, var):
    total = 0.0
    for h in range(v.shape[0]):
        s2 = float(var[h])
        total += -float((v[h] - mu[h]) ** 2) / (2 * s2) - 0.5 * math.log(2 * math.pi * s2)
    return total


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [x / z for x in e]


def em_routing_loop(votes, a_in, beta_u, beta_a, lambdas, eps=EPS):
    """Procedure 1, per b and j (M-step) and per b and i (E-step)."""
    b_n, i_n, j_n, d_n = votes.shape
    r = torch.full((b_n, i_n, j_n), 1.0 / j_n, dtype=torch.float64)
    for t, lam in enumerate(lambdas):
        mu = torch.zeros(b_n, j_n, d_n, dtype=torch.float64)
        var = torch.zeros_like(mu)
        a_out = torch.zeros(b_n, j_n, dtype=torch.float64)
        for b in range(b_n):
            for j in range(j_n):
                mu[b, j], var[b, j], a_out[b, j] = _m_step_one(
                    [votes[b, i, j] for i in range(i_n)],
                    [float(r[b, i, j]) for i in range(i_n)],
                    [float(a_in[b, i]) for i in range(i_n)],
                    float(beta_u[j]), float(beta_a[j]), lam, eps,
                )
        if t < len(lambdas) - 1:
            new_r = torch.zeros_like(r)
            for b in range(b_n):
                for i in range(i_n):
                    logs = [math.log(float(a_out[b, j]))
                            + _log_p(votes[b, i, j], mu[b, j], var[b, j]) for j in range(j_n)]
                    new_r[b, i] = torch.tensor(_softmax(logs), dtype=torch.float64)  # over parents
            r = new_r
    return mu, r, a_out


def conv_em_loop(poses, acts, weight, beta_u, beta_a, k, s, lambdas, eps=EPS):
    """Convolutional EM routing with loops; each child normalised over every parent it reaches.

    poses (B, T, H, W, 16), acts (B, T, H, W), weight (K*K, T, C, 4, 4).
    Returns mu (B, C, Ho, Wo, 16), a (B, C, Ho, Wo), R (B, Ho*Wo, K*K, T, C).
    """
    b_n, t_n, h_n, w_n, _ = poses.shape
    c_n = weight.shape[2]
    ho, wo = (h_n - k) // s + 1, (w_n - k) // s + 1
    windows, slots, child, votes, reach = matrix_window_votes_loop(poses, weight, k, s)
    r = {}
    for b in range(b_n):
        for ch, places in reach.items():
            for (oy, ox, ky, kx) in places:
                for c in range(c_n):
                    r[b, oy, ox, ky, kx, ch[0], c] = 1.0 / (len(places) * c_n)
    mu = torch.zeros(b_n, c_n, ho, wo, 16, dtype=torch.float64)
    var = torch.zeros_like(mu)
    a_out = torch.zeros(b_n, c_n, ho, wo, dtype=torch.float64)
    for it, lam in enumerate(lambdas):
        for b in range(b_n):
            for (oy, ox) in windows:
                for c in range(c_n):
                    mu[b, c, oy, ox], var[b, c, oy, ox], a_out[b, c, oy, ox] = _m_step_one(
                        [votes[b, oy, ox, ky, kx, t, c] for (ky, kx, t) in slots],
                        [r[b, oy, ox, ky, kx, t, c] for (ky, kx, t) in slots],
                        [float(acts[(b, *child(oy, ox, ky, kx, t))]) for (ky, kx, t) in slots],
                        float(beta_u[c]), float(beta_a[c]), lam, eps,
                    )
        if it < len(lambdas) - 1:
            for b in range(b_n):
                for ch, places in reach.items():
                    keys, logs = [], []
                    for (oy, ox, ky, kx) in places:  # every window covering the child ...
                        for c in range(c_n):  # ... and every parent type there
                            keys.append((b, oy, ox, ky, kx, ch[0], c))
                            logs.append(math.log(float(a_out[b, c, oy, ox])) + _log_p(
                                votes[b, oy, ox, ky, kx, ch[0], c], mu[b, c, oy, ox],
                                var[b, c, oy, ox]))
                    for key, p in zip(keys, _softmax(logs), strict=True):
                        r[key] = p
    r_out = torch.zeros(b_n, ho * wo, k * k, t_n, c_n, dtype=torch.float64)
    for (b, oy, ox, ky, kx, t, c), v in r.items():
        r_out[b, oy * wo + ox, ky * k + kx, t, c] = v
    return mu, a_out, r_out


# ----------------------------------------------------------------------------- EM routing


def _routing(j, iterations=3, d=None, lam=1.0, schedule="linear", seed=0):
    r = EMRouting(iterations, num_parents=j, parent_dim=d, inverse_temperature=lam,
                  schedule=schedule).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.beta_u.copy_(torch.randn(j, generator=g, dtype=torch.float64))
        r.beta_a.copy_(torch.randn(j, generator=g, dtype=torch.float64))
    return r


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("with_acts", [False, True])
def test_em_matches_loop_reference(iterations, with_acts):
    votes = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 1.5
    acts = torch.rand(2, 6, dtype=torch.float64) if with_acts else None
    r = _routing(3, iterations, lam=0.5)
    out = r(votes, acts)
    a_ref = acts if with_acts else torch.ones(2, 6, dtype=torch.float64)
    mu, coup, a = em_routing_loop(votes, a_ref, r.beta_u.detach(), r.beta_a.detach(), r.lambdas)
    torch.testing.assert_close(out.poses, mu, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.couplings, coup, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.activations, a, rtol=1e-9, atol=1e-10)
    # not every activation is saturated, so the comparison is informative
    assert ((a > 0.05) & (a < 0.95)).any()


def test_em_default_schedule_is_the_openreview_formula():
    r = EMRouting(num_parents=4)
    assert r.lambdas == pytest.approx([0.01 * (1 - 0.95**t) for t in (1, 2, 3)])
    assert lambda_schedule(4, 2.0, "linear") == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lambda_schedule(2, 3.0, "constant") == [3.0, 3.0]
    assert lambda_schedule(2, 1.0, [0.1, 0.2]) == [0.1, 0.2]
    votes = torch.randn(2, 7, 4, 16, dtype=torch.float64)
    out = r.double()(votes)
    mu, coup, a = em_routing_loop(votes, torch.ones(2, 7, dtype=torch.float64),
                                  torch.zeros(4), torch.zeros(4), r.lambdas)
    torch.testing.assert_close(out.poses, mu)
    torch.testing.assert_close(out.activations, a)


def test_couplings_sum_to_one_over_parents_and_start_uniform():
    votes = torch.randn(3, 9, 5, 16, dtype=torch.float64) * 3
    out = _routing(5)(votes, torch.rand(3, 9, dtype=torch.float64))
    sums = out.couplings.sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(out.couplings.sum(dim=1), torch.ones(3, 5, dtype=torch.float64))
    one = _routing(5, iterations=1)(votes)
    torch.testing.assert_close(one.couplings, torch.full_like(one.couplings, 0.2))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), i=st.integers(1, 8), j=st.integers(1, 4), d=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_permuting_children_leaves_parents_unchanged(b, i, j, d, seed):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(b, i, j, d, dtype=torch.float64, generator=g)
    acts = torch.rand(b, i, dtype=torch.float64, generator=g)
    perm = torch.randperm(i, generator=g)
    r = _routing(j, lam=0.05, seed=seed)
    x, y = r(votes, acts), r(votes[:, perm], acts[:, perm])
    torch.testing.assert_close(x.poses, y.poses)
    torch.testing.assert_close(x.activations, y.activations)
    torch.testing.assert_close(x.couplings[:, perm], y.couplings)
    assert ((x.activations > 0) & (x.activations < 1)).all()
    assert torch.isfinite(x.poses).all()


def test_activations_in_open_unit_interval_and_inactive_children_ignored():
    votes = torch.randn(2, 6, 3, 16, dtype=torch.float64)
    acts = torch.rand(2, 6, dtype=torch.float64)
    acts[:, 0] = 0.0
    r = _routing(3, lam=0.05)
    out = r(votes, acts)
    assert ((out.activations > 0) & (out.activations < 1)).all()
    # a child with a_i = 0 has no influence on the parents, whatever it votes
    moved = votes.clone()
    moved[:, 0] += 100.0
    torch.testing.assert_close(r(moved, acts).poses, out.poses)
    torch.testing.assert_close(r(moved, acts).activations, out.activations)


def test_em_gradcheck():
    votes = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(1, 4, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_(True)
    bu = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ba = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(v, a, u, b):
        mu, r, act = em_routing(v, a, u, b, [0.3, 0.6, 1.0])
        return mu, r, act

    assert torch.autograd.gradcheck(f, (votes, acts, bu, ba))


def test_em_gradients_finite_with_identical_votes():
    # every child votes the same: zero variance, guarded by eps
    votes = torch.ones(2, 5, 3, 16, requires_grad=True)
    r = EMRouting(num_parents=3)
    out = r(votes)
    (out.poses.sum() + out.activations.sum()).backward()
    assert torch.isfinite(votes.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in r.parameters())


def test_em_registry():
    assert "em" in list_routings()
    r = create_routing("em", iterations=2, num_parents=4, parent_dim=16)
    assert isinstance(r, EMRouting) and r.normalized_axis == 2
    assert r.beta_u.shape == (4,) and r.beta_a.shape == (4,)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_iterations(bad):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        EMRouting(bad, num_parents=3)


def test_bad_options():
    with pytest.raises(ValueError, match="needs num_parents"):
        EMRouting(3)
    with pytest.raises(ValueError, match="schedule has 2 values but iterations is 3"):
        EMRouting(3, num_parents=2, schedule=[0.1, 0.2])
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        EMRouting(3, num_parents=2, schedule="cosine")
    with pytest.raises(ValueError, match="inverse_temperature must be positive"):
        EMRouting(3, num_parents=2, inverse_temperature=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        EMRouting(3, num_parents=2, eps=0.0)
    for bad in (0.0, -5000.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta_a_scale must be positive and finite"):
            EMRouting(3, num_parents=2, beta_a_scale=bad)


def test_em_beta_a_scale_multiplies_the_activation_bias():
    """``beta_a_scale * beta_a`` replaces ``beta_a`` in line 6 of the M-step, nothing else."""
    votes = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 1.5
    acts = torch.rand(2, 6, dtype=torch.float64)
    r = _routing(3, 3, lam=0.5)
    scaled = EMRouting(3, num_parents=3, inverse_temperature=0.5, schedule="linear",
                       beta_a_scale=7.0).double()
    with torch.no_grad():
        scaled.beta_u.copy_(r.beta_u)
        scaled.beta_a.copy_(r.beta_a / 7.0)
    out, ref = scaled(votes, acts), r(votes, acts)
    for name in ("poses", "couplings", "activations"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    mu, coup, a = em_routing_loop(votes, acts, r.beta_u.detach(), 7.0 * scaled.beta_a.detach(),
                                  r.lambdas)
    torch.testing.assert_close(out.activations, a, rtol=1e-9, atol=1e-10)
    # the learned parameter is the unscaled one: its gradient carries the factor
    scaled.beta_a.grad = None
    scaled(votes, acts).activations.sum().backward()
    r(votes, acts).activations.sum().backward()
    torch.testing.assert_close(scaled.beta_a.grad, 7.0 * r.beta_a.grad)


def test_em_parent_without_votes_sits_at_logistic_of_lambda_beta_a():
    """The em_capsnet plateau (module docstring, "Activation bias scale"): a parent that gets
    no votes has zero cost, so its activation is logistic(lambda * scale * beta_a); with the
    OpenReview lambda (9.75e-4 after 2 iterations) a bias of -1 leaves it at 0.5 unless scaled.
    """
    votes = torch.randn(1, 4, 3, 16, dtype=torch.float64)
    silent = torch.zeros(1, 4, dtype=torch.float64)  # no child is active: sum_i R_ij = 0
    lam = 0.01 * (1 - 0.95 ** 2)
    for scale, want in ((1.0, 1 / (1 + math.exp(lam))), (5000.0, 1 / (1 + math.exp(5000 * lam)))):
        r = EMRouting(2, num_parents=3, beta_a_scale=scale).double()
        with torch.no_grad():
            r.beta_a.fill_(-1.0)
        a = r(votes, silent).activations
        torch.testing.assert_close(a, torch.full_like(a, want), rtol=1e-9, atol=0)
    assert want < 0.01  # scaled: the parent can be switched off; unscaled it stays at 0.49976


def test_bad_votes_and_activations():
    r = EMRouting(3, num_parents=3, parent_dim=16)
    with pytest.raises(ValueError, match=r"votes must have shape \(B, I, 3, 16\)"):
        r(torch.randn(2, 5, 4, 16))
    with pytest.raises(ValueError, match="4 dimensions"):
        r(torch.randn(2, 5, 3))
    bad = torch.randn(2, 5, 3, 16)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="votes contains non-finite values .1 NaN"):
        r(bad)
    with pytest.raises(TypeError, match="floating-point"):
        r(torch.ones(2, 5, 3, 16, dtype=torch.int64))
    votes = torch.randn(2, 5, 3, 16)
    with pytest.raises(ValueError, match=r"activations must have shape \(2, 5\)"):
        r(votes, torch.rand(2, 4))
    with pytest.raises(ValueError, match="activations must have 2 dimensions"):
        r(votes, torch.rand(2, 5, 1))
    with pytest.raises(ValueError, match=r"activations must lie in \[0, 1\]"):
        r(votes, torch.full((2, 5), 1.5))
    nan_a = torch.rand(2, 5)
    nan_a[1, 1] = float("nan")
    with pytest.raises(ValueError, match="activations contains non-finite"):
        r(votes, nan_a)


# ----------------------------------------------------------------------------- layers


def _conv_layer(t, c, k, s, lam=0.5, iterations=3, seed=0):
    layer = ConvMatCaps(t, c, k, s, iterations,
                        routing_kwargs={"inverse_temperature": lam, "schedule": "linear"}).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * 0.5)
        layer.routing.beta_u.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.routing.beta_a.copy_(torch.randn(c, generator=g, dtype=torch.float64) + 5)
    return layer


@pytest.mark.parametrize("h,w,k,s", [(5, 5, 3, 1), (5, 5, 3, 2), (6, 5, 3, 2), (4, 4, 2, 1)])
def test_conv_matcaps_matches_loop_reference_with_cross_window_normalisation(h, w, k, s):
    b, t, c = 1, 2, 2
    layer = _conv_layer(t, c, k, s)
    poses = torch.randn(b, t, h, w, 16, dtype=torch.float64)
    acts = torch.rand(b, t, h, w, dtype=torch.float64)
    out = layer(poses, acts)
    mu, a, r = conv_em_loop(poses, acts, layer.weight.detach(), layer.routing.beta_u.detach(),
                            layer.routing.beta_a.detach(), k, s, layer.routing.lambdas)
    torch.testing.assert_close(out.poses, mu, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.activations, a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.couplings, r, rtol=1e-9, atol=1e-10)


def test_conv_matcaps_uses_the_scaled_activation_bias():
    h, w, k, s = 5, 5, 3, 2
    layer = ConvMatCaps(2, 2, k, s, 3, routing_kwargs={
        "inverse_temperature": 0.5, "schedule": "linear", "beta_a_scale": 4.0}).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * 0.5)
        layer.routing.beta_u.copy_(torch.randn(2, generator=g, dtype=torch.float64))
        layer.routing.beta_a.copy_(torch.randn(2, generator=g, dtype=torch.float64) + 1)
    poses = torch.randn(1, 2, h, w, 16, dtype=torch.float64)
    acts = torch.rand(1, 2, h, w, dtype=torch.float64)
    out = layer(poses, acts)
    mu, a, r = conv_em_loop(poses, acts, layer.weight.detach(), layer.routing.beta_u.detach(),
                            4.0 * layer.routing.beta_a.detach(), k, s, layer.routing.lambdas)
    torch.testing.assert_close(out.activations, a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.poses, mu, rtol=1e-9, atol=1e-10)


def _child_sums(couplings, h, w, k, s):
    """Sum each child's couplings over every (window, parent type): (B, H*W, T)."""
    b, l_n, kk, t, c = couplings.shape
    idx = window_index(h, w, k, s).reshape(-1)
    per_slot = couplings.sum(-1).reshape(b, l_n * kk, t)  # over parent types in a window
    return torch.zeros(b, h * w, t, dtype=couplings.dtype).index_add(1, idx, per_slot), idx


def test_conv_couplings_sum_to_one_over_all_parents_a_child_reaches():
    h, w, k, s = 7, 6, 3, 2
    layer = _conv_layer(3, 4, k, s)
    poses = torch.randn(2, 3, h, w, 16, dtype=torch.float64)
    out = layer(poses, torch.rand(2, 3, h, w, dtype=torch.float64))
    sums, idx = _child_sums(out.couplings, h, w, k, s)
    reached = torch.zeros(h * w, dtype=torch.bool)
    reached[idx] = True
    torch.testing.assert_close(sums[:, reached], torch.ones_like(sums[:, reached]))
    # with W = 6, K = 3, s = 2 the last column (5) lies outside every window
    assert (~reached).sum() == h and (sums[:, ~reached] == 0).all()
    # the per-window (patch-by-patch) normalisation bug would make every window sum to 1:
    per_window = out.couplings.sum(-1)  # (B, L, KK, T)
    assert not torch.allclose(per_window, torch.ones_like(per_window))
    # and a child reached by n windows starts with 1 / (n C) per parent
    init = _conv_layer(3, 4, k, s, iterations=1)(torch.randn(1, 3, h, w, 16, dtype=torch.float64),
                                                 torch.rand(1, 3, h, w, dtype=torch.float64))
    counts = torch.bincount(idx, minlength=h * w).double()  # windows covering each position
    expect = (1.0 / (counts[idx] * 4)).view(1, -1, k * k, 1, 1).expand_as(init.couplings)
    torch.testing.assert_close(init.couplings, expect)


def test_conv_matcaps_single_window_equals_dense_em_routing():
    # one window covering the whole grid: the conv layer is plain EM routing over K*K*T children
    t, c, k = 2, 3, 3
    layer = _conv_layer(t, c, k, 1)
    poses = torch.randn(2, t, k, k, 16, dtype=torch.float64)
    acts = torch.rand(2, t, k, k, dtype=torch.float64)
    out = layer(poses, acts)
    idx = window_index(k, k, k, 1)
    votes = layer.votes(poses, idx)[:, 0].transpose(1, 2)  # (B, N, C, 16)
    a_in = acts.permute(0, 2, 3, 1).reshape(2, -1)  # children ordered (k, t)
    dense = EMRouting(3, num_parents=c, inverse_temperature=0.5, schedule="linear").double()
    dense.load_state_dict(layer.routing.state_dict())
    ref = dense(votes, a_in)
    torch.testing.assert_close(out.poses[:, :, 0, 0], ref.poses)
    torch.testing.assert_close(out.activations[:, :, 0, 0], ref.activations)
    torch.testing.assert_close(out.couplings[:, 0].reshape(2, -1, c), ref.couplings)


def test_conv_votes_match_matrix_products():
    layer = _conv_layer(2, 3, 3, 2)
    poses = torch.randn(1, 2, 5, 5, 16, dtype=torch.float64)
    idx = window_index(5, 5, 3, 2)
    v = layer.votes(poses, idx)  # (B, L, C, KK*T, 16)
    for oy in range(2):
        for ox in range(2):
            for ky in range(3):
                for kx in range(3):
                    for t in range(2):
                        m = poses[0, t, oy * 2 + ky, ox * 2 + kx].view(4, 4)
                        for c in range(3):
                            want = (m @ layer.weight[ky * 3 + kx, t, c]).reshape(16)
                            got = v[0, oy * 2 + ox, c, (ky * 3 + kx) * 2 + t]
                            torch.testing.assert_close(got, want)


def test_conv_matcaps_gradcheck():
    layer = _conv_layer(1, 2, 2, 1, iterations=2)
    poses = torch.randn(1, 1, 3, 3, 16, dtype=torch.float64, requires_grad=True)
    acts = (torch.rand(1, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)

    def f(p, a):
        out = layer(p, a)
        return out.poses, out.activations, out.couplings

    assert torch.autograd.gradcheck(f, (poses, acts), fast_mode=True)


def test_conv_matcaps_bad_input():
    layer = ConvMatCaps(2, 3, 3, 2)
    with pytest.raises(ValueError, match=r"ConvMatCaps poses must have shape \(B, 2, H, W, 16\)"):
        layer(torch.randn(1, 3, 5, 5, 16), torch.rand(1, 3, 5, 5))
    with pytest.raises(ValueError, match="ConvMatCaps activations must have shape"):
        layer(torch.randn(1, 2, 5, 5, 16), torch.rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        layer(torch.randn(1, 2, 2, 5, 16), torch.rand(1, 2, 2, 5))
    p = torch.randn(1, 2, 5, 5, 16)
    p[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(p, torch.rand(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"activations must lie in \[0, 1\]"):
        layer(torch.randn(1, 2, 5, 5, 16), torch.rand(1, 2, 5, 5) - 1)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        ConvMatCaps(2, 3, 3, 0)


def test_primary_matcaps_groups_16_channels_at_one_position():
    layer = PrimaryMatCaps(5, num_types=3).double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    out = layer(x)
    assert out.poses.shape == (2, 3, 4, 6, 16) and out.activations.shape == (2, 3, 4, 6)
    wp = layer.pose.weight.view(3 * 16, 5)
    wa = layer.activation.weight.view(3, 5)
    for t in range(3):
        for hh in (0, 3):
            for ww in (1, 5):
                rows = slice(t * 16, (t + 1) * 16)
                want = wp[rows] @ x[1, :, hh, ww] + layer.pose.bias[rows]
                torch.testing.assert_close(out.poses[1, t, hh, ww], want)
                a = torch.sigmoid(wa[t] @ x[1, :, hh, ww] + layer.activation.bias[t])
                torch.testing.assert_close(out.activations[1, t, hh, ww], a)


def test_class_matcaps_votes_add_coordinates_to_right_hand_column():
    layer = ClassMatCaps(2, 3, receptive_field=(8.5, 4.0, 28, 28)).double()
    poses = torch.randn(1, 2, 3, 3, 16, dtype=torch.float64)
    v = layer.votes(poses)  # (B, T*H*W, J, 16)
    for t in range(2):
        for hh in range(3):
            for ww in range(3):
                for j in range(3):
                    want = poses[0, t, hh, ww].view(4, 4) @ layer.weight[t, j]
                    want = want.clone()
                    want[0, 3] += (8.5 + 4 * hh) / 28  # row -> first element of column 4
                    want[1, 3] += (8.5 + 4 * ww) / 28  # column -> second element
                    torch.testing.assert_close(v[0, t * 9 + hh * 3 + ww, j], want.reshape(16))
    plain = ClassMatCaps(2, 3, coord_addition=False).double()
    plain.load_state_dict(layer.state_dict())
    diff = (v - plain.votes(poses))[0, :, 0]  # only elements 3 and 7 change
    assert torch.count_nonzero(diff[:, [0, 1, 2, 4, 5, 6] + list(range(8, 16))]) == 0
    assert (diff[:, 3] > 0).all() and (diff[:, 7] > 0).all()
    default = ClassMatCaps(2, 3)
    rows, cols = default.coordinates(3, 4)
    torch.testing.assert_close(rows, torch.tensor([1 / 6, 1 / 2, 5 / 6]))
    torch.testing.assert_close(cols, torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_class_matcaps_routes_with_em():
    layer = ClassMatCaps(2, 4).double()
    poses = torch.randn(2, 2, 3, 3, 16, dtype=torch.float64)
    acts = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    out = layer(poses, acts)
    ref = layer.routing(layer.votes(poses), acts.flatten(1))
    torch.testing.assert_close(out.poses, ref.poses)
    assert out.poses.shape == (2, 4, 16) and out.couplings.shape == (2, 18, 4)
    torch.testing.assert_close(out.couplings.sum(2), torch.ones(2, 18, dtype=torch.float64))


# ----------------------------------------------------------------------------- spread loss


def spread_loss_loop(acts, labels, m):
    total = 0.0
    for b in range(acts.shape[0]):
        t = int(labels[b])
        for i in range(acts.shape[1]):
            if i != t:
                total += max(0.0, m - (float(acts[b, t]) - float(acts[b, i]))) ** 2
    return total / acts.shape[0]


@pytest.mark.parametrize("m", [0.2, 0.55, 0.9])
def test_spread_loss_matches_loop_reference(m):
    acts = torch.rand(5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (5,))
    got = spread_loss(acts, labels, m)
    assert float(got) == pytest.approx(spread_loss_loop(acts, labels, m), rel=1e-12)
    assert float(spread_loss(acts, labels, torch.tensor(m, dtype=torch.float64))) == pytest.approx(
        float(got))
    # the target never penalises itself; a wide enough gap gives zero loss
    perfect = torch.zeros(2, 4, dtype=torch.float64)
    perfect[0, 1] = perfect[1, 3] = 1.0
    assert float(spread_loss(perfect, torch.tensor([1, 3]), 0.9)) == 0.0


def test_spread_loss_bad_input():
    a = torch.rand(3, 4)
    with pytest.raises(TypeError, match="integer class indices"):
        spread_loss(a, torch.tensor([0.0, 1.0, 2.0]), 0.2)
    with pytest.raises(ValueError, match="targets must lie in"):
        spread_loss(a, torch.tensor([0, 1, 4]), 0.2)
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        spread_loss(a, torch.tensor([0, 1]), 0.2)
    with pytest.raises(ValueError, match="activations must have 2 dimensions"):
        spread_loss(torch.rand(3), torch.tensor([0, 1, 2]), 0.2)


# ----------------------------------------------------------------------------- model


def test_em_capsnet_parameter_count():
    m = torchcaps.create_model("em_capsnet")
    assert isinstance(m, EMCapsNet)
    # 832 conv + 17,952 primary + 2 x (147,456 W + 64 betas) + (5,120 W + 20 betas)
    assert sum(p.numel() for p in m.parameters()) == 318_964
    norb = EMCapsNet(in_shape=(1, 32, 32), num_classes=5)  # the paper's "310K" configuration
    assert sum(p.numel() for p in norb.parameters()) == 316_394
    assert "em_capsnet" in torchcaps.list_models()


def test_em_capsnet_forward_backward_every_parameter_gets_a_gradient():
    m = EMCapsNet().train()
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([3, 7])
    out = m(x, y)
    assert out.logits.shape == (2, 10) and out.poses.shape == (2, 10, 16)
    assert out.couplings.shape == (2, 32 * 3 * 3, 10)
    assert ((out.logits > 0) & (out.logits < 1)).all()
    loss, parts = m.loss(out, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and set(parts) == {"spread", "margin"}
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    assert int(m.step) == 1


def test_em_capsnet_margin_anneals_inside_the_model():
    m = EMCapsNet(conv_channels=4, primary_types=2, caps1_types=2, caps2_types=2,
                  margin_steps=2, reconstruction=True)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    margins = []
    m.train()
    for _ in range(4):
        out = m(x, y)
        loss, parts = m.loss(out, x, y)
        margins.append(float(parts["margin"]))
        assert "reconstruction" in parts and out.reconstruction.shape == x.shape
    assert margins == pytest.approx([0.2, 0.55, 0.9, 0.9])
    m.eval()
    with torch.no_grad():
        m(x)
    assert int(m.step) == 4  # evaluation does not advance the schedule
    assert "step" in m.state_dict()  # the schedule survives a checkpoint


def test_em_capsnet_passes_beta_a_scale_to_every_routed_layer():
    m = EMCapsNet(conv_channels=4, primary_types=2, caps1_types=2, caps2_types=2,
                  beta_a_scale=5000.0)
    assert [layer.routing.beta_a_scale for layer in (m.caps1, m.caps2, m.classes)] == [5000.0] * 3
    assert EMCapsNet(conv_channels=4, primary_types=2, caps1_types=2,
                     caps2_types=2).classes.routing.beta_a_scale == 1.0  # Procedure 1


def test_em_capsnet_bad_input():
    m = EMCapsNet(conv_channels=4, primary_types=2, caps1_types=2, caps2_types=2)
    with pytest.raises(ValueError, match="images must have shape"):
        m(torch.rand(2, 1, 29, 28))
    with pytest.raises(ValueError, match="too small"):
        EMCapsNet(in_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="margin_steps must be a positive integer"):
        EMCapsNet(margin_steps=0)


# ----------------------------------------------------------------------------- fast paths
# em_routing has three code paths: no gradient (no_grad / inference_mode), the custom
# autograd Function (gradients for the votes assembled from rank-one factors) and plain
# autograd (used under torch.compile). They must agree with each other and the loop reference.

LAMS = [0.3, 0.6, 1.0]


def _em_inputs(seed, shape=(2, 7, 4, 5), spread=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    b, i, j, _ = shape
    votes = torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset
    acts = torch.rand(b, i, generator=g, dtype=torch.float64) * 0.8 + 0.1
    bu = torch.randn(j, generator=g, dtype=torch.float64)
    ba = torch.randn(j, generator=g, dtype=torch.float64) + 2
    return votes, acts, bu, ba


def _plain_autograd(monkeypatch):
    """Force the plain-autograd path of em_routing (the one torch.compile traces)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_em_paths_match_loop_reference():
    votes, acts, bu, ba = _em_inputs(0)
    ref = em_routing_loop(votes, acts, bu, ba, LAMS)
    with torch.no_grad():
        no_grad = em_routing(votes, acts, bu, ba, LAMS)
    with torch.inference_mode():
        inference = em_routing(votes, acts, bu, ba, LAMS)
    fast = em_routing(votes.requires_grad_(True), acts, bu, ba, LAMS)
    assert type(fast[1].grad_fn).__name__ == "FactoredRoutingBackward"  # custom gradient path
    for out in (no_grad, inference, fast):
        for got, want in zip(out, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _em_grads(inputs, weights):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = em_routing(*leaves, LAMS)
    sum(((o * w).sum() for o, w in zip(outs, weights, strict=True))).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_em_custom_gradient_matches_plain_autograd(monkeypatch, offset):
    inputs = _em_inputs(1, offset=offset)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(s, generator=g, dtype=torch.float64)
               for s in ((2, 4, 5), (2, 7, 4), (2, 4))]  # weights of mu, R, a in the loss
    fast = _em_grads(inputs, weights)
    _plain_autograd(monkeypatch)
    plain = _em_grads(inputs, weights)
    for got, want in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        assert want.abs().max() > 1e-6  # every input gets a real gradient


def test_em_custom_gradient_supports_retain_graph():
    votes, acts, bu, ba = _em_inputs(3)
    votes.requires_grad_(True)
    mu, r, a = em_routing(votes, acts, bu, ba, LAMS)
    loss = mu.sum() + (r * r).sum() + a.sum()
    loss.backward(retain_graph=True)
    once = votes.grad.clone()
    loss.backward()
    torch.testing.assert_close(votes.grad, 2 * once)
    # without retain_graph the saved votes are freed, as for any autograd function
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_em_large_common_vote_offset_stays_accurate_in_float32():
    # votes 1e4 away from the origin with a spread of 0.5: E[V^2] - mu^2 without centring
    # would lose every digit of the variance in float32 (ulp(1e8) = 8)
    votes, acts, bu, ba = _em_inputs(4, shape=(2, 9, 3, 16), spread=0.5, offset=1e4)
    votes = votes.float().double()  # the float32 values, exactly
    lams = [0.02, 0.05, 0.1]  # activations not saturated
    mu, r, a = em_routing_loop(votes, acts, bu, ba, lams)
    assert ((a > 0.05) & (a < 0.95)).any()
    f32 = [x.float() for x in (votes, acts, bu, ba)]
    with torch.no_grad():
        paths = [em_routing(*f32, lams)]
    paths.append(em_routing(f32[0].requires_grad_(True), *f32[1:], lams))
    for got_mu, got_r, got_a in paths:
        torch.testing.assert_close(got_mu.double(), mu, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(got_r.double(), r, rtol=0, atol=1e-4)
        torch.testing.assert_close(got_a.double(), a, rtol=0, atol=1e-4)


def test_conv_matcaps_custom_gradient_matches_plain_autograd(monkeypatch):
    layer = _conv_layer(2, 3, 2, 1)
    g = torch.Generator().manual_seed(6)
    poses = torch.randn(2, 2, 4, 3, 16, generator=g, dtype=torch.float64)
    acts = torch.rand(2, 2, 4, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1

    def grads():
        layer.zero_grad()
        p, a = poses.clone().requires_grad_(True), acts.clone().requires_grad_(True)
        out = layer(p, a)
        w = torch.arange(out.poses.numel(), dtype=torch.float64).view_as(out.poses).cos()
        ((out.poses * w).sum() + out.activations.sum() + out.couplings.square().sum()).backward()
        return [p.grad, a.grad] + [q.grad.clone() for q in layer.parameters()]

    fast = grads()
    _plain_autograd(monkeypatch)
    plain = grads()
    for got, want in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_em_gradient_assembled_in_chunks_and_in_the_votes_layout(monkeypatch):
    """The votes' gradient is assembled chunk by chunk of the leading axis, into a tensor
    laid out like the votes given (a permuted view of a vote product in ConvMatCaps)."""
    import torchcaps.routing._factored as factored

    inputs = _em_inputs(4, shape=(5, 7, 4, 5))
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(s, generator=g, dtype=torch.float64)
               for s in ((5, 4, 5), (5, 7, 4), (5, 4))]
    whole = _em_grads(inputs, weights)
    monkeypatch.setattr(factored, "CHUNK_BYTES", 1)  # one row of the leading axis at a time
    chunked = _em_grads(inputs, weights)
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # votes given as a permuted view: the gradient has the view's strides
    base = inputs[0].permute(2, 0, 1, 3).contiguous().requires_grad_(True)  # (J, B, I, D)
    votes = base.permute(1, 2, 0, 3)  # (B, I, J, D) view
    votes.retain_grad()
    outs = em_routing(votes, *inputs[1:], LAMS)
    sum(((o * w).sum() for o, w in zip(outs, weights, strict=True))).backward()
    assert base.grad.is_contiguous()
    torch.testing.assert_close(votes.grad, whole[0], rtol=1e-9, atol=1e-12)


def test_conv_matcaps_forward_and_gradient_unchanged_by_chunking(monkeypatch):
    import torchcaps.routing._factored as factored

    torch.manual_seed(0)
    layer = ConvMatCaps(2, 3, kernel_size=3, stride=1).double()
    poses = torch.randn(2, 2, 5, 5, 16, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(2, 2, 5, 5, dtype=torch.float64)

    def run():
        poses.grad = None
        out = layer(poses, acts)
        (out.poses.square().sum() + out.activations.sum()).backward()
        return poses.grad.clone()

    whole = run()
    monkeypatch.setattr(factored, "CHUNK_BYTES", 1)
    torch.testing.assert_close(run(), whole, rtol=1e-12, atol=1e-14)
