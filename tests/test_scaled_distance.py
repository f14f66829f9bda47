"""Scaled-distance-agreement routing (Peer et al.; Gugglberger, Peer, Rodriguez-Sanchez 2021)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcaps.layers import CapsLinear
from torchcaps.routing import create_routing, list_routings
from torchcaps.routing.scaled_distance import ScaledDistanceRouting, clip_votes
from torchcaps.testing import assert_rejects_bad_votes

# ---------------------------------------------------------------- loop reference (float64)


def _norm(x):
    return math.sqrt(sum(float(e) ** 2 for e in x))


def _squash(s, eps=1e-8):
    sq = sum(float(e) ** 2 for e in s)
    return s * (sq / (1.0 + sq) / math.sqrt(sq + eps))


def sda_loop(votes, iterations=2, child_norms=None, bias=None, p=0.9, rho=0.5,
             mean_over="sample", eps=1e-12):
    """S1-S6 (see routing/scaled_distance.py) with explicit loops over b, i, j."""
    votes = votes.clone()
    b_n, i_n, j_n, d_n = votes.shape
    if child_norms is not None:  # S1: |u_hat_ij| <= |u_i|
        for b in range(b_n):
            for i in range(i_n):
                for j in range(j_n):
                    n_v, n_u = _norm(votes[b, i, j]), float(child_norms[b, i])
                    if n_v > n_u:
                        votes[b, i, j] = votes[b, i, j] * (n_u / n_v)
    logits = torch.zeros(b_n, i_n, j_n, dtype=votes.dtype)
    for it in range(iterations):
        c = torch.zeros_like(logits)
        for b in range(b_n):
            for i in range(i_n):
                row = [float(logits[b, i, j]) for j in range(j_n)]
                m = max(row)
                ex = [math.exp(x - m) for x in row]
                for j in range(j_n):
                    c[b, i, j] = ex[j] / sum(ex)  # S2, softmax over parents
        v = torch.zeros(b_n, j_n, d_n, dtype=votes.dtype)
        for b in range(b_n):
            for j in range(j_n):
                s = torch.zeros(d_n, dtype=votes.dtype)
                for i in range(i_n):
                    s += c[b, i, j] * votes[b, i, j]  # S3
                if bias is not None:
                    s = s + bias[j]
                v[b, j] = _squash(s)  # S4
        if it < iterations - 1 and j_n > 1:
            d = torch.zeros_like(logits)
            for b in range(b_n):
                for i in range(i_n):
                    for j in range(j_n):
                        d[b, i, j] = _norm(v[b, j] - votes[b, i, j])  # S5
            for b in range(b_n):
                if mean_over == "sample":
                    d_o = sum(float(x) for x in d[b].flatten()) / (i_n * j_n)
                else:
                    d_o = sum(float(x) for x in d.flatten()) / d.numel()
                d_o = max(d_o, eps)
                d_p = rho * d_o
                t = math.log(p * (j_n - 1) / (1 - p)) / (d_p - d_o)  # S6, as in the authors' code
                for i in range(i_n):
                    for j in range(j_n):
                        logits[b, i, j] = t * float(d[b, i, j])  # replaced, not accumulated
    return v, c


def votes64(b=2, i=5, j=3, d=4, scale=1.0):
    return torch.randn(b, i, j, d, dtype=torch.float64) * scale


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("mean_over", ["sample", "batch"])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_loop_reference(iterations, mean_over, clip):
    u = votes64(3, 5, 4, 3, scale=0.7)
    norms = torch.rand(3, 5, dtype=torch.float64) if clip else None
    r = ScaledDistanceRouting(iterations, mean_over=mean_over)
    out = r(u, child_norms=norms)
    v_ref, c_ref = sda_loop(u, iterations, child_norms=norms, mean_over=mean_over)
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)
    assert out.activations is None


def test_bias_matches_loop_reference_and_defaults_to_authors_init():
    r = ScaledDistanceRouting(3, num_parents=4, parent_dim=3, bias=True).double()
    torch.testing.assert_close(r.bias.detach(), torch.full((4, 3), 0.1, dtype=torch.float64))
    with torch.no_grad():
        r.bias.copy_(torch.randn(4, 3))
    u = votes64(2, 5, 4, 3)
    v_ref, c_ref = sda_loop(u, 3, bias=r.bias.detach())
    out = r(u)
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)


def test_scale_t_gives_the_target_coupling():
    """A vote at d_p = rho d_o, with its J-1 siblings at d_o, gets coupling exactly p."""
    # J = 3 parents at the origin. Child 0 votes at distances (1, 2, 2), child 1 at (7/3,) * 3:
    # the mean distance is d_o = 2, so child 0's short vote sits at d_p = 0.5 d_o = 1.
    poses = torch.zeros(1, 3, 2, dtype=torch.float64)
    unit = torch.tensor([0.6, 0.8], dtype=torch.float64)
    child0 = torch.stack([unit * 1.0, unit * 2.0, -unit * 2.0])
    child1 = torch.stack([unit, -unit, unit.flip(0)]) * (7 / 3)
    votes = torch.stack([child0, child1]).unsqueeze(0)  # (1, 2, 3, 2)
    r = ScaledDistanceRouting(2)
    c = torch.softmax(r.logits(votes, poses), dim=2)
    torch.testing.assert_close(c[0, 0], torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64))
    torch.testing.assert_close(c[0, 1], torch.full((3,), 1 / 3, dtype=torch.float64))
    c7 = torch.softmax(ScaledDistanceRouting(2, target_coupling=0.7).logits(votes, poses), 2)
    torch.testing.assert_close(c7[0, 0], torch.tensor([0.7, 0.15, 0.15], dtype=torch.float64))
    c_rho = torch.softmax(ScaledDistanceRouting(2, distance_ratio=0.25).logits(votes, poses), 2)
    assert not torch.allclose(c_rho[0, 0], c[0, 0])


def test_logits_are_replaced_not_accumulated():
    """Iteration 3 uses only the distances to iteration 2's poses (unlike dynamic routing)."""
    u = votes64(2, 6, 3, 4)
    r = ScaledDistanceRouting(3)
    v2 = ScaledDistanceRouting(2)(u).poses
    c3 = torch.softmax(r.logits(u, v2), dim=2)
    torch.testing.assert_close(r(u).couplings, c3)


