"""Residual capsule stacks and the res_capsnet model (Gugglberger, Peer, Rodriguez-Sanchez 2021)."""

import pytest
import torch

from reference import dynamic_routing_loop, squash_loop, votes_loop
from torchcaps.functional import squash
from torchcaps.layers.residual import CapsStack, residual_pairs
from torchcaps.models.res_capsnet import ResCapsNet, res_capsnet


def tiny_stack(depth=5, skip=2, routing="dynamic", out=(3, 4), hidden=(4, 3), seed=0, **kw):
    """A float64 stack 5 x 3D -> hidden -> out with random (non-default) biases."""
    torch.manual_seed(seed)
    s = CapsStack(5, 3, out[0], out[1], depth=depth, hidden_caps=hidden[0],
                  hidden_dim=hidden[1], skip=skip, routing=routing, init_std=0.5, **kw).double()
    with torch.no_grad():
        for name, p in s.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return s


def u64(b=2, i=5, k=3):
    return torch.randn(b, i, k, dtype=torch.float64)


# ---------------------------------------------------------------- loop reference (float64)


def stack_loop(u, weights, biases, iterations, skip, shortcut="output", resquash=False):
    """R1-R3 of layers/residual.py: explicit loops over layers, and over b, i, j inside them."""
    routed, summed = [], []
    x = u
    for l, (w, b) in enumerate(zip(weights, biases)):
        o, _ = dynamic_routing_loop(votes_loop(x, w), iterations, bias=b)
        x = o
        if skip and l >= skip and l % skip == 0 and routed[l - skip].shape == o.shape:
            x = o + (routed[l - skip] if shortcut == "output" else summed[l - skip])
            if resquash:
                x = squash_loop(x)
        routed.append(o)
        summed.append(x)
    return x


@pytest.mark.parametrize("depth,skip", [(0, 0), (1, 0), (3, 2), (5, 2), (6, 3), (4, 1), (5, 0)])
@pytest.mark.parametrize("shortcut", ["output", "stream"])
@pytest.mark.parametrize("resquash", [False, True])
def test_stack_matches_loop_reference(depth, skip, shortcut, resquash):
    s = tiny_stack(depth, skip, shortcut=shortcut, resquash=resquash)
    u = u64()
    weights = [layer.weight.detach() for layer in s.layers]
    biases = [layer.routing.bias.detach() for layer in s.layers]
    ref = stack_loop(u, weights, biases, 2, skip, shortcut, resquash)
    torch.testing.assert_close(s(u).poses, ref, rtol=1e-10, atol=1e-12)


