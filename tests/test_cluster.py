"""Cluster routing (Zhao & Cheng 2021): routing, ClusterConvCaps, and the cluster_capsnet model."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from torchcaps.layers.cluster import ClusterConvCaps
from torchcaps.models._registry import create_model
from torchcaps.models.cluster_capsnet import ClusterCapsNet  # importing registers the model
from torchcaps.routing.base import create_routing, list_routings
from torchcaps.routing.cluster import ClusterRouting, cluster_route
from torchcaps.testing import overfit_tiny_batch

# ----------------------------------------------------------------------------- references


def _route_one(cluster_votes, eps):
    """One parent element: cluster_votes[i][k] are floats. Returns (pose, weights over i)."""
    mus, logits = [], []
    for votes_k in cluster_votes:
        k_n = len(votes_k)
        mu = sum(votes_k) / k_n
        var = sum((v - mu) ** 2 for v in votes_k) / k_n  # population variance
        mus.append(mu)
        logits.append(-0.5 * math.log(var + eps))  # -log sigma
    m = max(logits)
    ex = [math.exp(x - m) for x in logits]
    z = sum(ex)
    w = [e / z for e in ex]  # softmax over children
    return sum(wi * mi for wi, mi in zip(w, mus, strict=True)), w


def cluster_routing_loop(votes, eps):
    """votes (B, I, J, K, D) -> poses (B, J, D), per-element weights (B, I, J, D), loops only."""
    b_n, i_n, j_n, k_n, d_n = votes.shape
    poses = torch.zeros(b_n, j_n, d_n, dtype=torch.float64)
    weights = torch.zeros(b_n, i_n, j_n, d_n, dtype=torch.float64)
    for b in range(b_n):
        for j in range(j_n):
            for d in range(d_n):
                clusters = [[float(votes[b, i, j, k, d]) for k in range(k_n)] for i in range(i_n)]
                pose, w = _route_one(clusters, eps)
                poses[b, j, d] = pose
                for i in range(i_n):
                    weights[b, i, j, d] = w[i]
    return poses, weights


def cluster_conv_loop(u, layer, shared=False):
    """ClusterConvCaps written the slow way: one convolution per child (official layout
    (K, C_out, D) of each child's output channels), loops for the routing, LayerNorm by hand."""
    c_in, k_n, c_out, d_n = layer.in_caps, layer.cluster_size, layer.out_caps, layer.out_dim
    block = k_n * c_out * d_n
    per_child = []
    for i in range(c_in):
        w_i = layer.weight[i * block:(i + 1) * block]  # (K*C_out*D, D_in, kh, kw)
        b_i = None if layer.bias is None else layer.bias[i * block:(i + 1) * block]
        x_i = u if shared else u[:, i]
        with torch.no_grad():
            out = F.conv2d(x_i, w_i, b_i, layer.stride, layer.padding)
        per_child.append(out.view(out.shape[0], k_n, c_out, d_n, *out.shape[2:]))
    b_n, h_n, w_n = u.shape[0], per_child[0].shape[-2], per_child[0].shape[-1]
    poses = torch.zeros(b_n, c_out, d_n, h_n, w_n, dtype=torch.float64)
    for b in range(b_n):
        for j in range(c_out):
            for d in range(d_n):
                for h in range(h_n):
                    for w in range(w_n):
                        clusters = [
                            [float(per_child[i][b, k, j, d, h, w]) for k in range(k_n)]
                            for i in range(c_in)
                        ]
                        poses[b, j, d, h, w] = _route_one(clusters, layer.eps)[0]
    if layer.norm is not None:
        g, beta, eps = layer.norm.weight.detach(), layer.norm.bias.detach(), layer.norm.eps
        out = torch.zeros_like(poses)
        for b in range(b_n):
            for j in range(c_out):
                x = poses[b, j]
                mean = x.mean()
                var = ((x - mean) ** 2).mean()  # biased, as LayerNorm
                out[b, j] = (x - mean) / math.sqrt(float(var) + eps) * g + beta
        poses = out
    return poses


def votes64(b=2, i=4, j=3, k=3, d=2, scale=1.0):
    return torch.randn(b, i, j, k, d, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.1])
