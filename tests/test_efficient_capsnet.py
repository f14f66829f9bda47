"""Self-attention routing and the Efficient-CapsNet model (Mazzia et al. 2021, arXiv 2101.12491)."""

import math

import pytest
import torch

from torchcaps.functional import margin_loss
from torchcaps.layers import CapsLinear
from torchcaps.models._registry import create_model, list_models
from torchcaps.models.efficient_capsnet import EfficientCapsNet, EfficientPrimaryCaps
from torchcaps.routing.base import create_routing, list_routings
from torchcaps.routing.self_attention import SelfAttentionRouting


def votes64(b=2, i=5, j=3, d=4, scale=1.0):
    return torch.randn(b, i, j, d, dtype=torch.float64) * scale


def squash_exp_loop(s, eps=1e-8):
    norm = math.sqrt(sum(float(x) ** 2 for x in s) + eps)
    return s * ((1.0 - math.exp(-norm)) / norm)


def self_attention_loop(votes, prior=None):
    """The routing written with loops, building every I x I matrix A_j explicitly."""
    b_n, i_n, j_n, d_n = votes.shape
    logits = torch.zeros(b_n, i_n, j_n, dtype=votes.dtype)
    for b in range(b_n):
        for j in range(j_n):
            u = votes[b, :, j, :]  # U_j (I, D)
            a = torch.zeros(i_n, i_n, dtype=votes.dtype)
            for i in range(i_n):
                for k in range(i_n):
                    a[i, k] = float(u[i] @ u[k]) / math.sqrt(d_n)
            for i in range(i_n):
                logits[b, i, j] = sum(float(a[i, k]) for k in range(i_n))  # row sum
    c = torch.zeros_like(logits)
    for b in range(b_n):
        for i in range(i_n):
            row = [float(logits[b, i, j]) for j in range(j_n)]
            m = max(row)
            z = sum(math.exp(x - m) for x in row)
            for j in range(j_n):
                c[b, i, j] = math.exp(row[j] - m) / z  # softmax over parents j
    v = torch.zeros(b_n, j_n, d_n, dtype=votes.dtype)
    for b in range(b_n):
        for j in range(j_n):
            s = torch.zeros(d_n, dtype=votes.dtype)
            for i in range(i_n):
                w = float(c[b, i, j]) + (0.0 if prior is None else float(prior[i, j]))
                s += w * votes[b, i, j]
            v[b, j] = squash_exp_loop(s)
    return v, c


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("with_prior", [False, True])
def test_matches_loop_reference(with_prior):
    u = votes64(2, 5, 3, 4, scale=0.7)
    r = SelfAttentionRouting(num_parents=3, parent_dim=4, num_children=5,
                             prior=with_prior).double()
    prior = None
    if with_prior:
        with torch.no_grad():
            r.prior.copy_(torch.randn(5, 3) * 0.3)
        prior = r.prior.detach()
    out = r(u)
    v_ref, c_ref = self_attention_loop(u, prior)
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.couplings, c_ref, rtol=1e-10, atol=1e-12)
    assert out.activations is None


def test_couplings_sum_to_one_over_parents_not_children():
    r = SelfAttentionRouting()
    assert r.normalized_axis == 2
    out = r(votes64(3, 7, 4, 5))
    sums = out.couplings.sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(out.couplings.sum(dim=1), torch.ones(3, 4, dtype=torch.float64))
    assert (out.poses.norm(dim=-1) < 1).all()


def test_softmax_over_children_would_differ():
    """Regression: normalising over children (the other axis) changes the poses."""
    u = votes64(2, 6, 3, 4)
    total = u.sum(dim=1)
    logits = torch.einsum("bijd,bjd->bij", u, total) / 2.0
    wrong = torch.einsum("bij,bijd->bjd", torch.softmax(logits, dim=1), u)
    from torchcaps.functional import squash_exp

    assert not torch.allclose(squash_exp(wrong), SelfAttentionRouting()(u).poses, atol=1e-3)


def test_prior_is_added_after_the_softmax():
    """c + b: a constant prior b shifts s_j by b * sum_i u_hat_j|i (not a softmax shift)."""
    u = votes64(1, 4, 3, 2)
    r = SelfAttentionRouting(num_parents=3, num_children=4).double()
    with torch.no_grad():
        r.prior.fill_(0.5)
    c = r(u).couplings
    s = torch.einsum("bij,bijd->bjd", c, u) + 0.5 * u.sum(dim=1)
    from torchcaps.functional import squash_exp

    torch.testing.assert_close(r(u).poses, squash_exp(s))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_children_with_zero_prior_leaves_parents_unchanged(seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, 6, 4, 3, dtype=torch.float64, generator=g)
    perm = torch.randperm(6, generator=g)
    r = SelfAttentionRouting(num_parents=4, num_children=6).double()  # prior at its init, 0
    a, p = r(u), r(u[:, perm])
    torch.testing.assert_close(a.poses, p.poses)
    torch.testing.assert_close(a.couplings[:, perm], p.couplings)


