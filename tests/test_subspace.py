"""Subspace capsules and the subspace capsule classifier (Edraki et al. 2020, arXiv 2002.02924)."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from torchcaps.layers.subspace import (
    FoldedSubspaceCaps,
    SubspaceCaps,
    SubspaceConvCaps,
    inverse_sqrt_gram,
    subspace_activation,
)
from torchcaps.models._registry import create_model, list_models
from torchcaps.models.subspace_capsnet import SubspaceCapsNet

# ----------------------------------------------------------------------------- references


def projector(w):
    """P = W (W^T W)^-1 W^T with an explicit inverse, float64."""
    return w @ torch.linalg.inv(w.T @ w) @ w.T


def inv_sqrt_numpy(g):
    """G^(-1/2) through numpy's eigendecomposition (independent of the library path)."""
    lam, q = np.linalg.eigh(g.numpy())
    return torch.from_numpy(q @ np.diag(lam ** -0.5) @ q.T)


def subspace_fc_loop(x, w, threshold=None, eps=1e-8):
    """u_j = G_j^(-1/2) W_j^T x and Eq. (4), written with loops, float64."""
    b_n, j_n, c_n = x.shape[0], w.shape[0], w.shape[2]
    out = torch.zeros(b_n, j_n, c_n, dtype=torch.float64)
    for j in range(j_n):
        m = inv_sqrt_numpy(w[j].T @ w[j]) @ w[j].T  # (C, N)
        for b in range(b_n):
            u = torch.zeros(c_n, dtype=torch.float64)
            for c in range(c_n):
                u[c] = sum(float(m[c, n]) * float(x[b, n]) for n in range(x.shape[1]))
            if threshold is not None:
                norm = math.sqrt(float((u * u).sum()) + eps)
                u = u * (max(norm - float(threshold[j]) ** 2, 0.0) / norm)
            out[b, j] = u
    return out


def patches_loop(x, k, stride, padding):
    """Every k x k patch of x flattened in (C_in, k, k) order: (B, H', W', C_in*k*k)."""
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    b_n, _, h, w = xp.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    out = torch.zeros(b_n, oh, ow, x.shape[1] * k * k, dtype=x.dtype)
    for b in range(b_n):
        for i in range(oh):
            for t in range(ow):
                out[b, i, t] = xp[b, :, i * stride:i * stride + k, t * stride:t * stride + k].reshape(-1)
    return out


# ----------------------------------------------------------------------------- FC layer


def test_capsule_length_is_norm_of_projection_onto_span():
    layer = SubspaceCaps(7, 3, 2, activation=False).double()
    x = torch.randn(5, 7, dtype=torch.float64)
    u = layer(x)  # (5, 3, 2)
    w = layer.weight.detach()
    for j in range(3):
        p = projector(w[j])
        for b in range(5):
            torch.testing.assert_close(u[b, j].norm(), (p @ x[b]).norm(), rtol=1e-10, atol=1e-12)


def test_matches_loop_reference_with_and_without_activation():
    layer = SubspaceCaps(6, 3, 2).double()
    with torch.no_grad():
        layer.threshold.copy_(torch.tensor([0.3, 0.9, 1.2]))
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b = layer.weight.detach(), layer.threshold.detach()
    torch.testing.assert_close(layer(x), subspace_fc_loop(x, w, b), rtol=1e-9, atol=1e-12)
    raw = SubspaceCaps(6, 3, 2, activation=False).double()
    with torch.no_grad():
        raw.weight.copy_(w)
    torch.testing.assert_close(raw(x), subspace_fc_loop(x, w), rtol=1e-9, atol=1e-12)


def test_activation_zeroes_short_capsules_and_shortens_long_ones_by_b_squared():
    u = torch.tensor([[[0.05, 0.0], [3.0, 4.0]]], dtype=torch.float64)  # lengths 0.05, 5
    b = torch.tensor([0.3, 0.3], dtype=torch.float64).view(1, 2, 1)
    v = subspace_activation(u, b, eps=1e-30)
    assert torch.all(v[0, 0] == 0)
    torch.testing.assert_close(v[0, 1].norm(), torch.tensor(5.0 - 0.09, dtype=torch.float64))
    torch.testing.assert_close(v[0, 1] / v[0, 1].norm(), u[0, 1] / 5.0)  # direction kept


def test_effective_weight_is_the_symmetric_orthonormalisation_of_the_basis():
    layer = SubspaceCaps(6, 2, 3).double()
    m = layer.effective_weight().detach()  # (J, C, N)
    w = layer.weight.detach()
    eye = torch.eye(3, dtype=torch.float64)
    for j in range(2):
        torch.testing.assert_close(m[j] @ m[j].T, eye, rtol=0, atol=1e-10)  # orthonormal rows
        torch.testing.assert_close(m[j].T @ m[j], projector(w[j]), rtol=0, atol=1e-10)
        root = m[j] @ w[j]  # = G^(1/2): symmetric positive definite (fixes M uniquely)
        torch.testing.assert_close(root, root.T, rtol=0, atol=1e-10)
        assert torch.linalg.eigvalsh(root).min() > 0


