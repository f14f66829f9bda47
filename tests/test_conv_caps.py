"""Convolutional capsules: batched-GEMM votes against loops, and the ConvCaps2d layer."""

import pytest
import torch

from torchcaps.layers.conv import (
    ConvCaps2d,
    capsule_windows,
    conv_capsule_votes,
    conv_capsule_votes_loop,
)
from torchcaps.routing import create_routing


def _votes_by_definition(u, weight, stride, padding):
    """u_hat[b, l, (k, t), c] = W[k, t, c] @ u[b, t, pos(l, k)], scalar loops over everything."""
    kk, t_n, c_n, d_out, d_in = weight.shape
    k = round(kk ** 0.5)
    b_n, _, h, w, _ = u.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    out = torch.zeros(b_n, ho * wo, kk * t_n, c_n, d_out, dtype=u.dtype)
    for b in range(b_n):
        for oy in range(ho):
            for ox in range(wo):
                for ky in range(k):
                    for kx in range(k):
                        y, x = oy * stride + ky - padding, ox * stride + kx - padding
                        if not (0 <= y < h and 0 <= x < w):
                            continue  # zero padding: the vote is W @ 0 = 0
                        for t in range(t_n):
                            for c in range(c_n):
                                out[b, oy * wo + ox, (ky * k + kx) * t_n + t, c] = (
                                    weight[ky * k + kx, t, c] @ u[b, t, y, x])
    return out.view(b_n * ho * wo, kk * t_n, c_n, d_out)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (3, 1, 0), (3, 2, 0), (3, 2, 1), (2, 1, 1)])
def test_gemm_votes_match_loops_in_float64(k, s, p):
    g = torch.Generator().manual_seed(k * 10 + s + p)
    u = torch.randn(2, 3, 5, 6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(k * k, 3, 2, 5, 4, generator=g, dtype=torch.float64)
    ref = _votes_by_definition(u, w, s, p)
    fast, size = conv_capsule_votes(u, w, s, p)
    loop, size_loop = conv_capsule_votes_loop(u, w, s, p)
    assert size == size_loop == ((5 + 2 * p - k) // s + 1, (6 + 2 * p - k) // s + 1)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loop, ref, rtol=1e-12, atol=1e-12)


def test_windows_layout_is_offset_then_type_then_window():
    u = torch.arange(1 * 2 * 4 * 4 * 1, dtype=torch.float64).view(1, 2, 4, 4, 1)
    win, (ho, wo) = capsule_windows(u, kernel_size=2, stride=2)
    assert (ho, wo) == (2, 2) and win.shape == (4, 2, 1, 4, 1)
    # offset (1, 0) of window (1, 1) of type 1 is the child at row 3, column 2
    assert win[1 * 2 + 0, 1, 0, 1 * 2 + 1, 0] == u[0, 1, 3, 2, 0]


def test_votes_gradients_match_loop_reference():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 2, 4, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2 * 2 * 2, 18, 2, 3, generator=g, dtype=torch.float64)
    grads = []
    for fn in (conv_capsule_votes, conv_capsule_votes_loop):
        (fn(u, w, 2, 1)[0] * probe).sum().backward()
        grads.append((u.grad.clone(), w.grad.clone()))
        u.grad = w.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_votes():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv_capsule_votes(a, b, 1, 0)[0], (u, w))


def _layer(routing="dynamic", **kw):
    torch.manual_seed(0)
    return ConvCaps2d(3, 4, 2, 5, kernel_size=3, stride=2, padding=1, routing=routing, **kw).double()


def test_layer_routes_each_window_separately():
    layer = _layer()
    u = torch.randn(2, 3, 5, 5, 4, dtype=torch.float64)
    out = layer(u)
    assert out.poses.shape == (2, 2, 3, 3, 5) and out.couplings.shape == (2, 9, 27, 2)
    votes = _votes_by_definition(u, layer.weight.detach(), 2, 1)
    routing = create_routing("dynamic", iterations=3)
    for n in range(votes.shape[0]):  # one routing problem per (image, window)
        ref = routing(votes[n:n + 1])
        b, l = divmod(n, 9)
        torch.testing.assert_close(out.poses[b, :, l // 3, l % 3], ref.poses[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.couplings[b, l], ref.couplings[0], rtol=1e-10, atol=1e-12)
    # dynamic routing normalises each child over the parent types of its window
    torch.testing.assert_close(out.couplings.sum(-1), torch.ones(2, 9, 27, dtype=torch.float64))


@pytest.mark.parametrize("routing", ["dynamic", "em", "vb", "scaled_distance", "self_attention",
                                     "inverted_attention"])
def test_layer_runs_every_plain_vote_routing_with_finite_gradients(routing):
    layer = _layer(routing)
    u = torch.randn(2, 3, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    out = layer(u)
    loss = out.poses.square().sum() + (0 if out.activations is None else out.activations.sum())
    loss.backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    if out.activations is not None:
        assert out.activations.shape == (2, 2, 3, 3)


def test_gradcheck_layer():
    torch.manual_seed(1)
    layer = ConvCaps2d(2, 2, 2, 2, kernel_size=2, routing_kwargs={"iterations": 2}).double()
    u = torch.randn(1, 2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).poses, (u,))


def test_one_by_one_kernel_on_one_position_is_a_fully_connected_capsule_layer():
    from torchcaps.layers import CapsLinear

    torch.manual_seed(2)
    conv = ConvCaps2d(6, 4, 3, 5, kernel_size=1).double()
    fc = CapsLinear(6, 4, 3, 5).double()
    with torch.no_grad():
        fc.weight.copy_(conv.weight[0])  # (T, C, D_out, D_in) == (I, J, D, K)
    u = torch.randn(2, 6, 4, dtype=torch.float64)
    a = conv(u.view(2, 6, 1, 1, 4))
    b = fc(u)
    torch.testing.assert_close(a.poses.view(2, 3, 5), b.poses)


def test_bad_input_and_arguments_get_clear_errors():
    layer = ConvCaps2d(3, 4, 2, 5, kernel_size=3)
    with pytest.raises(ValueError, match="ConvCaps2d input"):
        layer(torch.randn(2, 3, 5, 5, 8))  # wrong capsule dimension
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        layer(torch.randn(2, 3, 2, 2, 4))
    with pytest.raises(ValueError, match="finite|NaN"):
        layer(torch.full((1, 3, 4, 4, 4), float("nan")))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(1, 3, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="stride"):
        ConvCaps2d(3, 4, 2, 5, stride=0)
    with pytest.raises(ValueError, match="in_dim"):
        ConvCaps2d(3, 0, 2, 5)
    with pytest.raises(ValueError, match="K\\*K"):
        conv_capsule_votes(torch.randn(1, 2, 4, 4, 3), torch.randn(5, 2, 2, 3, 3))