def test_routing_matches_loop_reference(eps):
    v = votes64(scale=2.0)
    out = ClusterRouting(eps=eps)(v)
    p_ref, w_ref = cluster_routing_loop(v, eps)
    torch.testing.assert_close(out.poses, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, w_ref.mean(-1), rtol=1e-10, atol=1e-12)
    assert out.activations is None
    poses, weights = cluster_route(v, eps=eps)
    torch.testing.assert_close(weights, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(poses, p_ref, rtol=1e-10, atol=1e-12)


def test_routing_matches_official_formula():
    """eps=0 is the official code: std_mean(unbiased=False), -log(std), softmax over children."""
    v = votes64(2, 5, 3, 4, 3)
    stds, means = torch.std_mean(v, dim=3, unbiased=False)  # (B, I, J, D)
    w = F.softmax(-torch.log(stds), dim=1)
    expected = (w * means).sum(dim=1)
    torch.testing.assert_close(ClusterRouting(eps=0.0)(v).poses, expected)
    # the default eps changes nothing measurable on well-spread clusters
    torch.testing.assert_close(ClusterRouting()(v).poses, expected, rtol=1e-6, atol=1e-7)


def test_flat_votes_are_vote_major():
    v = votes64(2, 4, 3, 3, 5)  # K=3, D=5
    flat = v.flatten(3)  # (B, I, J, K*D): element d of vote k at k*D + d
    ref = ClusterRouting()(v)
    for r in (ClusterRouting(cluster_size=3), ClusterRouting(parent_dim=5),
              ClusterRouting(cluster_size=3, num_parents=3, parent_dim=5)):
        out = r(flat)
        torch.testing.assert_close(out.poses, ref.poses)
        torch.testing.assert_close(out.couplings, ref.couplings)
    # the other split (D-major) is a different routing: the layout matters
    wrong = ClusterRouting()(flat.unflatten(-1, (5, 3)).transpose(-1, -2))
    assert not torch.allclose(wrong.poses, ref.poses)


def test_couplings_sum_to_one_over_children_not_parents():
    r = ClusterRouting()
    assert r.normalized_axis == 1
    out = r(votes64(3, 6, 5, 4, 3, scale=2.0))
    s = out.couplings.sum(dim=1)
    torch.testing.assert_close(s, torch.ones_like(s))
    assert not torch.allclose(out.couplings.sum(dim=2), torch.ones(3, 6, dtype=torch.float64))
    _, w = cluster_route(votes64(3, 6, 5, 4, 3))
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, 5, 3, dtype=torch.float64))
    assert (w > 0).all()


def test_tight_cluster_dominates():
    v = votes64(1, 3, 2, 4, 3, scale=3.0)
    v[:, 0] = v[:, 0].mean(dim=2, keepdim=True) + 1e-4 * torch.randn(1, 2, 4, 3, dtype=v.dtype)
    out = ClusterRouting()(v)
    torch.testing.assert_close(out.poses, v[:, 0].mean(dim=2), rtol=0, atol=1e-3)
    assert (out.couplings[:, 0] > 0.99).all()


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), i=st.integers(1, 6), j=st.integers(1, 4), k=st.integers(2, 5),
       d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_permuting_children_or_votes_leaves_parents_unchanged(b, i, j, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, i, j, k, d, dtype=torch.float64, generator=g)
    r = ClusterRouting()
    a = r(v)
    perm = torch.randperm(i, generator=g)
    p = r(v[:, perm])
    torch.testing.assert_close(a.poses, p.poses)
    torch.testing.assert_close(a.couplings[:, perm], p.couplings)
    # the votes inside a cluster are an unordered set
    torch.testing.assert_close(r(v[:, :, :, torch.randperm(k, generator=g)]).poses, a.poses)