def test_stack_matches_explicit_capslinear_calls_depth5_skip2():
    """Written out by hand: the authors add the routed output o_{l-2}, not x_{l-2}."""
    s = tiny_stack(5, 2)
    f = s.layers
    u = u64()
    o0 = f[0](u).poses
    o1 = f[1](o0).poses
    o2 = f[2](o1).poses
    x2 = o2 + o0
    o3 = f[3](x2).poses
    o4 = f[4](o3).poses
    x4 = o4 + o2  # "output" shortcut: o_2, without o_0
    out = f[5](x4)
    got = s(u)
    torch.testing.assert_close(got.poses, out.poses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.couplings, out.couplings, rtol=1e-12, atol=1e-14)
    xs, _ = s.forward_layers(u)
    assert len(xs) == 6
    torch.testing.assert_close(xs[4], x4, rtol=1e-12, atol=1e-14)

    s.shortcut = "stream"
    torch.testing.assert_close(s.forward_layers(u)[0][4], o4 + x2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("routing", ["scaled_distance", "em"])
def test_stack_passes_routing_specific_inputs(routing):
    """SDA gets the child norms (vote clip), EM the previous layer's parent activations."""
    s = tiny_stack(3, 2, routing=routing)
    f = s.layers
    u = u64()

    def call(layer, x, act):
        votes = layer.votes(x)
        if routing == "scaled_distance":
            return layer.routing(votes, child_norms=torch.linalg.vector_norm(x, dim=-1))
        return layer.routing(votes, act)

    r0 = call(f[0], u, None)
    r1 = call(f[1], r0.poses, r0.activations)
    r2 = call(f[2], r1.poses, r1.activations)
    r3 = call(f[3], r2.poses + r0.poses, r2.activations)
    torch.testing.assert_close(s(u).poses, r3.poses, rtol=1e-10, atol=1e-12)
    if routing == "scaled_distance":  # the clip matters: routing without it differs
        plain = f[3].routing(f[3].votes(r2.poses + r0.poses)).poses
        assert not torch.allclose(plain, r3.poses)


def test_residual_pairs_rule():
    h, o = (32, 8), (10, 16)
    assert residual_pairs([h] * 7 + [o], 2) == [(0, 2), (2, 4), (4, 6)]
    assert residual_pairs([h] * 6 + [o], 2) == [(0, 2), (2, 4)]  # layer 6 is the class layer
    assert residual_pairs([h] * 4 + [o], 2) == [(0, 2)]  # the class layer (4) differs: no add
    assert residual_pairs([h] * 6 + [o], 3) == [(0, 3)]
    assert residual_pairs([h] * 3 + [h], 3) == [(0, 3)]  # equal output shape: it gets one too
    assert residual_pairs([h] * 4 + [o], 1) == [(0, 1), (1, 2), (2, 3)]
    assert residual_pairs([h] * 4 + [o], 0) == residual_pairs([h] * 4 + [o], None) == []


def test_skips_change_the_output():
    u = u64()
    with_skip = tiny_stack(5, 2)
    without = tiny_stack(5, 0)
    without.load_state_dict(with_skip.state_dict())  # a shortcut adds no parameters
    assert not torch.allclose(with_skip(u).poses, without(u).poses)
    stream = tiny_stack(5, 2, shortcut="stream")
    stream.load_state_dict(with_skip.state_dict())
    assert not torch.allclose(with_skip(u).poses, stream(u).poses)


def test_gradcheck_tiny_stack():
    s = tiny_stack(3, 2, out=(2, 3), hidden=(3, 2))
    u = u64(b=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: s(x).poses, (u,), eps=1e-6, atol=1e-6)


def _first_layer_grad(routing, skip, shortcut, seed=0):
    """Gradient norm at the first capsule layer of a depth-9 stack, authors' init."""
    torch.manual_seed(seed)
    s = CapsStack(40, 8, 10, 16, depth=9, skip=skip, routing=routing, shortcut=shortcut)
    u = squash(torch.randn(4, 40, 8))  # primary-capsule-like input, lengths < 1
    lengths = torch.linalg.vector_norm(s(u).poses, dim=-1)  # (4, 10)
    lengths[torch.arange(4), torch.arange(4)].sum().backward()
    for name, p in s.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    return s, float(s.layers[0].weight.grad.norm())


@pytest.mark.parametrize("routing", ["dynamic", "scaled_distance"])
def test_gradient_reaches_first_layer_of_deep_stack(routing):
    """Depth 9: without shortcuts the first layer's gradient vanishes (~1e-14 for dynamic
    routing); the authors' shortcuts raise it by orders of magnitude, the ResNet-style
    ``stream`` shortcuts (an identity path) by more still."""
    s, plain = _first_layer_grad(routing, 0, "output")
    s, authors = _first_layer_grad(routing, 2, "output")
    _, stream = _first_layer_grad(routing, 2, "stream")
    assert [dst for _, dst in s.pairs] == [2, 4, 6, 8]
    assert authors > 0 and authors > 100 * plain
    assert stream > 10 * authors


def test_authors_initialisation_is_the_default():
    torch.manual_seed(0)
    s = CapsStack(288, 8, 10, 16, depth=3)
    w = s.layers[0].weight.detach()
    assert abs(float(w.std()) - 0.2) < 0.005 and abs(float(w.mean())) < 0.005
    r = s.layers[1].routing
    assert r.iterations == 2 and r.bias is not None and torch.all(r.bias == 0.1)
    # options the routing lacks are not forwarded; the caller's kwargs win
    em = CapsStack(6, 4, 3, 16, depth=1, skip=0, routing="em")
    assert em.layers[0].routing.iterations == 2 and "bias" not in em.routing_kwargs
    d3 = CapsStack(6, 4, 3, 4, depth=1, skip=0, routing_kwargs={"iterations": 3, "bias": False})
    assert d3.layers[0].routing.iterations == 3 and d3.layers[0].routing.bias is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(depth=-1), "depth must be an integer >= 0"),
        (dict(depth=1.5), "depth must be an integer >= 0"),
        (dict(depth=3, skip=4), "skip=4 does not fit a stack of 4 capsule layer"),
        (dict(depth=0, skip=1), "skip=1 does not fit a stack of 1 capsule layer"),
        (dict(depth=2, skip=2), "connects no two layers of equal shape"),
        (dict(depth=3, skip=-1), "skip must be a non-negative integer"),
        (dict(depth=3, skip=True), "skip must be a non-negative integer"),
        (dict(routing="dynamc"), "unknown routing 'dynamc'"),
        (dict(routing=None), "routing must be a registered routing name"),
        (dict(shortcut="sum"), "shortcut must be one of"),
        (dict(hidden_caps=0), "hidden_caps must be a positive integer"),
        (dict(init_std=0.0), "init_std must be positive"),
        (dict(routing_kwargs={"iterations": 0}), "iterations must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CapsStack(6, 4, 3, 5, **kwargs)


def test_bad_input():
    s = CapsStack(6, 4, 3, 5, depth=2, skip=1)
    with pytest.raises(ValueError, match="CapsStack input must have shape"):
        s(torch.randn(2, 7, 4))
    bad = torch.randn(2, 6, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        s(bad)


# ---------------------------------------------------------------- the model


def test_res_capsnet_parameter_count():
    m = res_capsnet()
    assert sum(p.numel() for p in m.parameters()) == 1_099_872
    assert m.caps.layers[0].in_caps == 288 and len(m.caps.layers) == 4
    hidden = 32 * 32 * 8 * 8 + 32 * 8  # W + routing bias of one 32x8 -> 32x8 layer
    deep = res_capsnet(depth=9)
    assert sum(p.numel() for p in deep.parameters()) == 1_099_872 + 6 * hidden
    # skips add no parameters
    assert sum(p.numel() for p in res_capsnet(depth=9, skip=0).parameters()) == 1_099_872 + 6 * hidden


@pytest.mark.parametrize("routing", ["dynamic", "scaled_distance", "em"])
def test_res_capsnet_every_routing_trains(routing):
    torch.manual_seed(0)
    m = res_capsnet(routing=routing, depth=3, conv_channels=16, primary_types=4)
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 3, 7])
    out = m(x, y)
    assert out.logits.shape == (3, 10) and out.couplings.shape == (3, 32, 10)
    torch.testing.assert_close(out.logits, torch.linalg.vector_norm(out.poses, dim=-1),
                               rtol=1e-5, atol=1e-5)
    loss, parts = m.loss(out, x, y)
    assert torch.isfinite(loss) and set(parts) == {"margin"}
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{routing}: {name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{routing}: non-finite gradient in {name}"


def test_res_capsnet_options_and_errors():
    m = res_capsnet(depth=1, skip=0, reconstruction=True, conv_channels=8, primary_types=2)
    x = torch.rand(2, 1, 28, 28)
    out = m.train()(x, torch.tensor([1, 2]))
    assert out.reconstruction.shape == x.shape
    assert set(m.loss(out, x, torch.tensor([1, 2]))[1]) == {"margin", "reconstruction"}
    with pytest.raises(ValueError, match="skip=2 does not fit a stack of 2 capsule layer"):
        res_capsnet(depth=1)  # the default skip=2 needs depth >= 3
    with pytest.raises(ValueError, match="too small"):
        ResCapsNet(in_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="unknown routing"):
        res_capsnet(routing="nope")


def test_res_capsnet_overfits_a_tiny_batch():
    torch.manual_seed(0)
    m = res_capsnet(depth=3, conv_channels=16, primary_types=4)
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 4
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss, _ = m.loss(m(x, y), x, y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    m.eval()
    assert loss.item() < 0.5 * first
    assert (m(x).logits.argmax(1) == y).float().mean() >= 0.75
