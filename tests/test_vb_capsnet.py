"""Convolutional and class matrix capsules routed by Variational Bayes, and ``vb_capsnet``.

The loop reference routes every window with Bishop's textbook updates (weighted mean and
scatter per parent, as ``vb_routing_loop`` in ``test_vb_routing.py``) and normalises each
child's couplings either over the parent types of one window (the official code) or over
every parent it reaches across overlapping windows.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchcaps
from reference import matrix_window_votes_loop
from test_vb_routing import digamma_ref
from torchcaps.layers.matrix import ClassMatCaps, ConvMatCaps, PrimaryMatCaps, window_index
from torchcaps.routing.vb import VariationalBayesRouting


def conv_vb_loop(poses, acts, weight, beta_a, beta_u, k, s, iterations, per_window,
                 alpha0=1.0, kappa0=1.0, psi0=1.0):
    """Windowed VB routing one scalar at a time (m0 = 0); returns mu, a, couplings."""
    b_n, t_n, h_n, w_n, _ = poses.shape
    c_n, d_n = weight.shape[2], 16
    nu0 = d_n + 1.0
    ho, wo = (h_n - k) // s + 1, (w_n - k) // s + 1
    windows, slots, child, votes, reach = matrix_window_votes_loop(poses, weight, k, s)
    votes = {key: v.tolist() for key, v in votes.items()}
    r = {}
    for b in range(b_n):
        for ch, places in reach.items():
            for (oy, ox, ky, kx) in places:
                for c in range(c_n):
                    r[b, oy, ox, ky, kx, ch[0], c] = 1.0 / (c_n if per_window else len(places) * c_n)
    post = {}
    for it in range(iterations):
        for b in range(b_n):
            for (oy, ox) in windows:
                for c in range(c_n):
                    w = [float(acts[(b, *child(oy, ox, ky, kx, t))]) * r[b, oy, ox, ky, kx, t, c]
                         for (ky, kx, t) in slots]
                    vs = [votes[b, oy, ox, ky, kx, t, c] for (ky, kx, t) in slots]
                    n = sum(w)
                    xbar = [sum(wi * v[d] for wi, v in zip(w, vs)) / n for d in range(d_n)]
                    sc = [sum(wi * (v[d] - xbar[d]) ** 2 for wi, v in zip(w, vs)) / n
                          for d in range(d_n)]
                    kappa = kappa0 + n
                    post[b, oy, ox, c] = {
                        "alpha": alpha0 + n, "kappa": kappa, "nu": nu0 + n,
                        "m": [n * xbar[d] / kappa for d in range(d_n)],
                        "psi_inv": [1.0 / psi0 + n * sc[d] + kappa0 * n / kappa * xbar[d] ** 2
                                    for d in range(d_n)]}
                alpha_hat = sum(post[b, oy, ox, c]["alpha"] for c in range(c_n))
                for c in range(c_n):
                    p = post[b, oy, ox, c]
                    p["eln_pi"] = digamma_ref(p["alpha"]) - digamma_ref(alpha_hat)
                    p["eln_det"] = (sum(digamma_ref((p["nu"] + 1 - q) / 2) for q in range(1, d_n + 1))
                                    + d_n * math.log(2) - sum(math.log(x) for x in p["psi_inv"]))
        if it == iterations - 1:
            break
        for b in range(b_n):
            for ch, places in reach.items():
                groups = [[pl] for pl in places] if per_window else [places]
                for group in groups:
                    keys, logs = [], []
                    for (oy, ox, ky, kx) in group:
                        for c in range(c_n):
                            p = post[b, oy, ox, c]
                            v = votes[b, oy, ox, ky, kx, ch[0], c]
                            maha = sum((v[d] - p["m"][d]) ** 2 / p["psi_inv"][d] for d in range(d_n))
                            e_quad = d_n / p["kappa"] + p["nu"] * maha
                            keys.append((b, oy, ox, ky, kx, ch[0], c))
                            logs.append(p["eln_pi"] + 0.5 * p["eln_det"]
                                        - 0.5 * d_n * math.log(2 * math.pi) - 0.5 * e_quad)
                    top = max(logs)
                    e = [math.exp(x - top) for x in logs]
                    for key, x in zip(keys, e, strict=True):
                        r[key] = x / sum(e)
    mu = torch.zeros(b_n, c_n, ho, wo, 16, dtype=torch.float64)
    a = torch.zeros(b_n, c_n, ho, wo, dtype=torch.float64)
    for (b, oy, ox, c), p in post.items():
        mu[b, c, oy, ox] = torch.tensor(p["m"], dtype=torch.float64)
        entropy = 0.5 * d_n * math.log(2 * math.pi * math.e) - 0.5 * p["eln_det"]
        logit = float(beta_a[c]) - (math.exp(p["eln_pi"]) * entropy + float(beta_u[c]))
        a[b, c, oy, ox] = 1.0 / (1.0 + math.exp(-logit))
    r_out = torch.zeros(b_n, ho * wo, k * k, t_n, c_n, dtype=torch.float64)
    for (b, oy, ox, ky, kx, t, c), v in r.items():
        r_out[b, oy * wo + ox, ky * k + kx, t, c] = v
    return mu, a, r_out


def _vb_layer(t, c, k, s, per_window, iterations=3, seed=0):
    layer = ConvMatCaps(t, c, k, s, iterations, routing="vb", per_window=per_window).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * 0.5)
        layer.routing.beta_a.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.routing.beta_u.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("per_window", [True, False])
@pytest.mark.parametrize("h,w,k,s", [(5, 5, 3, 1), (5, 5, 3, 2), (6, 5, 3, 2)])
def test_conv_vb_matches_loop_reference(h, w, k, s, per_window):
    b, t, c = 1, 2, 2
    layer = _vb_layer(t, c, k, s, per_window)
    g = torch.Generator().manual_seed(h * 7 + w)
    poses = torch.randn(b, t, h, w, 16, generator=g, dtype=torch.float64)
    acts = torch.rand(b, t, h, w, generator=g, dtype=torch.float64) * 0.8 + 0.2
    out = layer(poses, acts)
    mu, a, r = conv_vb_loop(poses, acts, layer.weight.detach(), layer.routing.beta_a.detach(),
                            layer.routing.beta_u.detach(), k, s, 3, per_window)
    torch.testing.assert_close(out.poses, mu, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.activations, a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.couplings, r, rtol=1e-9, atol=1e-10)


def test_conv_vb_normalisation_axis_depends_on_per_window():
    h, w, k, s = 7, 7, 3, 2
    poses = torch.randn(2, 3, h, w, 16, dtype=torch.float64)
    acts = torch.rand(2, 3, h, w, dtype=torch.float64)
    # per window: every window's couplings sum to 1 over the parent types
    per = _vb_layer(3, 4, k, s, per_window=True)(poses, acts).couplings  # (B, L, KK, T, C)
    torch.testing.assert_close(per.sum(-1), torch.ones_like(per.sum(-1)))
    # across windows: each child's couplings sum to 1 over every (window, type) reaching it
    cross = _vb_layer(3, 4, k, s, per_window=False)(poses, acts).couplings
    b, l_n, kk, t, _ = cross.shape
    idx = window_index(h, w, k, s).reshape(-1)
    sums = torch.zeros(b, h * w, t, dtype=cross.dtype).index_add(
        1, idx, cross.sum(-1).reshape(b, l_n * kk, t))
    torch.testing.assert_close(sums[:, idx.unique()], torch.ones_like(sums[:, idx.unique()]))
    assert not torch.allclose(cross.sum(-1), torch.ones_like(cross.sum(-1)))


def test_conv_vb_logits_are_the_activations_before_the_sigmoid():
    poses = torch.randn(1, 2, 5, 5, 16, dtype=torch.float64)
    acts = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    plain = _vb_layer(2, 3, 3, 1, per_window=False)
    logit = ConvMatCaps(2, 3, 3, 1, routing="vb", logits=True).double()
    logit.load_state_dict(plain.state_dict())
    torch.testing.assert_close(torch.sigmoid(logit(poses, acts).activations),
                               plain(poses, acts).activations)


def test_conv_vb_gradcheck():
    layer = _vb_layer(1, 2, 2, 1, per_window=False, iterations=2)
    poses = torch.randn(1, 1, 3, 3, 16, dtype=torch.float64, requires_grad=True)
    acts = (torch.rand(1, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)

    def f(p, a):
        out = layer(p, a)
        return out.poses, out.activations, out.couplings

    assert torch.autograd.gradcheck(f, (poses, acts), fast_mode=True)


def test_class_matcaps_routes_with_vb():
    layer = ClassMatCaps(2, 3, iterations=3, routing="vb").double()
    poses = torch.randn(2, 2, 3, 3, 16, dtype=torch.float64)
    acts = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    out = layer(poses, acts)
    dense = VariationalBayesRouting(3, num_parents=3, parent_dim=16).double()
    dense.load_state_dict(layer.routing.state_dict())
    ref = dense(layer.votes(poses), acts.flatten(1))
    torch.testing.assert_close(out.poses, ref.poses)
    torch.testing.assert_close(out.activations, ref.activations)


def test_class_matcaps_coord_scale_scales_the_added_coordinates():
    poses = torch.randn(1, 2, 3, 3, 16, dtype=torch.float64)
    plain = ClassMatCaps(2, 3).double()
    scaled = ClassMatCaps(2, 3, coord_scale=0.01).double()
    scaled.load_state_dict(plain.state_dict())
    no_coords = ClassMatCaps(2, 3, coord_addition=False).double()
    no_coords.load_state_dict(plain.state_dict())
    base = no_coords.votes(poses)
    torch.testing.assert_close(scaled.votes(poses) - base, 0.01 * (plain.votes(poses) - base))
    assert (plain.votes(poses) - base).abs().max() > 0.1


def test_primary_matcaps_batch_norm_normalises_poses_per_type():
    layer = PrimaryMatCaps(4, 3, batch_norm=True)
    out = layer(torch.randn(8, 4, 5, 5) * 7 + 3)  # training mode: batch statistics
    mean = out.poses.mean(dim=(0, 2, 3, 4))  # per type over batch, grid and pose elements
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    assert PrimaryMatCaps(4, 3).bn_pose is None


def test_matrix_layers_reject_unsupported_and_unknown_routings():
    from torchcaps.routing import UnsupportedRoutingError

    with pytest.raises(UnsupportedRoutingError, match="ConvMatCaps cannot use 'dynamic' routing "
                       r"\(unsupported\): matrix capsules carry an activation .* but the algorithm does "
                       "not weight children by their activations"):
        ConvMatCaps(2, 3, routing="dynamic")
    with pytest.raises(UnsupportedRoutingError, match="returns no parent activations"):
        ClassMatCaps(2, 3, routing="cluster")
    with pytest.raises(KeyError, match="unknown routing algorithm 'emm'"):
        ConvMatCaps(2, 3, routing="emm")


def test_matrix_layers_return_em_logits_on_request():
    torch.manual_seed(0)
    plain, raw = ConvMatCaps(2, 3).double(), ConvMatCaps(2, 3, logits=True).double()
    raw.load_state_dict(plain.state_dict())
    poses = torch.randn(2, 2, 4, 4, 16, dtype=torch.float64)
    acts = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    a, z = plain(poses, acts), raw(poses, acts)
    torch.testing.assert_close(torch.sigmoid(z.activations), a.activations)
    torch.testing.assert_close(z.poses, a.poses)


# ----------------------------------------------------------------------------- the model


def test_vb_capsnet_parameter_count_and_layers():
    m = torchcaps.create_model("vb_capsnet")
    # conv + BN 1,728; primary 8,872; conv caps 55,360; class caps 2,580
    assert sum(p.numel() for p in m.parameters()) == 68_540
    assert (m.caps1.routing_name, m.caps1.per_window) == ("vb", True)
    assert isinstance(m.classes.routing, VariationalBayesRouting)
    assert m(torch.rand(2, 1, 28, 28)).poses.shape == (2, 10, 16)


def test_vb_capsnet_losses_and_bad_arguments():
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    m = torchcaps.create_model("vb_capsnet", loss="spread", per_window=False)
    loss, parts = m.loss(m(x, y), x, y)
    assert "spread" in parts and torch.isfinite(loss)
    with pytest.raises(ValueError, match="loss must be"):
        torchcaps.create_model("vb_capsnet", loss="margin")
    with pytest.raises(ValueError, match="too small"):
        torchcaps.create_model("vb_capsnet", in_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="at least 2 images"):
        torchcaps.create_model("vb_capsnet")(torch.rand(1, 1, 28, 28))


def test_vb_capsnet_learns_a_tiny_batch():
    from torchcaps.data import load_dataset

    torch.manual_seed(0)
    m = torchcaps.create_model("vb_capsnet", conv_channels=16, primary_types=4,
                               caps1_types=4, caps2_types=4)
    x, y = load_dataset("mnist-mini").train.batch(slice(0, 16))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(60):
        loss, _ = m.loss(m(x, y), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the BatchNorm running statistics lag the fast-moving weights of so short a run (the
    # activation logits vary little across images, so a small lag matters): recalibrate
    with torch.no_grad():
        for _ in range(20):
            m(x)
    m.eval()
    with torch.no_grad():
        accuracy = (m(x).logits.argmax(1) == y).float().mean().item()
    assert accuracy >= 0.75
