"""Locally-constrained (SegCaps) capsule layers: votes against loops, routing properties, errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from torchcaps._validate import NonFiniteValueError
from torchcaps.layers import (
    LocalConvCaps,
    LocalDeconvCaps,
    local_capsule_votes,
    local_capsule_votes_loop,
)
from torchcaps.layers.local import axis_geometry
from torchcaps.routing import DynamicRouting

T, D_IN, C, D_OUT = 3, 2, 2, 3


def _weight(transposed, share, k, n, g):
    groups = 1 if share else T
    shape = (groups * D_IN, C * D_OUT) if transposed else (groups * C * D_OUT, D_IN)
    return torch.randn(*shape, *(k,) * n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("n", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("stride", [1, 2])
def test_vectorised_votes_match_loop_in_float64(transposed, n, share, stride):
    g = torch.Generator().manual_seed(10 * n + stride + 2 * share + 5 * transposed)
    k = (4 if stride == 2 else 3) if transposed else (5 if n == 2 else 3)
    sizes = (4, 5) if n == 2 else (3, 4, 3)  # odd sizes exercise TF's asymmetric 'same'
    u = torch.randn(2, T, *sizes, D_IN, generator=g, dtype=torch.float64)
    w = _weight(transposed, share, k, n, g)
    kw = dict(transposed=transposed, share_weight=share)
    fast, size = local_capsule_votes(u, w, C, stride, None, **kw)
    loop, size_loop = local_capsule_votes_loop(u, w, C, stride, None, **kw)
    want = tuple(s * stride for s in sizes) if transposed else tuple(-(-s // stride) for s in sizes)
    assert size == size_loop == want
    assert fast.shape == (2 * len(torch.empty(want).flatten()), T, C, D_OUT)
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,op", [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 0, 0), (3, 3, None, 0)])
def test_deconv_explicit_padding_matches_loop(k, s, p, op):
    g = torch.Generator().manual_seed(k + s)
    u = torch.randn(1, T, 3, 4, D_IN, generator=g, dtype=torch.float64)
    w = _weight(True, False, k, 2, g)
    kw = dict(transposed=True, share_weight=False, output_padding=op)
    fast, size = local_capsule_votes(u, w, C, s, p, **kw)
    loop, size_loop = local_capsule_votes_loop(u, w, C, s, p, **kw)
    full = [(n - 1) * s + k for n in (3, 4)]
    assert size == size_loop == (tuple(n * s for n in (3, 4)) if p is None
                                 else tuple(f - 2 * p + op for f in full))
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)


def test_same_padding_follows_tensorflow():
    # conv 'same': ceil(n / s) outputs, the odd padding zero after (k=5, s=2, n=8: 1 before, 2 after)
    assert axis_geometry(8, 5, 2, None) == (1, 2, 4)
    assert axis_geometry(7, 5, 2, None) == (2, 2, 4)
    assert axis_geometry(9, 5, 1, None) == (2, 2, 9)
    # deconv 'same', SegCaps' kernel 4 stride 2: exactly doubles, PyTorch padding 1
    assert axis_geometry(8, 4, 2, None, transposed=True) == (1, 1, 16)
    assert axis_geometry(8, 3, 2, None, transposed=True) == (0, 1, 16)


def test_shared_votes_are_a_plain_convolution_of_each_child_type():
    """Independent of the layout code: type t's votes are F.conv2d of its own pose grid."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, T, 6, 5, D_IN, generator=g, dtype=torch.float64)
    w = _weight(False, True, 3, 2, g)
    votes, (ho, wo) = local_capsule_votes(u, w, C, 1, None)
    votes = votes.view(2, ho, wo, T, C, D_OUT)
    for t in range(T):
        ref = F.conv2d(u[:, t].permute(0, 3, 1, 2), w, padding=1)  # (B, C*D_OUT, H, W)
        torch.testing.assert_close(votes[:, :, :, t].reshape(2, ho, wo, C * D_OUT),
                                   ref.permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)


def _segcaps_routing(votes, bias, iterations, axis=-1):
    """The official update_routing in float64: logits (N, T, C), softmax over the LAST axis."""
    logits = votes.new_zeros(votes.shape[:3])
    for _ in range(iterations):
        route = torch.softmax(logits, dim=axis)  # official: -1, over parent types
        s = (route[..., None] * votes).sum(1) + bias  # (N, C, D)
        sq = (s * s).sum(-1, keepdim=True)
        v = s * sq / (1 + sq) / torch.sqrt(sq + 1e-8)
        logits = logits + (votes * v[:, None]).sum(-1)
    return v, route