def test_clip_votes():
    u = votes64(2, 4, 3, 5, scale=3.0)
    n = torch.rand(2, 4, dtype=torch.float64)
    n[0, 0] = 100.0  # long enough: child 0's votes are left alone
    n[1, 1] = 0.0  # zero-length child: its votes vanish
    c = clip_votes(u, n)
    lengths = c.norm(dim=-1)
    assert (lengths <= n.unsqueeze(-1) + 1e-12).all()
    torch.testing.assert_close(c[0, 0], u[0, 0])
    torch.testing.assert_close(c[1, 1], torch.zeros_like(c[1, 1]))
    # directions are unchanged
    cos = torch.nn.functional.cosine_similarity(c[0, 1:], u[0, 1:], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    # clipped votes route differently from unclipped ones
    r = ScaledDistanceRouting(2)
    assert not torch.allclose(r(u, child_norms=n).poses, r(u).poses)


def test_couplings_sum_to_one_over_parents_not_children():
    out = ScaledDistanceRouting(3)(votes64(3, 11, 7, 4, scale=2.0))
    assert ScaledDistanceRouting.normalized_axis == 2
    sums = out.couplings.sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(out.couplings.sum(dim=1), torch.ones(3, 7, dtype=torch.float64))
    assert (out.poses.norm(dim=-1) < 1).all()


def test_softmax_over_children_would_differ():
    u = votes64(2, 6, 3, 4, scale=2.0)
    v_ref, _ = sda_loop(u, 2)
    from torchcaps.functional import squash

    r = ScaledDistanceRouting(2)
    v1 = squash(u.mean(dim=1))
    wrong = squash(torch.einsum("bij,bijd->bjd", torch.softmax(r.logits(u, v1), dim=1), u))
    assert not torch.allclose(wrong, v_ref, atol=1e-3)
    torch.testing.assert_close(r(u).poses, v_ref)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), i=st.integers(1, 9), j=st.integers(1, 5), d=st.integers(1, 6),
       mean_over=st.sampled_from(["sample", "batch"]), seed=st.integers(0, 2**16))
def test_permuting_children_leaves_parents_unchanged(b, i, j, d, mean_over, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, i, j, d, dtype=torch.float64, generator=g)
    n = torch.rand(b, i, dtype=torch.float64, generator=g) * 2
    perm = torch.randperm(i, generator=g)
    r = ScaledDistanceRouting(3, mean_over=mean_over)
    a, p = r(u, child_norms=n), r(u[:, perm], child_norms=n[:, perm])
    torch.testing.assert_close(a.poses, p.poses)
    torch.testing.assert_close(a.couplings[:, perm], p.couplings)


def test_mean_over_sample_is_batch_independent_batch_is_not():
    u = votes64(3, 6, 4, 3)
    other = u.clone()
    other[1:] = other[1:] * 5.0  # change the rest of the batch
    per_sample = ScaledDistanceRouting(2, mean_over="sample")
    torch.testing.assert_close(per_sample(u).poses[0], per_sample(other).poses[0])
    batch = ScaledDistanceRouting(2, mean_over="batch")
    assert not torch.allclose(batch(u).poses[0], batch(other).poses[0])


def test_one_parent_and_one_iteration():
    u = votes64(2, 5, 1, 3)
    out = ScaledDistanceRouting(3)(u)
    torch.testing.assert_close(out.couplings, torch.ones(2, 5, 1, dtype=torch.float64))
    out1 = ScaledDistanceRouting(1)(votes64(2, 5, 3, 3))
    torch.testing.assert_close(out1.couplings, torch.full((2, 5, 3), 1 / 3, dtype=torch.float64))