@pytest.mark.parametrize("conv", [False, True])
def test_lengths_do_not_depend_on_the_choice_of_basis(conv):
    if conv:
        layer = SubspaceConvCaps(2, 3, 2, kernel_size=2, activation=False).double()
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        pose = 2
    else:
        layer = SubspaceCaps(6, 3, 2, activation=False).double()
        x = torch.randn(4, 6, dtype=torch.float64)
        pose = 2
    u = layer(x)
    r = torch.randn(3, 2, 2, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(layer.weight @ r)  # W_j -> W_j R_j, same spans
    u2 = layer(x)
    assert not torch.allclose(u, u2)  # the coordinates rotate ...
    torch.testing.assert_close(u2.norm(dim=pose), u.norm(dim=pose), rtol=1e-9, atol=1e-12)


def test_gradcheck_fc_layer_float64():
    layer = SubspaceCaps(5, 2, 2).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return functional_call(layer, {"weight": w, "threshold": b}, (x,))

    w = layer.weight.detach().clone().requires_grad_()
    b = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_inverse_sqrt_at_repeated_eigenvalues():
    # An orthonormal basis has W^T W = I: all eigenvalues equal, where autograd through
    # eigh divides by zero. The divided-difference backward must still be exact.
    q = torch.linalg.qr(torch.randn(2, 5, 3, dtype=torch.float64))[0].requires_grad_()
    assert torch.autograd.gradcheck(inverse_sqrt_gram, (q,))
    w = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(inverse_sqrt_gram, (w,))


def test_finite_gradients_at_zero_input_and_orthonormal_basis():
    layer = SubspaceCaps(6, 2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.qr(torch.randn(2, 6, 3))[0])
    x = torch.zeros(2, 6, requires_grad=True)
    v = layer(x)
    assert torch.all(v == 0)
    (v.sum() + layer(torch.randn(2, 6)).pow(2).sum()).backward()
    for t in (x.grad, layer.weight.grad, layer.threshold.grad):
        assert torch.isfinite(t).all()


# ----------------------------------------------------------------------------- conv layer


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_conv_lengths_are_patch_projection_norms(stride, padding):
    layer = SubspaceConvCaps(2, 3, 2, kernel_size=3, stride=stride, padding=padding,
                             activation=False).double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    u = layer(x)  # (B, J, C, H', W')
    pats = patches_loop(x, 3, stride, padding)  # (B, H', W', N)
    assert u.shape == (2, 3, 2, pats.shape[1], pats.shape[2])
    assert (pats.shape[1], pats.shape[2]) == layer.output_size(5, 6)
    w = layer.weight.detach()
    for j in range(3):
        p = projector(w[j])
        for b in range(2):
            for i in range(pats.shape[1]):
                for t in range(pats.shape[2]):
                    torch.testing.assert_close(u[b, j, :, i, t].norm(), (p @ pats[b, i, t]).norm(),
                                               rtol=1e-10, atol=1e-12)


def test_conv_matches_fc_layer_applied_to_every_patch():
    conv = SubspaceConvCaps(2, 2, 3, kernel_size=2).double()
    fc = SubspaceCaps(8, 2, 3).double()
    with torch.no_grad():
        fc.weight.copy_(conv.weight)
        fc.threshold.copy_(torch.tensor([0.5, 0.1]))
        conv.threshold.copy_(fc.threshold)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    pats = patches_loop(x, 2, 1, 0)  # (B, 3, 2, 8)
    ref = fc(pats.reshape(-1, 8)).view(2, 3, 2, 2, 3).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_conv_layer_float64():
    layer = SubspaceConvCaps(2, 2, 2, kernel_size=2, stride=1, padding=1).double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()

    def f(x, w):
        return functional_call(layer, {"weight": w, "threshold": layer.threshold}, (x,))

    assert torch.autograd.gradcheck(f, (x, w))


# ----------------------------------------------------------------------------- folding


def _count_calls(module, kind):
    calls = []
    for sub in module.modules():
        if isinstance(sub, kind):
            sub.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("conv", [False, True])
def test_fold_gives_one_plain_layer_with_equal_outputs(conv, monkeypatch):
    if conv:
        layer = SubspaceConvCaps(3, 4, 2, kernel_size=3, stride=2, padding=1).double()
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
        plain_kind, n_in = nn.Conv2d, 3 * 9
    else:
        layer = SubspaceCaps(9, 4, 3).double()
        x = torch.randn(5, 9, dtype=torch.float64)
        plain_kind, n_in = nn.Linear, 9
    ref = layer(x)  # training mode: computed from the basis
    folded = layer.fold()
    assert isinstance(folded, FoldedSubspaceCaps)
    plain = [m for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(plain) == 1 and isinstance(plain[0], plain_kind)
    # the cost of a plain layer: J*C*N weights (no bias) and the J thresholds
    assert sum(p.numel() for p in folded.parameters()) == 4 * layer.caps_dim * n_in + 4
    calls = _count_calls(folded, plain_kind)

    def no_eigh(*a, **k):
        raise AssertionError("the folded forward must not decompose anything")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    torch.testing.assert_close(folded(x), ref, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1


def test_eval_mode_caches_the_folded_weight_and_refreshes_it_after_updates(monkeypatch):
    layer = SubspaceCaps(6, 2, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    train_out = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), train_out, rtol=1e-12, atol=1e-12)
    real_eigh, n = torch.linalg.eigh, []

    def counting_eigh(*a, **k):
        n.append(1)
        return real_eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    for _ in range(3):
        layer(x)
    assert n == []  # cached: no decomposition per call
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))  # e.g. an optimizer step
    out = layer(x)
    assert n == [1]
    layer.train()
    torch.testing.assert_close(out, layer(x), rtol=1e-12, atol=1e-12)