def _layer(cls=LocalConvCaps, **kw):
    torch.manual_seed(0)
    kw = {"kernel_size": 3, **kw}
    return cls(T, D_IN, C, D_OUT, **kw).double()


@pytest.mark.parametrize("cls", [LocalConvCaps, LocalDeconvCaps])
def test_layer_routes_over_parent_types_like_the_official_code(cls):
    """Regression for the softmax axis: a softmax over child types fails this test."""
    layer = _layer(cls, routing_iterations=3)
    with torch.no_grad():
        layer.routing.bias.normal_()
    u = torch.randn(2, T, 3, 4, D_IN, dtype=torch.float64)
    out = layer(u)
    votes, size = layer.votes(u)
    poses, route = _segcaps_routing(votes, layer.routing.bias, 3)
    b = 2
    torch.testing.assert_close(out.poses, poses.view(b, *size, C, D_OUT).movedim(-2, 1))
    torch.testing.assert_close(out.couplings, route.view(b, -1, T, C))
    wrong, _ = _segcaps_routing(votes, layer.routing.bias, 3, axis=1)  # over child types
    assert not torch.allclose(poses, wrong, atol=1e-3)


@pytest.mark.parametrize("cls,n", [(LocalConvCaps, 2), (LocalDeconvCaps, 2), (LocalConvCaps, 3)])
def test_couplings_sum_to_one_over_parent_types(cls, n):
    layer = _layer(cls, spatial_dims=n, stride=2)
    u = torch.randn(2, T, *(4,) * n, D_IN, dtype=torch.float64)
    out = layer(u)
    L = out.poses[0, 0, ..., 0].numel()
    assert out.couplings.shape == (2, L, T, C)
    torch.testing.assert_close(out.couplings.sum(-1), torch.ones(2, L, T, dtype=torch.float64))
    assert not torch.allclose(out.couplings.sum(-2), torch.ones(2, L, C, dtype=torch.float64))
    assert (out.poses.norm(dim=-1) < 1).all()


