import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import dynamic_routing_autograd, dynamic_routing_loop
from torchcaps.routing import DynamicRouting, create_routing, dynamic_routing, list_routings
from torchcaps.testing import assert_rejects_bad_votes


def votes64(b=2, i=5, j=3, d=4, scale=1.0):
    return torch.randn(b, i, j, d, dtype=torch.float64) * scale


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("leaky", [False, True])
def test_dynamic_matches_loop_reference(iterations, leaky):
    u = votes64(scale=2.0)
    out = DynamicRouting(iterations, leaky=leaky)(u)
    v_ref, c_ref = dynamic_routing_loop(u, iterations, leaky=leaky)
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)


def test_dynamic_bias_matches_loop_reference():
    u = votes64()
    r = DynamicRouting(3, num_parents=3, parent_dim=4, bias=True).double()
    with torch.no_grad():
        r.bias.copy_(torch.randn(3, 4))
    v_ref, _ = dynamic_routing_loop(u, 3, bias=r.bias.detach())
    torch.testing.assert_close(r(u).poses, v_ref, rtol=1e-10, atol=1e-12)


def test_couplings_sum_to_one_over_parents_not_children():
    out = DynamicRouting(3)(votes64(3, 11, 7, 4, scale=3.0))
    sums = out.couplings.sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # regression for the "softmax over the wrong axis" bug: over children they must NOT sum to 1
    assert not torch.allclose(out.couplings.sum(dim=1), torch.ones(3, 7, dtype=torch.float64))


def test_softmax_axis_regression_detects_wrong_axis():
    """A routing that normalises over children gives different poses from the reference."""
    u = votes64(2, 6, 3, 4, scale=3.0)
    v_ref, _ = dynamic_routing_loop(u, 3)
    # the buggy variant, written out: softmax over i (children)
    logits = torch.zeros(2, 6, 3, dtype=torch.float64)
    from torchcaps.functional import squash

    for _ in range(3):
        c = torch.softmax(logits, dim=1)
        v = squash(torch.einsum("bij,bijd->bjd", c, u))
        logits = logits + torch.einsum("bijd,bjd->bij", u, v)
    assert not torch.allclose(v, v_ref, atol=1e-3)
    torch.testing.assert_close(DynamicRouting(3)(u).poses, v_ref)


def test_leaky_couplings_sum_below_one():
    c = DynamicRouting(3, leaky=True)(votes64()).couplings.sum(dim=2)
    assert (c < 1).all() and (c > 0).all()


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), i=st.integers(1, 9), j=st.integers(1, 5), d=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_permuting_children_leaves_parents_unchanged(b, i, j, d, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, i, j, d, dtype=torch.float64, generator=g)
    perm = torch.randperm(i, generator=g)
    r = DynamicRouting(3)
    a, p = r(u), r(u[:, perm])
    torch.testing.assert_close(a.poses, p.poses)
    torch.testing.assert_close(a.couplings[:, perm], p.couplings)
    assert (a.poses.norm(dim=-1) < 1).all()


def test_dynamic_gradcheck():
    u = votes64(1, 4, 3, 3).requires_grad_(True)
    r = DynamicRouting(3, leaky=True)
    assert torch.autograd.gradcheck(lambda x: r(x).poses, (u,))


def test_detach_inner_only_last_iteration_carries_gradient():
    u = votes64(1, 4, 3, 3).requires_grad_(True)
    g_full = torch.autograd.grad(DynamicRouting(3)(u).poses.sum(), u)[0]
    g_det = torch.autograd.grad(DynamicRouting(3, detach_inner=True)(u).poses.sum(), u)[0]
    assert not torch.allclose(g_full, g_det)
    # with detach_inner the couplings act as constants: gradient equals that of the last pass
    out = DynamicRouting(3)(u)
    c = out.couplings.detach()
    from torchcaps.functional import squash

    g_last = torch.autograd.grad(squash(torch.einsum("bij,bijd->bjd", c, u)).sum(), u)[0]
    torch.testing.assert_close(g_det, g_last)
    # forward values are identical either way
    torch.testing.assert_close(DynamicRouting(3, detach_inner=True)(u).poses, out.poses)


def test_registry():
    assert "dynamic" in list_routings()
    r = create_routing("dynamic", iterations=2)
    assert isinstance(r, DynamicRouting) and r.iterations == 2
    with pytest.raises(KeyError, match="unknown routing algorithm 'dynamc'; did you mean 'dynamic'"):
        create_routing("dynamc")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_iterations(bad):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        DynamicRouting(bad)


