"""Inverted dot-product attention routing (Tsai et al. 2020) and the ida_capsnet model."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchcaps
from torchcaps.models.inverted_attention import (
    InvertedAttentionCapsNet,
    InvertedCapsFC,
    InvertedCapsStack,
)
from torchcaps.routing import create_routing, list_routings
from torchcaps.routing.inverted_attention import InvertedAttentionRouting
from torchcaps.testing import assert_rejects_bad_votes, overfit_tiny_batch

# ---------------------------------------------------------------- loop references (float64)


def layer_norm_loop(s, gain=None, bias=None, eps=1e-5):
    """LayerNorm of one pose vector, written out (biased variance, as nn.LayerNorm)."""
    d = s.shape[0]
    if d == 1:
        return s.clone()
    mean = sum(float(x) for x in s) / d
    var = sum((float(x) - mean) ** 2 for x in s) / d
    out = torch.empty_like(s)
    for k in range(d):
        y = (float(s[k]) - mean) / math.sqrt(var + eps)
        if gain is not None:
            y = y * float(gain[k]) + float(bias[k])
        out[k] = y
    return out


def ida_loop(votes, iterations, poses=None, scale=True, gain=None, bias=None, eps=1e-5):
    """Procedure 1 of Tsai et al. with explicit loops over b, i, j; p_j = 0 means uniform."""
    b_n, i_n, j_n, d_n = votes.shape
    p = None if poses is None else poses.clone()
    for _ in range(iterations):
        c = torch.zeros(b_n, i_n, j_n, dtype=votes.dtype)
        for b in range(b_n):
            for i in range(i_n):
                if p is None:
                    row = [0.0] * j_n
                else:
                    row = [float(p[b, j] @ votes[b, i, j]) for j in range(j_n)]  # Eq. 2
                    if scale:
                        row = [a / math.sqrt(d_n) for a in row]
                m = max(row)
                ex = [math.exp(a - m) for a in row]
                z = sum(ex)
                for j in range(j_n):
                    c[b, i, j] = ex[j] / z  # Eq. 3, softmax over parents
        new = torch.zeros(b_n, j_n, d_n, dtype=votes.dtype)
        for b in range(b_n):
            for j in range(j_n):
                s = torch.zeros(d_n, dtype=votes.dtype)
                for i in range(i_n):
                    s += c[b, i, j] * votes[b, i, j]  # (4)
                new[b, j] = layer_norm_loop(s, gain, bias, eps)  # (5)
        p = new
    return p, c


def matrix_votes_loop(u, w):
    """V_ij = P_i @ W_ij for 4x4 poses: u (B, I, 16), w (I, J, 4, 4) -> (B, I, J, 16)."""
    b_n, i_n, _ = u.shape
    j_n = w.shape[1]
    out = torch.zeros(b_n, i_n, j_n, 16, dtype=u.dtype)
    for b in range(b_n):
        for i in range(i_n):
            pose = u[b, i].reshape(4, 4)
            for j in range(j_n):
                out[b, i, j] = (pose @ w[i, j]).reshape(16)
    return out


def vector_votes_loop(u, w):
    b_n, i_n, _ = u.shape
    j_n = w.shape[1]
    out = torch.zeros(b_n, i_n, j_n, w.shape[2], dtype=u.dtype)
    for b in range(b_n):
        for i in range(i_n):
            for j in range(j_n):
                out[b, i, j] = w[i, j] @ u[b, i]
    return out


def votes64(b=2, i=5, j=3, d=4, scale=1.0):
    return torch.randn(b, i, j, d, dtype=torch.float64) * scale


def affine_routing(iterations, j, d, **kw):
    r = InvertedAttentionRouting(iterations, num_parents=j, parent_dim=d, **kw).double()
    with torch.no_grad():
        r.norm.weight.copy_(torch.rand(d) + 0.5)
        r.norm.bias.copy_(torch.randn(d))
    return r


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [True, False])
def test_matches_loop_reference(iterations, scale):
    u = votes64(2, 5, 3, 4, scale=2.0)
    r = affine_routing(iterations, 3, 4, scale=scale)
    out = r(u)
    p_ref, c_ref = ida_loop(u, iterations, scale=scale, gain=r.norm.weight.detach(),
                            bias=r.norm.bias.detach())
    torch.testing.assert_close(out.poses, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)
    assert out.activations is None


def test_parameter_free_layernorm_without_parent_dim():
    u = votes64(2, 6, 4, 5)
    out = create_routing("inverted_attention", iterations=3)(u)
    p_ref, c_ref = ida_loop(u, 3)
    torch.testing.assert_close(out.poses, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)
    # parameter-free LayerNorm: every pose has mean 0 and (biased) variance ~1
    torch.testing.assert_close(out.poses.mean(-1), torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(out.poses.var(-1, unbiased=False),
                               torch.ones(2, 4, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert len(list(InvertedAttentionRouting(2).parameters())) == 0
    assert len(list(InvertedAttentionRouting(2, parent_dim=5).parameters())) == 2
    assert len(list(InvertedAttentionRouting(2, parent_dim=5, affine=False).parameters())) == 0


def test_initial_poses_match_loop_reference():
    u, p0 = votes64(2, 5, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64)
    r = affine_routing(2, 3, 4)
    out = r(u, poses=p0)
    p_ref, c_ref = ida_loop(u, 2, poses=p0, gain=r.norm.weight.detach(), bias=r.norm.bias.detach())
    torch.testing.assert_close(out.poses, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)


def test_first_iteration_is_uniform_and_later_ones_are_not():
    u = votes64(2, 7, 4, 4, scale=3.0)
    c1 = InvertedAttentionRouting(1)(u).couplings
    torch.testing.assert_close(c1, torch.full_like(c1, 0.25))
    c2 = InvertedAttentionRouting(2)(u).couplings
    assert (c2 - 0.25).abs().max() > 1e-3


def test_scale_option_is_one_over_sqrt_d():
    """scale=True equals scale=False with the parent poses divided by sqrt(D) in Eq. 2."""
    u, p0 = votes64(2, 5, 3, 9), torch.randn(2, 3, 9, dtype=torch.float64)
    scaled = InvertedAttentionRouting(1, scale=True)(u, poses=p0)
    plain = InvertedAttentionRouting(1, scale=False)(u, poses=p0 / 3.0)
    torch.testing.assert_close(scaled.poses, plain.poses)
    torch.testing.assert_close(scaled.couplings, plain.couplings)
    other = InvertedAttentionRouting(1, scale=False)(u, poses=p0)
    assert not torch.allclose(other.couplings, scaled.couplings)


def test_couplings_sum_to_one_over_parents_not_children():
    out = InvertedAttentionRouting(3)(votes64(3, 11, 7, 4, scale=3.0))
    assert InvertedAttentionRouting.normalized_axis == 2
    sums = out.couplings.sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(out.couplings.sum(dim=1), torch.ones(3, 7, dtype=torch.float64))
    assert (out.couplings > 0).all()


def test_softmax_over_children_would_differ():
    """The wrong axis (children) gives different poses: the reference test can fail."""
    u = votes64(2, 6, 3, 4, scale=3.0)
    p_ref, _ = ida_loop(u, 2, scale=False)
    s = torch.einsum("bij,bijd->bjd", torch.full((2, 6, 3), 1 / 3, dtype=torch.float64), u)
    p = torch.nn.functional.layer_norm(s, (4,))
    c = torch.softmax(torch.einsum("bijd,bjd->bij", u, p), dim=1)  # wrong axis
    wrong = torch.nn.functional.layer_norm(torch.einsum("bij,bijd->bjd", c, u), (4,))
    assert not torch.allclose(wrong, p_ref, atol=1e-3)
    torch.testing.assert_close(InvertedAttentionRouting(2, scale=False)(u).poses, p_ref)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), i=st.integers(1, 9), j=st.integers(1, 5), d=st.integers(2, 6),
       it=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_permuting_children_leaves_parents_unchanged(b, i, j, d, it, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, i, j, d, dtype=torch.float64, generator=g)
    perm = torch.randperm(i, generator=g)
    r = InvertedAttentionRouting(it)
    a, p = r(u), r(u[:, perm])
    torch.testing.assert_close(a.poses, p.poses)
    torch.testing.assert_close(a.couplings[:, perm], p.couplings)


def test_gradcheck_votes_poses_and_layernorm():
    u = votes64(1, 4, 3, 3).requires_grad_(True)
    p0 = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    r = affine_routing(3, 3, 3)
    assert torch.autograd.gradcheck(lambda x, p: r(x, poses=p).poses, (u, p0))
    assert torch.autograd.gradcheck(lambda x: r(x).couplings, (u,))
    g, bta = r.norm.weight, r.norm.bias
    assert torch.autograd.gradcheck(
        lambda w, bb: torch.nn.functional.layer_norm(
            torch.einsum("bij,bijd->bjd", r(u).couplings, u), (3,), w, bb), (g, bta))


def test_finite_gradients_including_zero_votes():
    for u in (torch.zeros(2, 4, 3, 4, requires_grad=True),
              (torch.randn(2, 4, 3, 4) * 50).requires_grad_(True)):
        r = InvertedAttentionRouting(3, num_parents=3, parent_dim=4)
        out = r(u)
        (out.poses.square().sum() + out.couplings.sum()).backward()
        assert torch.isfinite(u.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in r.parameters())


def test_registry_and_options():
    assert "inverted_attention" in list_routings()
    r = create_routing("inverted_attention", iterations=3, num_parents=4, parent_dim=16)
    assert isinstance(r, InvertedAttentionRouting) and r.iterations == 3
    assert r.norm.normalized_shape == (16,)
    assert "iterations=3" in repr(r)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_iterations(bad):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        InvertedAttentionRouting(bad)


def test_bad_input():
    r = InvertedAttentionRouting(2, num_parents=3, parent_dim=4)
    assert_rejects_bad_votes(r, 3, 4)
    with pytest.raises(ValueError, match=r"poses must have shape \(2, 3, 4\)"):
        r(torch.randn(2, 5, 3, 4), poses=torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="poses contains non-finite"):
        r(torch.randn(2, 5, 3, 4), poses=torch.full((2, 3, 4), float("inf")))
    with pytest.raises(ValueError, match="parent_dim must be a positive integer"):
        InvertedAttentionRouting(2, parent_dim=0)
    with pytest.raises(ValueError, match="eps must be positive"):
        InvertedAttentionRouting(2, eps=0.0)


# ---------------------------------------------------------------- capsule layers


def test_matrix_and_vector_votes_match_loops():
    torch.manual_seed(1)
    m = InvertedCapsFC(5, 3, 16, pose="matrix").double()
    u = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(m.votes(u), matrix_votes_loop(u, m.weight.detach()))
    assert m.weight.shape == (5, 3, 4, 4)
    v = InvertedCapsFC(5, 3, 6, in_dim=4, pose="vector").double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(v.votes(x), vector_votes_loop(x, v.weight.detach()))
    assert v.weight.shape == (5, 3, 6, 4)
    # the matrix product order matters: W_ij P_i would differ
    wrong = torch.einsum("ijax,bixe->bijae", m.weight, u.reshape(2, 5, 4, 4)).reshape(2, 5, 3, 16)
    assert not torch.allclose(wrong, m.votes(u))


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="matrix poses need"):
        InvertedCapsFC(4, 3, 12, pose="matrix")
    with pytest.raises(ValueError, match="matrix poses need"):
        InvertedCapsFC(4, 3, 16, in_dim=9, pose="matrix")
    with pytest.raises(ValueError, match="pose must be one of"):
        InvertedCapsFC(4, 3, 16, pose="quaternion")
    with pytest.raises(ValueError, match="in_caps must be a positive integer"):
        InvertedCapsFC(0, 3)
    with pytest.raises(ValueError, match=r"InvertedCapsFC input must have shape \(B, 4, 16\)"):
        InvertedCapsFC(4, 3)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="routing_mode must be one of"):
        InvertedCapsStack(4, [3], mode="parallel")
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        InvertedCapsStack(4, [3], iterations=0)


def _stack(mode, pose="matrix", iterations=2, sizes=(5, 3)):
    torch.manual_seed(3)
    return InvertedCapsStack(6, list(sizes), 16, pose, iterations, mode).double()


def _affine_loop_step(layer, x, p):
    r = layer.routing
    v = layer.votes(x).detach()
    return ida_loop(v, 1, poses=p, gain=r.norm.weight.detach(), bias=r.norm.bias.detach())


@pytest.mark.parametrize("pose", ["matrix", "vector"])
def test_concurrent_and_sequential_match_their_definitions(pose):
    u = torch.randn(2, 6, 16, dtype=torch.float64)
    stack = _stack("concurrent", pose, iterations=3)
    with torch.no_grad():
        for layer in stack.layers:
            layer.routing.norm.weight.copy_(torch.rand(16) + 0.5)
            layer.routing.norm.bias.copy_(torch.randn(16))
        l1, l2 = stack.layers
        # concurrent, written out: iteration 1 a uniform pass, then Jacobi-style updates
        p1, _ = _affine_loop_step(l1, u, None)
        p2, _ = _affine_loop_step(l2, p1, None)
        for _ in range(2):
            q1, _ = _affine_loop_step(l1, u, p1)
            q2, c2 = _affine_loop_step(l2, p1, p2)  # uses layer 1's OLD poses
            p1, p2 = q1, q2
        poses, couplings = stack(u)
    torch.testing.assert_close(poses[0], p1, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(poses[1], p2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(couplings, c2, rtol=1e-9, atol=1e-11)
    # sequential, written out: layer 1 fully routed, then layer 2 from its final poses
    stack.mode = "sequential"
    with torch.no_grad():
        s1, _ = ida_loop(l1.votes(u), 3, gain=l1.routing.norm.weight, bias=l1.routing.norm.bias)
        s2, sc = ida_loop(l2.votes(s1), 3, gain=l2.routing.norm.weight,
                          bias=l2.routing.norm.bias)
        poses, couplings = stack(u)
    torch.testing.assert_close(poses[1], s2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(couplings, sc, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(s2, p2, atol=1e-4)


def test_modes_agree_for_one_layer_or_one_iteration():
    u = torch.randn(2, 6, 16, dtype=torch.float64)
    for sizes, iterations in (((3,), 3), ((5, 3), 1)):
        a, b = _stack("sequential", iterations=iterations, sizes=sizes), _stack(
            "concurrent", iterations=iterations, sizes=sizes)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(u)[0][-1], b(u)[0][-1])


# ---------------------------------------------------------------- model


def test_model_is_registered_and_parameter_count_documented():
    assert "ida_capsnet" in torchcaps.list_models()
    m = torchcaps.create_model("ida_capsnet")
    assert isinstance(m, InvertedAttentionCapsNet)
    count = sum(p.numel() for p in m.parameters())
    assert count == 165_073  # documented in models/inverted_attention.py
    v = torchcaps.create_model("ida_capsnet", pose="vector")
    assert sum(p.numel() for p in v.parameters()) == 694_993
    assert count < 1_000_000 and 694_993 < 1_000_000
    assert m.caps.layers[0].in_caps == 128 and m.iterations == 2
    assert m.routing_mode == "concurrent"


@pytest.mark.parametrize("pose", ["matrix", "vector"])
@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_model_forward_backward_every_parameter_gets_gradient(pose, mode):
    m = torchcaps.create_model("ida_capsnet", pose=pose, routing_mode=mode).train()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    out = m(x, y)
    assert out.logits.shape == (3, 10) and out.poses.shape == (3, 10, 16)
    assert out.couplings.shape == (3, 16, 10) and out.reconstruction is None
    torch.testing.assert_close(out.couplings.sum(2), torch.ones(3, 16))
    loss, parts = m.loss(out, x, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, y))
    assert set(parts) == {"cross_entropy"} and not parts["cross_entropy"].requires_grad
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_model_sequential_and_concurrent_differ():
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(0)
    seq = torchcaps.create_model("ida_capsnet", routing_mode="sequential").eval()
    con = torchcaps.create_model("ida_capsnet", routing_mode="concurrent").eval()
    con.load_state_dict(seq.state_dict())
    with torch.no_grad():
        a, b = seq(x).logits, con(x).logits
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-5)


def test_model_other_shapes_and_bad_arguments():
    m = torchcaps.create_model("ida_capsnet", in_shape=(3, 32, 32), num_classes=5,
                               hidden_caps=(8, 6), iterations=3)
    out = m(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 5) and out.couplings.shape == (2, 6, 5)
    assert len(m.caps.layers) == 3
    with pytest.raises(ValueError, match="pose must be one of"):
        torchcaps.create_model("ida_capsnet", pose="quaternion")
    with pytest.raises(ValueError, match="routing_mode must be one of"):
        torchcaps.create_model("ida_capsnet", routing_mode="parallel")
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        torchcaps.create_model("ida_capsnet", iterations=0)
    with pytest.raises(ValueError, match="images must have shape"):
        m(torch.rand(2, 1, 32, 32))


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    loss, acc = overfit_tiny_batch(torchcaps.create_model("ida_capsnet"), steps=40, lr=3e-3)
    assert loss < 0.1 and acc == 1.0