# ---------------------------------------------------------------- gradients


def test_gradcheck():
    u = votes64(1, 4, 3, 3).requires_grad_(True)
    n = (torch.rand(1, 4, dtype=torch.float64) + 0.2).requires_grad_(True)
    r = ScaledDistanceRouting(3, num_parents=3, parent_dim=3, bias=True).double()
    assert torch.autograd.gradcheck(lambda x, m: r(x, child_norms=m).poses, (u, n))
    assert torch.autograd.gradcheck(lambda x: r(x).couplings, (u,))
    rb = ScaledDistanceRouting(2, mean_over="batch")
    assert torch.autograd.gradcheck(lambda x: rb(x).poses, (votes64(2, 3, 2, 2).requires_grad_(),))


def test_finite_gradients_at_degenerate_inputs():
    cases = [
        (torch.zeros(2, 4, 3, 4), None),  # all votes zero -> d_o = 0
        (torch.randn(2, 4, 3, 4), torch.zeros(2, 4)),  # zero-length children
        (torch.randn(2, 4, 3, 4) * 100, torch.rand(2, 4)),
        (torch.ones(2, 4, 3, 4), None),  # every vote identical
    ]
    for u, n in cases:
        u = u.clone().requires_grad_(True)
        r = ScaledDistanceRouting(3, num_parents=3, parent_dim=4, bias=True)
        out = r(u, child_norms=n)
        assert torch.isfinite(out.poses).all() and torch.isfinite(out.couplings).all()
        (out.poses.square().sum() + out.couplings.sum()).backward()
        assert torch.isfinite(u.grad).all() and torch.isfinite(r.bias.grad).all()


def test_detach_inner_only_changes_gradients():
    u = votes64(1, 4, 3, 3).requires_grad_(True)
    full, det = ScaledDistanceRouting(3), ScaledDistanceRouting(3, detach_inner=True)
    torch.testing.assert_close(full(u).poses, det(u).poses)
    g_full = torch.autograd.grad(full(u).poses.sum(), u)[0]
    g_det = torch.autograd.grad(det(u).poses.sum(), u)[0]
    assert not torch.allclose(g_full, g_det)
    from torchcaps.functional import squash

    c = det(u).couplings.detach()
    g_last = torch.autograd.grad(squash(torch.einsum("bij,bijd->bjd", c, u)).sum(), u)[0]
    torch.testing.assert_close(g_det, g_last)


# ---------------------------------------------------------------- interface and bad input


def test_registry_and_caps_linear():
    assert "scaled_distance" in list_routings()
    r = create_routing("scaled_distance", iterations=3, mean_over="batch")
    assert isinstance(r, ScaledDistanceRouting) and r.iterations == 3
    assert ScaledDistanceRouting().iterations == 2  # the paper's default
    layer = CapsLinear(6, 8, 4, 5, routing="scaled_distance", routing_kwargs={"bias": True})
    out = layer(torch.randn(2, 6, 8))
    assert out.poses.shape == (2, 4, 5) and layer.routing.bias.shape == (4, 5)
    assert "mean_over='sample'" in repr(r.__class__())


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_iterations(bad):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        ScaledDistanceRouting(bad)


def test_bad_options():
    with pytest.raises(ValueError, match="target_coupling must lie in"):
        ScaledDistanceRouting(target_coupling=1.0)
    with pytest.raises(ValueError, match="distance_ratio must lie in"):
        ScaledDistanceRouting(distance_ratio=1.0)
    with pytest.raises(ValueError, match="mean_over must be"):
        ScaledDistanceRouting(mean_over="epoch")
    with pytest.raises(ValueError, match="bias=True needs"):
        ScaledDistanceRouting(bias=True)
    with pytest.raises(ValueError, match="eps must be positive"):
        ScaledDistanceRouting(eps=0.0)
    with pytest.raises(ValueError, match=r"target_coupling must exceed 1/J = 0.25"):
        ScaledDistanceRouting(num_parents=4, target_coupling=0.2)
    with pytest.raises(ValueError, match=r"target_coupling must exceed 1/J = 0.5"):
        ScaledDistanceRouting(target_coupling=0.5)(torch.randn(1, 3, 2, 2))


def test_bad_votes_and_child_norms():
    r = ScaledDistanceRouting(2, num_parents=3, parent_dim=4)
    assert_rejects_bad_votes(r, 3, 4)
    u = torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"child_norms must have shape \(2, 5\)"):
        r(u, child_norms=torch.rand(2, 4))
    with pytest.raises(ValueError, match="child_norms must be non-negative"):
        r(u, child_norms=-torch.rand(2, 5))
    with pytest.raises(ValueError, match="child_norms contains non-finite"):
        r(u, child_norms=torch.full((2, 5), float("nan")))