def test_eval_cache_built_under_inference_mode_still_allows_input_gradients():
    layer = SubspaceConvCaps(2, 2, 2, kernel_size=3).eval()
    with torch.inference_mode():
        layer(torch.randn(1, 2, 5, 5))
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- bad input


def test_subspace_dimension_larger_than_input_is_rejected():
    with pytest.raises(ValueError, match=r"caps_dim=5 exceeds the input dimension in_features=4"):
        SubspaceCaps(4, 2, 5)
    with pytest.raises(ValueError, match=r"caps_dim=19 exceeds .*in_channels\*kernel_size\*\*2=18"):
        SubspaceConvCaps(2, 2, 19, kernel_size=3)
    SubspaceConvCaps(2, 2, 18, kernel_size=3)  # a full-dimensional subspace is allowed
    with pytest.raises(ValueError, match="num_caps must be a positive"):
        SubspaceCaps(4, 0, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        SubspaceConvCaps(2, 2, 2, kernel_size=0)


def test_bad_inputs_raise_clear_errors():
    fc, conv = SubspaceCaps(4, 2, 2), SubspaceConvCaps(3, 2, 2)
    with pytest.raises(ValueError, match=r"SubspaceCaps input must have shape \(B, 4\)"):
        fc(torch.randn(2, 5))
    with pytest.raises(ValueError, match="SubspaceConvCaps input must have 4 dimensions"):
        conv(torch.randn(3, 5, 5))
    bad = torch.randn(2, 4)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fc(bad)
    with pytest.raises(TypeError, match="dtype"):
        fc(torch.randn(2, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- model


def test_model_is_registered_with_the_documented_parameter_count():
    assert "subspace_capsnet" in list_models()
    m = create_model("subspace_capsnet")
    assert sum(p.numel() for p in m.parameters()) == 307_072
    out = m(torch.rand(2, 1, 28, 28))
    assert out.logits.shape == (2, 10) and out.poses.shape == (2, 10, 16)
    torch.testing.assert_close(out.logits, out.poses.norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_model_fold_is_plain_and_equal_in_eval():
    m = SubspaceCapsNet(channels=(8, 8), sc_types=(4, 4), sc_dim=4, class_dim=4).eval()
    x = torch.rand(3, 1, 28, 28)
    folded = m.fold()
    assert not any(isinstance(s, (SubspaceCaps, SubspaceConvCaps)) for s in folded.modules())
    torch.testing.assert_close(folded(x).logits, m(x).logits, rtol=1e-5, atol=1e-5)


def test_model_rejects_bad_options():
    with pytest.raises(ValueError, match="loss must be one of"):
        SubspaceCapsNet(loss="hinge")
    with pytest.raises(ValueError, match="caps_dim=200 exceeds"):
        SubspaceCapsNet(class_dim=200)


@pytest.mark.parametrize("loss", ["margin", "cross_entropy"])
def test_model_overfits_a_tiny_batch(loss):
    m = SubspaceCapsNet(channels=(16, 16), sc_types=(8,), sc_dim=4, class_dim=4, loss=loss)
    x, y = torch.rand(10, 1, 28, 28), torch.arange(10)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = None
    for _ in range(40):
        out = m(x, y)
        value, parts = m.loss(out, x, y)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert set(parts) == {loss}
    assert value.item() < 0.2 * first
    assert (out.logits.argmax(1) == y).float().mean() >= 0.9
