import pytest
import torch

import torchcaps.functional as F
from reference import margin_loss_loop, squash_loop
from torchcaps.layers import MarginLoss, ReconstructionLoss, Squash


def test_squash_matches_loop_reference_float64():
    s = torch.randn(4, 7, 16, dtype=torch.float64) * 3
    torch.testing.assert_close(F.squash(s), squash_loop(s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [F.squash, F.squash_exp])
def test_squashed_lengths_below_one_and_direction_kept(fn):
    s = torch.randn(1000, 8, dtype=torch.float64) * torch.logspace(-3, 3, 1000, dtype=torch.float64)[:, None]
    v = fn(s)
    lengths = v.norm(dim=-1)
    assert (lengths < 1).all() and (lengths >= 0).all()
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize("fn", [F.squash, F.squash_exp, F.capsule_length])
def test_finite_gradient_at_zero_vector(fn):
    s = torch.zeros(3, 16, requires_grad=True)
    fn(s).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_naive_squash_would_be_nan_at_zero():
    # the regression this epsilon guards against: |s| in the denominator without eps
    s = torch.zeros(2, 4, requires_grad=True)
    sq = (s * s).sum(-1, keepdim=True)
    (sq / (1 + sq) * s / sq.sqrt()).sum().backward()
    assert not torch.isfinite(s.grad).all()


def test_squash_exp_formula():
    s = torch.randn(5, 8, dtype=torch.float64)
    n = s.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(F.squash_exp(s, eps=1e-300), (1 - torch.exp(-n)) * s / n)


@pytest.mark.parametrize("fn", [F.squash, F.squash_exp])
def test_squash_gradcheck(fn):
    s = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (s,))


def test_squash_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        F.squash(torch.ones(2, 3), eps=0)
    with pytest.raises(ValueError, match="variant"):
        Squash("nope")


def test_margin_loss_matches_loop_reference():
    lengths = torch.rand(6, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    ref = margin_loss_loop(lengths, labels)
    assert F.margin_loss(lengths, labels).item() == pytest.approx(ref, rel=1e-12)
    assert MarginLoss()(lengths, labels).item() == pytest.approx(ref, rel=1e-12)


def test_margin_loss_zero_when_perfect_and_multihot():
    lengths = torch.full((2, 4), 0.05)
    lengths[0, 1] = lengths[1, 3] = 0.95
    assert F.margin_loss(lengths, torch.tensor([1, 3])).item() == 0.0
    multi = torch.zeros(2, 4)
    multi[0, 1] = multi[1, 3] = 1
    assert F.margin_loss(lengths, multi).item() == 0.0


def test_margin_loss_bad_input():
    with pytest.raises(ValueError, match="targets must lie"):
        F.margin_loss(torch.rand(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        F.margin_loss(torch.rand(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 dimensions"):
        F.margin_loss(torch.rand(2, 3, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        F.margin_loss(torch.tensor([[float("nan"), 0.1]]), torch.tensor([0]))


def test_reconstruction_loss_sum_form_equals_0392_mse():
    x, r = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.rand(4, 1, 28, 28, dtype=torch.float64)
    loss = F.reconstruction_loss(r, x)
    torch.testing.assert_close(loss, 0.0005 * ((r - x) ** 2).sum() / 4)
    torch.testing.assert_close(loss, 0.392 * ((r - x) ** 2).mean())
    assert ReconstructionLoss()(r, x) == loss
    with pytest.raises(ValueError, match="does not match"):
        F.reconstruction_loss(r, x[:, :, :27])