def test_bad_votes():
    assert_rejects_bad_votes(DynamicRouting(3, num_parents=3, parent_dim=4, bias=True), 3, 4)
    bad = torch.randn(2, 5, 3, 4)
    bad[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        DynamicRouting(3, num_parents=3, parent_dim=4)(bad)
    with pytest.raises(ValueError, match="bias=True needs"):
        DynamicRouting(3, bias=True)


def test_finite_check_survives_overflowing_sum():
    # finite values whose sum overflows must not be reported as non-finite
    u = torch.full((1, 4, 1, 2), 3e38)
    DynamicRouting(1)(u)


# ---------------------------------------------------------------- the one call form


def _any_routing(name, j=3, d=4):
    kw = {"cluster_size": 2} if name == "cluster" else {}
    r = create_routing(name, num_parents=j, parent_dim=d, **kw).double()
    shape = (2, 5, j, 2 * d) if name == "cluster" else (2, 5, j, d)
    return r, torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", list_routings())
def test_every_routing_takes_the_same_call(name):
    from torchcaps.routing import RoutingContext

    r, votes = _any_routing(name)
    a = r(votes)
    acts = torch.rand(2, 5, dtype=torch.float64) if r.uses_activations else None
    for out in (r(votes, None, None), r(votes, activations=None, context=RoutingContext())):
        torch.testing.assert_close(out.poses, a.poses, rtol=0, atol=0)
        torch.testing.assert_close(out.couplings, a.couplings, rtol=0, atol=0)
    # child norms are information: only scaled-distance routing reads them
    norms = torch.rand(2, 5, dtype=torch.float64)
    b = r(votes, acts, RoutingContext(child_norms=norms))
    assert b.poses.shape == a.poses.shape and torch.isfinite(b.poses).all()
    if "child_norms" not in r.reads and acts is None:
        torch.testing.assert_close(b.poses, a.poses, rtol=0, atol=0)


def test_requests_are_refused_not_dropped():
    from torchcaps.routing import UnsupportedRoutingError

    r, votes = _any_routing("dynamic")
    with pytest.raises(UnsupportedRoutingError, match="'dynamic' routing cannot honour this call "
                       r"\(unsupported\): child activations were given"):
        r(votes, torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(UnsupportedRoutingError, match="cannot start from given parent poses"):
        r(votes, poses=torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(UnsupportedRoutingError, match="cannot take a coupling normaliser"):
        r(votes, normalize=lambda x: torch.softmax(x, -1))
    em, votes = _any_routing("em")
    with pytest.raises(UnsupportedRoutingError, match="'em' routing cannot honour"):
        em(votes, poses=torch.zeros(2, 3, 4, dtype=torch.float64))


def test_context_keywords_are_checked():
    from torchcaps.routing import RoutingContext

    r, votes = _any_routing("scaled_distance")
    n = torch.rand(2, 5, dtype=torch.float64)
    torch.testing.assert_close(r(votes, child_norms=n).poses,
                               r(votes, context=RoutingContext(child_norms=n)).poses)
    with pytest.raises(TypeError, match="unknown routing context field"):
        r(votes, child_norm=n)
    with pytest.raises(TypeError, match="given twice"):
        r(votes, context=RoutingContext(child_norms=n), child_norms=n)
    with pytest.raises(TypeError, match="context must be a RoutingContext"):
        r(votes, None, {"child_norms": n})


@pytest.mark.parametrize("name", ["em", "vb"])
def test_softmax_normaliser_equals_the_default(name):
    r, votes = _any_routing(name)
    acts = torch.rand(2, 5, dtype=torch.float64)
    a = r(votes, acts)
    b = r(votes, acts, normalize=lambda x: torch.softmax(x, dim=-1))
    torch.testing.assert_close(b.poses, a.poses)
    torch.testing.assert_close(b.couplings, a.couplings)
    torch.testing.assert_close(b.activations, a.activations)


def test_routing_options_lists_constructor_options():
    from torchcaps.routing import routing_options

    assert {"iterations", "bias", "leaky"} <= routing_options("dynamic")
    assert "iterations" not in routing_options("cluster")
    assert "logits" in routing_options("em") and "logits" in routing_options("vb")
    with pytest.raises(KeyError, match="unknown routing"):
        routing_options("dynamc")


def test_caps_linear_makes_a_cluster_of_votes_per_pair():
    from torchcaps.layers import CapsLinear
    from torchcaps.routing import cluster_route

    layer = CapsLinear(5, 3, 4, 6, "cluster", {"cluster_size": 3}).double()
    assert layer.votes_per_pair == 3 and layer.weight.shape == (5, 4, 18, 3)
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    out = layer(u)
    votes = torch.einsum("bik,ijdk->bijd", u, layer.weight).unflatten(-1, (3, 6))
    poses, weights = cluster_route(votes)
    torch.testing.assert_close(out.poses, poses)
    torch.testing.assert_close(out.couplings, weights.mean(-1))
    with pytest.raises(ValueError, match="cluster_size"):
        CapsLinear(5, 3, 4, 6, "cluster")


@pytest.mark.parametrize("leaky,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_dynamic_routing_in_chunks_equals_one_pass(monkeypatch, leaky, bias, iterations):
    """Without autograd on a CPU the batch is routed in cache-sized chunks: same result."""
    import torchcaps.routing.dynamic as dyn

    r = DynamicRouting(iterations, num_parents=3, parent_dim=4, bias=bias, leaky=leaky).double()
    if bias:
        with torch.no_grad():
            r.bias.copy_(torch.randn(3, 4))
    u = votes64(7, 5, 3, 4, scale=2.0)
    whole = r(u)
    per_sample = 5 * 3 * 4 * 8
    monkeypatch.setattr(dyn, "CHUNK_BYTES", 2 * per_sample // torch.get_num_threads())
    with torch.no_grad():
        chunked = r(u)
    torch.testing.assert_close(chunked.poses, whole.poses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.couplings, whole.couplings, rtol=1e-12, atol=1e-14)
    v_ref, c_ref = dynamic_routing_loop(u, iterations, leaky=leaky,
                                        bias=r.bias.detach() if bias else None)
    torch.testing.assert_close(chunked.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.couplings, c_ref, rtol=1e-10, atol=1e-12)


def test_dynamic_routing_reports_non_finite_votes_in_any_chunk(monkeypatch):
    import torchcaps.routing.dynamic as dyn

    monkeypatch.setattr(dyn, "CHUNK_BYTES", 1)
    u = votes64(4, 5, 3, 4)
    u[3, 4, 2, 1] = float("nan")
    u[2, 0, 0, 0] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match=r"votes contains non-finite values "
                                        r"\(1 NaN, 1 Inf\)"):
        DynamicRouting(3)(u)
    with pytest.raises(ValueError, match=r"\(1 NaN, 1 Inf\)"):
        DynamicRouting(3)(u.requires_grad_(True))


def test_autograd_reference_matches_loop_reference():
    u = votes64(2, 6, 3, 4, scale=2.0)
    bias = torch.randn(3, 4, dtype=torch.float64)
    for leaky in (False, True):
        v, c = dynamic_routing_autograd(u, 3, bias=bias, leaky=leaky)
        v_ref, c_ref = dynamic_routing_loop(u, 3, bias=bias, leaky=leaky)
        torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("leaky,bias,detach_inner", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, True),
    (False, True, True)])
@pytest.mark.parametrize("chunks", [False, True])
def test_dynamic_backward_matches_autograd_reference(monkeypatch, iterations, leaky, bias,
                                                     detach_inner, chunks):
    """The hand-written backward gives autograd's gradients for the votes and the bias,
    through poses and couplings, in one pass or in cache-sized chunks."""
    import torchcaps.routing.dynamic as dyn

    if chunks:
        monkeypatch.setattr(dyn, "CHUNK_BYTES", 2 * 6 * 3 * 4 * 8 // torch.get_num_threads())
    g = torch.Generator().manual_seed(iterations)
    # parent-major memory, as CapsLinear makes the votes
    u = (torch.randn(5, 3, 6, 4, dtype=torch.float64, generator=g) * 2).transpose(1, 2)
    u.requires_grad_(True)
    r = DynamicRouting(iterations, num_parents=3, parent_dim=4, bias=bias, leaky=leaky,
                       detach_inner=detach_inner).double()
    if bias:
        with torch.no_grad():
            r.bias.copy_(torch.randn(3, 4, generator=g))
    params = [u, r.bias] if bias else [u]
    out = r(u)
    v_ref, c_ref = dynamic_routing_autograd(u, iterations, r.bias, leaky, detach_inner)
    w_v = torch.randn(v_ref.shape, dtype=torch.float64, generator=g)
    w_c = torch.randn(c_ref.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((out.poses * w_v).sum() + (out.couplings * w_c).sum(), params)
    want = torch.autograd.grad((v_ref * w_v).sum() + (c_ref * w_c).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # only through the poses (no gradient reaches the couplings)
    got = torch.autograd.grad((r(u).poses * w_v).sum(), u)[0]
    want = torch.autograd.grad((dynamic_routing_autograd(u, iterations, r.bias, leaky,
                                                         detach_inner)[0] * w_v).sum(), u)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dynamic_gradcheck_bias_and_couplings():
    u = votes64(2, 4, 3, 3).requires_grad_(True)
    bias = torch.full((3, 3), 0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: dynamic_routing(x, b, 3), (u, bias))


def test_dynamic_routing_under_autocast_trains():
    """Mixed precision takes plain autograd (which follows autocast's casts)."""
    u = torch.randn(2, 5, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DynamicRouting(3)(u)
    out.poses.float().sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("scale", [0.0, 1e-5, 1.0, 100.0])
def test_squash_gradient_of_the_routing_backward_equals_autograd(scale):
    from torchcaps.functional import squash
    from torchcaps.routing.dynamic import _squash_vjp

    s = torch.randn(20, 7, dtype=torch.float64) * scale
    s[0] = 0.0
    s.requires_grad_(True)
    g = torch.randn(20, 7, dtype=torch.float64)
    want = torch.autograd.grad(squash(s), s, g)[0]
    got = _squash_vjp(s.detach(), g)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