@pytest.mark.parametrize("cls", [LocalConvCaps, LocalDeconvCaps])
def test_permuting_child_types_permutes_nothing_in_the_parents(cls):
    layer = _layer(cls)
    u = torch.randn(2, T, 4, 3, D_IN, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    a, b = layer(u), layer(u[:, perm])
    torch.testing.assert_close(a.poses, b.poses)
    torch.testing.assert_close(a.couplings[:, :, perm], b.couplings)


def test_parents_only_see_their_window():
    layer = _layer(kernel_size=3)
    u = torch.randn(1, T, 7, 7, D_IN, dtype=torch.float64)
    v = u.clone()
    v[:, :, 6, 6] += 5.0  # outside the 3x3 window of position (0..4, 0..4)
    a, b = layer(u).poses, layer(v).poses
    torch.testing.assert_close(a[:, :, :5, :5], b[:, :, :5, :5])
    assert not torch.allclose(a[:, :, 6, 6], b[:, :, 6, 6])


@pytest.mark.parametrize("cls,share", [(LocalConvCaps, True), (LocalConvCaps, False),
                                       (LocalDeconvCaps, True)])
def test_gradcheck_layer(cls, share):
    torch.manual_seed(0)
    layer = cls(2, 2, 2, 2, kernel_size=2 if cls is LocalDeconvCaps else 3, stride=2,
                routing_iterations=2, share_weight=share).double()
    u = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).poses, (u,))
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(
        layer, {"weight": w}, (u.detach(),)).poses, (layer.weight.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("cls,n", [(LocalConvCaps, 2), (LocalDeconvCaps, 3)])
def test_gradients_finite_and_reach_every_parameter(cls, n):
    layer = cls(T, D_IN, C, D_OUT, kernel_size=3, spatial_dims=n)
    for u in (torch.randn(2, T, *(3,) * n, D_IN), torch.zeros(2, T, *(3,) * n, D_IN)):
        layer.zero_grad()
        out = layer(u.requires_grad_())
        out.poses.norm(dim=-1).sum().backward()
        assert torch.isfinite(u.grad).all()
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_output_sizes_and_shapes():
    down = LocalConvCaps(1, 16, 2, 16, kernel_size=5, stride=2, routing_iterations=1)
    up = LocalDeconvCaps(2, 16, 4, 8)
    assert down.output_size(16, 10) == (8, 5) and up.output_size(8, 5) == (16, 10)
    out = up(down(torch.randn(2, 1, 16, 10, 16)).poses)
    assert out.poses.shape == (2, 4, 16, 10, 8) and out.couplings.shape == (2, 160, 2, 4)
    up3 = LocalDeconvCaps(2, 4, 3, 5, kernel_size=3, padding=1, output_padding=1, spatial_dims=3,
                          share_weight=False)
    assert up3(torch.randn(1, 2, 2, 3, 4, 4)).poses.shape == (1, 3, 4, 6, 8, 5)


def test_parameter_count_and_official_init():
    layer = LocalConvCaps(8, 32, 8, 64, kernel_size=5, stride=2)
    # official conv_cap_3_2: W (5, 5, 32, 8*64) + b (1, 1, 8, 64), independent of the 8 child types
    assert sum(p.numel() for p in layer.parameters()) == 5 * 5 * 32 * 8 * 64 + 8 * 64
    assert torch.all(layer.routing.bias == 0.1)
    std = (2 / (25 * 32)) ** 0.5
    assert layer.weight.abs().max() <= 2 * std and abs(layer.weight.std() / std - 0.88) < 0.05
    unshared = LocalConvCaps(8, 32, 8, 64, kernel_size=5, share_weight=False)
    assert unshared.weight.numel() == 8 * layer.weight.numel()
    deconv = LocalDeconvCaps(8, 32, 4, 16)
    assert deconv.weight.shape == (32, 64, 4, 4)


def test_routing_goes_through_the_registered_interface():
    layer = LocalConvCaps(T, D_IN, C, D_OUT, routing_iterations=2)
    assert isinstance(layer.routing, DynamicRouting) and layer.routing.iterations == 2
    calls = []
    layer.routing.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    layer(torch.randn(2, T, 4, 4, D_IN))
    assert calls == [torch.Size([2 * 16, T, C, D_OUT])]


def test_errors_are_clear():
    layer3d = LocalConvCaps(T, D_IN, C, D_OUT, spatial_dims=3)
    with pytest.raises(ValueError, match="is a 3D layer .* got a 2D capsule grid"):
        layer3d(torch.randn(1, T, 4, 4, D_IN))
    layer = LocalConvCaps(T, D_IN, C, D_OUT)
    with pytest.raises(ValueError, match="is a 2D layer .* got a 3D capsule grid"):
        layer(torch.randn(1, T, 4, 4, 4, D_IN))
    with pytest.raises(ValueError, match="dimension 1 is 4, expected 3"):
        layer(torch.randn(1, 4, 4, 4, D_IN))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, T, 4, 4, D_IN, dtype=torch.long))
    bad = torch.randn(1, T, 4, 4, D_IN)
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteValueError, match="1 Inf"):
        layer(bad)
    with pytest.raises(ValueError, match="gives no output"):
        LocalConvCaps(T, D_IN, C, D_OUT, kernel_size=5, padding=0)(torch.randn(1, T, 3, 3, D_IN))
    for kw, msg in [({"spatial_dims": 1}, "spatial_dims"), ({"stride": 0}, "stride"),
                    ({"kernel_size": 2.0}, "kernel_size"), ({"routing_iterations": 0}, "iterations")]:
        with pytest.raises(ValueError, match=msg):
            LocalConvCaps(T, D_IN, C, D_OUT, **kw)
    with pytest.raises(ValueError, match="output_padding needs an explicit padding"):
        LocalDeconvCaps(T, D_IN, C, D_OUT, output_padding=1)
    with pytest.raises(ValueError, match="smaller than the stride"):
        LocalDeconvCaps(T, D_IN, C, D_OUT, padding=1, output_padding=2)
    with pytest.raises(ValueError, match="does not fit"):
        local_capsule_votes(torch.randn(1, T, 4, 4, D_IN), torch.randn(5, D_IN, 3, 3), C)


def test_all_combinations_build():
    for cls, n, share in itertools.product((LocalConvCaps, LocalDeconvCaps), (2, 3), (True, False)):
        layer = cls(2, 3, 2, 4, kernel_size=3, spatial_dims=n, share_weight=share)
        out = layer(torch.randn(1, 2, *(2,) * n, 3))
        assert out.poses.shape[:2] == (1, 2) and out.poses.shape[-1] == 4