def test_single_child_passes_its_centroid():
    v = votes64(2, 1, 3, 4, 2)
    out = ClusterRouting()(v)
    torch.testing.assert_close(out.poses, v[:, 0].mean(dim=2))
    torch.testing.assert_close(out.couplings, torch.ones(2, 1, 3, dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_routing_gradcheck(eps):
    v = votes64(1, 3, 2, 3, 2).requires_grad_(True)
    r = ClusterRouting(eps=eps)
    assert torch.autograd.gradcheck(lambda x: r(x).poses, (v,))
    assert torch.autograd.gradcheck(lambda x: r(x).couplings, (v,))


def test_identical_votes_give_finite_gradients():
    r = ClusterRouting()
    # one cluster collapsed to a point (sigma = 0), the others spread
    v = votes64(2, 3, 2, 4, 3)
    v[:, 1] = v[:, 1, :, :1]  # every vote of child 1 equals its first vote
    v.requires_grad_(True)
    out = r(v)
    (g,) = torch.autograd.grad(out.poses.sum() + out.couplings.sum(), v)
    assert torch.isfinite(out.poses).all() and torch.isfinite(g).all()
    assert (out.couplings[:, 1] > 0.999).all()  # the collapsed cluster takes the weight
    # every cluster collapsed: equal weights 1/I
    w = votes64(2, 3, 2, 1, 3).expand(2, 3, 2, 4, 3).clone().requires_grad_(True)
    out = r(w)
    (g,) = torch.autograd.grad(out.poses.square().sum(), w)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(out.couplings, torch.full((2, 3, 2), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(out.poses, w[:, :, :, 0].mean(dim=1))
    # eps=0 is the official formula, which breaks down exactly here (documented)
    assert not torch.isfinite(ClusterRouting(eps=0.0)(w.detach()).poses).all()


def test_float32_and_registry():
    assert "cluster" in list_routings()
    r = create_routing("cluster", cluster_size=3, num_parents=4, parent_dim=2)
    assert isinstance(r, ClusterRouting) and r.cluster_size == 3
    out = r(torch.randn(5, 7, 4, 6))
    assert out.poses.shape == (5, 4, 2) and out.poses.dtype == torch.float32
    assert out.couplings.shape == (5, 7, 4)


@pytest.mark.parametrize("bad", [0, 1, -2, 2.5, True, "3"])
def test_bad_cluster_size(bad):
    with pytest.raises(ValueError, match="cluster_size must be an integer >= 2"):
        ClusterRouting(cluster_size=bad)


def test_bad_votes():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ClusterRouting(eps=-1e-3)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ClusterRouting(eps=float("nan"))
    with pytest.raises(ValueError, match="need cluster_size or parent_dim"):
        ClusterRouting()(torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="not a multiple of cluster_size 4"):
        ClusterRouting(cluster_size=4)(torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="not a multiple of parent_dim 4"):
        ClusterRouting(parent_dim=4)(torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="at least 2 votes, got K=1"):
        ClusterRouting(parent_dim=6)(torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="at least 2 votes, got K=1"):
        ClusterRouting()(torch.randn(2, 3, 4, 1, 6))
    r = ClusterRouting(cluster_size=3, num_parents=4, parent_dim=2)
    with pytest.raises(ValueError, match=r"votes must have shape \(B, I, 4, 6\)"):
        r(torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match=r"votes must have shape \(B, I, 4, 3, 2\)"):
        r(torch.randn(2, 3, 5, 3, 2))
    with pytest.raises(ValueError, match="4 dimensions"):
        r(torch.randn(2, 3, 4))
    bad = torch.randn(2, 3, 4, 6)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite values .1 NaN"):
        r(bad)
    with pytest.raises(ValueError, match="non-finite"):
        r(torch.full((2, 3, 4, 3, 2), float("inf")))
    with pytest.raises(TypeError, match="floating-point"):
        r(torch.ones(2, 3, 4, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        r([[1.0]])
    with pytest.raises(ValueError, match="must differ"):
        cluster_route(torch.randn(2, 3, 4, 5), child_dim=1, cluster_dim=1)


# ------------------------------------------------------------------------- conv capsules


def conv_layer(stride=1, bias=True, layer_norm=True, in_size=(5, 4), k=3, eps=1e-8):
    layer = ClusterConvCaps(3, 2, 2, 3, cluster_size=k, in_size=in_size, stride=stride,
                            bias=bias, layer_norm=layer_norm, eps=eps).double()
    if layer.norm is not None:  # non-trivial affine parameters
        with torch.no_grad():
            layer.norm.weight.copy_(torch.rand_like(layer.norm.weight) + 0.5)
            layer.norm.bias.copy_(torch.randn_like(layer.norm.bias))
    return layer


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias,layer_norm", [(True, True), (False, False)])
def test_conv_caps_matches_loop_reference(stride, bias, layer_norm):
    layer = conv_layer(stride, bias, layer_norm)
    u = torch.randn(2, 3, 2, 5, 4, dtype=torch.float64)
    out = layer(u)
    assert out.shape == (2, 2, 3, *layer.out_size)
    torch.testing.assert_close(out, cluster_conv_loop(u, layer), rtol=1e-9, atol=1e-10)


def test_conv_caps_shared_input_is_grouped_conv_on_copies():
    layer = conv_layer(stride=2)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)  # (B, D_in, H, W), like an image
    copies = x.unsqueeze(1).expand(2, 3, 2, 5, 4)  # every child sees the same maps
    torch.testing.assert_close(layer(x), layer(copies))
    torch.testing.assert_close(layer(x), cluster_conv_loop(x, layer, shared=True),
                               rtol=1e-9, atol=1e-10)


def test_conv_caps_weights_and_layer_norm():
    layer = ClusterConvCaps(3, 2, 4, 3, cluster_size=3, in_size=6, stride=2, norm_eps=1e-12)
    layer = layer.double()
    out, w = layer(torch.randn(2, 3, 2, 6, 6, dtype=torch.float64), return_weights=True)
    assert w.shape == (2, 3, 4, 3, 3, 3)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 4, 3, 3, 3, dtype=torch.float64))
    # default LayerNorm affine (1, 0): each output channel has mean 0, variance 1 over (D, H, W)
    flat = out.flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(flat.var(-1, correction=0), torch.ones(2, 4, dtype=torch.float64))
    assert layer.norm.normalized_shape == (3, 3, 3)


def test_conv_caps_permuting_children_with_their_filters():
    layer = conv_layer()
    u = torch.randn(2, 3, 2, 5, 4, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    permuted = conv_layer()
    block = layer.weight.shape[0] // 3
    with torch.no_grad():
        permuted.weight.copy_(layer.weight.view(3, block, 2, 3, 3)[perm].reshape_as(layer.weight))
        permuted.bias.copy_(layer.bias.view(3, block)[perm].reshape(-1))
        permuted.norm.load_state_dict(layer.norm.state_dict())
    torch.testing.assert_close(permuted(u[:, perm]), layer(u))


def test_conv_caps_gradcheck():
    layer = ClusterConvCaps(2, 2, 2, 2, cluster_size=2, in_size=3, stride=2).double()
    u = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (u,))
    params = dict(layer.named_parameters())
    names = list(params)

    def as_fn(*values):
        new = dict(zip(names, values, strict=True))
        return torch.func.functional_call(layer, new, (u.detach(),))

    assert torch.autograd.gradcheck(as_fn, tuple(p.detach().clone().requires_grad_(True)
                                                 for p in params.values()))


def test_conv_caps_zero_input_gives_finite_gradients():
    """A zero input and no bias make every vote 0: sigma = 0 everywhere."""
    layer = ClusterConvCaps(2, 2, 3, 2, cluster_size=3, in_size=4, bias=False)
    u = torch.zeros(2, 2, 2, 4, 4, requires_grad=True)
    out = layer(u)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(u.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


def test_conv_caps_bad_input():
    layer = ClusterConvCaps(3, 2, 4, 5, cluster_size=3, in_size=(6, 6))
    five_d = r"ClusterConvCaps input must have shape \(B, 3, 2, 6, 6\)"
    with pytest.raises(ValueError, match=five_d):
        layer(torch.randn(2, 4, 2, 6, 6))
    with pytest.raises(ValueError, match=five_d):
        layer(torch.randn(2, 3, 2, 7, 6))
    with pytest.raises(ValueError, match=r"ClusterConvCaps input must have shape \(B, 2, 6, 6\)"):
        layer(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"must be \(B, C_in, D_in, H, W\) or shared"):
        layer(torch.randn(2, 3, 2))
    bad = torch.randn(2, 3, 2, 6, 6)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(bad)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 2, 6, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cluster_size must be an integer >= 2"):
        ClusterConvCaps(3, 2, 4, 5, cluster_size=1, in_size=6)
    with pytest.raises(ValueError, match="in_caps must be a positive integer"):
        ClusterConvCaps(0, 2, 4, 5, cluster_size=2, in_size=6)
    with pytest.raises(ValueError, match="needs in_size"):
        ClusterConvCaps(3, 2, 4, 5, cluster_size=2)
    with pytest.raises(ValueError, match="too small"):
        ClusterConvCaps(3, 2, 4, 5, cluster_size=2, in_size=2, kernel_size=5, padding=0)
    with pytest.raises(ValueError, match="stride >= 1"):
        ClusterConvCaps(3, 2, 4, 5, cluster_size=2, in_size=6, stride=0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ClusterConvCaps(3, 2, 4, 5, cluster_size=2, in_size=6, eps=-1.0)
    # without LayerNorm the grid size is free
    free = ClusterConvCaps(3, 2, 4, 5, cluster_size=2, layer_norm=False)
    assert free(torch.randn(1, 3, 2, 7, 9)).shape == (1, 4, 5, 7, 9)


# --------------------------------------------------------------------------------- model


def test_model_forward_backward_every_parameter_gets_a_gradient():
    model = create_model("cluster_capsnet")
    assert isinstance(model, ClusterCapsNet)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    out = model(x, y)
    assert out.logits.shape == (2, 10) and out.poses.shape == (2, 10, 6 * 7 * 7)
    assert out.couplings.shape == (2, 4, 10)
    torch.testing.assert_close(out.couplings.sum(dim=1), torch.ones(2, 10))
    loss, parts = model.loss(out, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, y))
    assert set(parts) == {"cross_entropy"} and not parts["cross_entropy"].requires_grad
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        if name == "head.bias":
            # the shared head's bias shifts every logit equally: cross-entropy is invariant
            # to that, so its gradient is zero up to rounding (sum over classes of p - y)
            assert p.grad.abs().max() < 1e-6
            continue
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_model_head_is_one_linear_shared_by_the_class_channels():
    model = ClusterCapsNet(channels=2, cluster_size=2, dim=3).eval()
    out = model(torch.rand(2, 1, 28, 28))
    per_class = torch.stack([model.head(out.poses[:, j]).squeeze(-1) for j in range(10)], dim=1)
    torch.testing.assert_close(out.logits, per_class)
    assert model.head.in_features == 3 * 7 * 7 and model.head.out_features == 1


def test_model_architecture_and_parameter_count():
    model = create_model("cluster_capsnet")
    strides = [layer.stride[0] for layer in model.caps]
    assert strides == [1, 2, 1, 2, 1]
    sizes = [layer.out_size for layer in model.caps]
    assert sizes == [(28, 28), (14, 14), (14, 14), (7, 7), (7, 7)]
    assert [layer.out_caps for layer in model.caps] == [4, 4, 4, 4, 10]
    assert model.caps[0].in_dim == 1 and model.caps[1].in_dim == 6
    assert sum(p.numel() for p in model.parameters()) == 165_583
    big = create_model("cluster_capsnet", cluster_size=8, dim=24)  # the official CIFAR setting
    assert sum(p.numel() for p in big.parameters()) == 3_759_481
    # the official code's CIFAR-10 net (32x32x3) counted without its 6 unused class-layer convs
    cifar = create_model("cluster_capsnet", in_shape=(3, 32, 32), cluster_size=8, dim=24)
    assert sum(p.numel() for p in cifar.parameters()) == 3_833_857


def test_model_other_shapes_and_bad_args():
    model = ClusterCapsNet(in_shape=(3, 15, 17), num_classes=5, channels=2, cluster_size=2, dim=2)
    out = model(torch.rand(2, 3, 15, 17))
    assert out.logits.shape == (2, 5) and model.caps[-1].out_size == (4, 5)
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.rand(2, 3, 15, 16))
    with pytest.raises(ValueError, match="cluster_size must be an integer >= 2"):
        ClusterCapsNet(cluster_size=1)
    with pytest.raises(ValueError, match="strides"):
        ClusterCapsNet(strides=())


def test_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = ClusterCapsNet(channels=2, cluster_size=3, dim=4)
    loss, acc = overfit_tiny_batch(model, steps=20, lr=1e-2)
    assert acc == 1.0 and loss < 0.05


# ------------------------------------------- memory-saving paths: same results as plain autograd


def _plain_statistics(votes, k_dim):
    mu = votes.mean(dim=k_dim)
    return mu, (votes - mu.unsqueeze(k_dim)).square().mean(dim=k_dim)


@pytest.mark.parametrize("k_dim", [1, 2, 3])
def test_cluster_statistics_gradient_is_plain_autograd(k_dim):
    from torchcaps.routing.cluster import cluster_statistics

    votes = torch.randn(3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: cluster_statistics(v, k_dim), (votes,))
    g_mu, g_var = torch.randn(2, *_plain_statistics(votes, k_dim)[0].shape, dtype=torch.float64)
    # both outputs used, only the centroid, only the variance (backward gets None for the other)
    for used in [(0, 1), (0,), (1,)]:
        def loss(stats, used=used):
            return sum((stats[n] * (g_mu, g_var)[n]).sum() for n in used)

        ours = torch.autograd.grad(loss(cluster_statistics(votes, k_dim)), votes)[0]
        plain = torch.autograd.grad(loss(_plain_statistics(votes, k_dim)), votes)[0]
        torch.testing.assert_close(ours, plain)


def test_cluster_statistics_in_chunks_equal_the_whole_batch(monkeypatch):
    from torchcaps.routing import cluster as cluster_mod

    votes = torch.randn(7, 3, 5, 4, 6)
    whole = _plain_statistics(votes, 2)
    monkeypatch.setattr(cluster_mod, "CHUNK_BYTES", votes[0].numel() * 4 * 2)  # 2 samples
    chunked = cluster_mod.cluster_statistics(votes, 2)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recomputed_votes_give_the_results_of_stored_ones(monkeypatch):
    """Recompute in groups of samples (forced small here): the same outputs, and the same
    gradients for the input and every parameter, as keeping the votes."""
    from torchcaps.layers import cluster as layer_mod

    torch.manual_seed(0)
    stored = ClusterConvCaps(3, 2, 4, 3, cluster_size=4, in_size=6, stride=2, recompute=False)
    again = ClusterConvCaps(3, 2, 4, 3, cluster_size=4, in_size=6, stride=2, recompute=True)
    again.load_state_dict(stored.state_dict())
    monkeypatch.setattr(layer_mod, "RECOMPUTE_BYTES", stored.weight.shape[0] * 9 * 4 * 2)
    u = torch.randn(5, 3, 2, 6, 6)
    grads = []
    for layer in (stored, again):
        x = u.clone().requires_grad_(True)
        out, weights = layer(x, return_weights=True)
        (out.square().sum() + weights.mean()).backward()
        grads.append((out.detach(), weights.detach(), x.grad,
                      *[p.grad for p in layer.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cluster_capsnet_training_steps_match_with_and_without_recompute():
    from torchcaps.layers.cluster import ClusterConvCaps as Layer

    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    losses = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = create_model("cluster_capsnet")
        for m in model.modules():
            if isinstance(m, Layer):
                m.recompute = recompute
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(3):
            loss, _ = model.loss(model(x, y), x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
