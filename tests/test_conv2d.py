import pytest
import torch
from torch import nn

import torchcaps.layers.conv2d as conv2d
from torchcaps.layers.conv2d import Conv2d, conv2d_weight_grad


@pytest.mark.parametrize("stride,padding,kernel,bias", [
    (1, 0, 9, True), (2, 0, 9, True), (2, 1, 3, False), (3, 2, (5, 3), True), ((2, 1), (1, 0), 4, True)])
def test_gradients_equal_nn_conv2d(monkeypatch, stride, padding, kernel, bias):
    monkeypatch.setattr(conv2d, "FORWARD_WEIGHT_GRAD", True)
    g = torch.Generator().manual_seed(0)
    ref = nn.Conv2d(3, 5, kernel, stride, padding, bias=bias).double()
    fast = Conv2d(3, 5, kernel, stride, padding, bias=bias).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 17, 14, dtype=torch.float64, generator=g, requires_grad=True)
    y_ref, y = ref(x), fast(x)
    assert y.grad_fn is not None and "ForwardWeightGrad" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    w = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((y * w).sum(), [x, *fast.parameters()])
    want = torch.autograd.grad((y_ref * w).sum(), [x, *ref.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weight_grad_function_matches_autograd():
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x, weight, stride=2, padding=1)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, weight, g)[0]
    torch.testing.assert_close(conv2d_weight_grad(x, g, (3, 3), (2, 2), (1, 1)), want)


def test_falls_back_where_not_measured(monkeypatch):
    """Disabled, in eval/no-grad, with groups or dilation: plain nn.Conv2d."""
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    monkeypatch.setattr(conv2d, "FORWARD_WEIGHT_GRAD", False)
    assert "ForwardWeightGrad" not in type(Conv2d(4, 4, 3)(x).grad_fn).__name__
    monkeypatch.setattr(conv2d, "FORWARD_WEIGHT_GRAD", True)
    assert "ForwardWeightGrad" not in type(Conv2d(4, 4, 3, groups=2)(x).grad_fn).__name__
    assert "ForwardWeightGrad" not in type(Conv2d(4, 4, 3, dilation=2)(x).grad_fn).__name__
    with torch.no_grad():
        assert Conv2d(4, 4, 3)(x).grad_fn is None
    # a model saved with nn.Conv2d loads into Conv2d and back
    assert set(Conv2d(4, 4, 3).state_dict()) == set(nn.Conv2d(4, 4, 3).state_dict())