def test_nonzero_prior_breaks_permutation_invariance_unless_permuted_too():
    u = votes64(2, 6, 4, 3)
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    r = SelfAttentionRouting(num_parents=4, num_children=6).double()
    with torch.no_grad():
        r.prior.copy_(torch.randn(6, 4))
    ref = r(u).poses
    assert not torch.allclose(r(u[:, perm]).poses, ref)
    with torch.no_grad():
        r.prior.copy_(r.prior[perm])
    torch.testing.assert_close(r(u[:, perm]).poses, ref)


def test_gradcheck_votes_and_prior():
    u = votes64(1, 3, 2, 3).requires_grad_(True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    r = SelfAttentionRouting(num_parents=2, num_children=3).double()

    assert torch.autograd.gradcheck(lambda x: r(x).poses, (u,))

    def f_prior(prior):
        # the routing with a given prior, written through the public pieces
        c = r(u).couplings
        s = torch.einsum("bij,bijd->bjd", c + prior, u)
        from torchcaps.functional import squash_exp

        return squash_exp(s)

    assert torch.autograd.gradcheck(f_prior, (b,))
    # and the module's own prior receives the same gradient as the explicit version
    with torch.no_grad():
        r.prior.copy_(b)
    g_mod = torch.autograd.grad(r(u).poses.sum(), r.prior)[0]
    g_ref = torch.autograd.grad(f_prior(b).sum(), b)[0]
    torch.testing.assert_close(g_mod, g_ref)


def test_finite_gradient_at_zero_votes():
    u = torch.zeros(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    r = SelfAttentionRouting(num_parents=3, num_children=4).double()
    out = r(u)
    torch.testing.assert_close(out.couplings, torch.full_like(out.couplings, 1 / 3))
    (out.poses.sum() + out.couplings.sum()).backward()
    assert torch.isfinite(u.grad).all()
    assert torch.isfinite(r.prior.grad).all()


def test_bad_votes():
    r = SelfAttentionRouting(num_parents=3, parent_dim=4, num_children=5)
    with pytest.raises(ValueError, match=r"votes must have shape \(B, 5, 3, 4\)"):
        r(torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match=r"dimension 2 is 2, expected 3"):
        r(torch.randn(2, 5, 2, 4))
    with pytest.raises(ValueError, match="4 dimensions"):
        r(torch.randn(2, 5, 3))
    bad = torch.randn(2, 5, 3, 4)
    bad[1, 2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(1 NaN"):
        r(bad)
    with pytest.raises(TypeError, match="floating-point"):
        r(torch.ones(2, 5, 3, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_children": 0}, "num_children must be a positive integer"),
        ({"num_parents": -2}, "num_parents must be a positive integer"),
        ({"parent_dim": 1.5}, "parent_dim must be a positive integer"),
        ({"prior": True}, "prior=True needs num_children and num_parents"),
        ({"prior": True, "num_children": 4}, "prior=True needs num_children and num_parents"),
        ({"prior": "yes"}, "prior must be True, False or None"),
        ({"eps": 0.0}, "eps must be a positive number"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfAttentionRouting(**kwargs)


def test_prior_presence_rules():
    assert SelfAttentionRouting().prior is None
    assert SelfAttentionRouting(num_parents=3).prior is None
    assert SelfAttentionRouting(num_parents=3, num_children=4).prior.shape == (4, 3)
    assert SelfAttentionRouting(num_parents=3, num_children=4, prior=False).prior is None
    r = SelfAttentionRouting(num_parents=3, num_children=4, prior=True)
    assert torch.equal(r.prior, torch.zeros(4, 3))


def test_registry_and_caps_linear():
    assert "self_attention" in list_routings()
    assert isinstance(create_routing("self_attention"), SelfAttentionRouting)
    layer = CapsLinear(6, 4, 3, 5, "self_attention", {"num_children": 6})
    assert layer.routing.prior.shape == (6, 3)
    out = layer(torch.randn(2, 6, 4))
    assert out.poses.shape == (2, 3, 5) and out.couplings.shape == (2, 6, 3)


# ----------------------------------------------------------------------------- model


def test_parameter_count_matches_paper():
    m = create_model("efficient_capsnet")
    params = dict(m.named_parameters())
    no_dec = sum(p.numel() for n, p in params.items() if not n.startswith("decoder"))
    assert no_dec == 161_824  # "161,824 trainable parameters" in Mazzia et al.
    # breakdown: convs with biases, BN gamma+beta (running stats are buffers, not counted)
    convs = [mod for mod in m.backbone if isinstance(mod, torch.nn.Conv2d)]
    bns = [mod for mod in m.backbone if isinstance(mod, torch.nn.BatchNorm2d)]
    assert [sum(p.numel() for p in c.parameters()) for c in convs] == [832, 18_496, 36_928, 73_856]
    assert [sum(p.numel() for p in b.parameters()) for b in bns] == [64, 128, 128, 256]
    assert sum(p.numel() for p in m.primary.parameters()) == 10_496
    assert m.digit.weight.numel() == 20_480 and m.digit.routing.prior.numel() == 160
    assert sum(p.numel() for p in m.decoder.parameters()) == 1_411_344
    assert "efficient_capsnet" in list_models()


def test_primary_capsules_are_consecutive_channels():
    torch.manual_seed(0)
    p = EfficientPrimaryCaps(16, 3, 4).double()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    u = p(x)
    assert u.shape == (2, 4, 4)
    raw = p.conv(x)[:, :, 0, 0]  # (B, 16)
    from torchcaps.functional import squash_exp

    for n in range(4):
        torch.testing.assert_close(u[:, n], squash_exp(raw[:, 4 * n:4 * n + 4]))
    # a larger map: capsules are ordered position-major, channel groups inside a position
    x = torch.randn(1, 16, 4, 5, dtype=torch.float64)
    raw = p.conv(x)  # (1, 16, 2, 3)
    u = p(x)
    assert u.shape == (1, 2 * 3 * 4, 4)
    h, w, n = 1, 2, 3
    torch.testing.assert_close(u[0, (h * 3 + w) * 4 + n], squash_exp(raw[0, 4 * n:4 * n + 4, h, w]))


def test_forward_backward_every_parameter_gets_gradient():
    m = EfficientCapsNet()
    m.train()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([3, 1, 4])
    out = m(x, y)
    assert out.logits.shape == (3, 10) and out.poses.shape == (3, 10, 16)
    assert out.couplings.shape == (3, 16, 10) and out.reconstruction.shape == (3, 1, 28, 28)
    torch.testing.assert_close(out.couplings.sum(2), torch.ones(3, 16))
    loss, parts = m.loss(out, x, y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert set(parts) == {"margin", "reconstruction"}


def test_loss_is_margin_plus_0392_mse():
    m = EfficientCapsNet().train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    out = m(x, y)
    loss, parts = m.loss(out, x, y)
    mse = ((out.reconstruction - x) ** 2).mean()
    torch.testing.assert_close(loss, margin_loss(out.logits, y) + 0.392 * mse)
    torch.testing.assert_close(parts["reconstruction"], 0.0005 * ((out.reconstruction - x) ** 2)
                               .flatten(1).sum(1).mean())


def test_decoder_masks_by_label_in_training_and_longest_in_eval():
    m = EfficientCapsNet()
    x = torch.rand(3, 1, 28, 28)
    m.eval()
    pred = m(x).logits.argmax(1)
    wrong = (pred + 1) % 10
    torch.testing.assert_close(m(x, wrong).reconstruction, m(x).reconstruction)
    m.train()
    # same BN batch statistics in both calls: only the mask differs
    assert not torch.allclose(m(x, wrong).reconstruction, m(x, pred).reconstruction)


def test_other_input_shapes_and_bad_args():
    m = create_model("efficient_capsnet", in_shape=(3, 32, 32), num_classes=5)
    assert m.primary.conv.kernel_size == (11, 11) and m.digit.in_caps == 16
    out = m(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 5) and out.reconstruction.shape == (2, 3, 32, 32)
    m = create_model("efficient_capsnet", primary_kernel=7, reconstruction=False)
    assert m.digit.in_caps == 3 * 3 * 16
    assert m(torch.rand(2, 1, 28, 28)).reconstruction is None
    with pytest.raises(ValueError, match="too small"):
        create_model("efficient_capsnet", in_shape=(1, 10, 10))
    with pytest.raises(ValueError, match="exceeds"):
        create_model("efficient_capsnet", primary_kernel=10)
    with pytest.raises(ValueError, match="must divide"):
        create_model("efficient_capsnet", primary_dim=7)
    with pytest.raises(ValueError, match="images must have shape"):
        EfficientCapsNet()(torch.rand(2, 1, 27, 28))


def test_overfits_a_tiny_batch_of_mnist():
    from torchcaps.data import load_dataset

    torch.manual_seed(0)
    x, y = load_dataset("mnist-mini").train.batch(slice(0, 16))
    m = EfficientCapsNet(bn_momentum=None)  # cumulative BN statistics for the eval check
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    with torch.no_grad():
        _, start = m.loss(m(x, y), x, y)
    for _ in range(20):
        loss, parts = m.loss(m(x, y), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["margin"] < 0.02 < start["margin"]
    assert parts["reconstruction"] < 0.5 * start["reconstruction"]
    m.eval()
    with torch.no_grad():
        assert (m(x).logits.argmax(1) == y).all()
