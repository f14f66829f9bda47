"""The CNN baseline of Sabour et al. 2017 (arXiv 1710.09829), scaled to CapsNet's size."""

import pytest
import torch

from torchcaps.models._registry import create_model, list_models
from torchcaps.models.cnn_baseline import CNNBaseline, labels_to_multi_hot
from torchcaps.testing import overfit_tiny_batch

CAPSNET_PARAMS = 8_215_568


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny(**kw):
    return CNNBaseline(conv_channels=(4, 4, 2), hidden=(12, 8), **kw)


def test_registered():
    assert "cnn_baseline" in list_models()
    assert isinstance(create_model("cnn_baseline"), CNNBaseline)


def test_default_parameter_count_close_to_capsnet():
    m = create_model("cnn_baseline")
    assert n_params(m) == 8_208_913
    assert abs(n_params(m) - CAPSNET_PARAMS) / CAPSNET_PARAMS < 0.001
    assert [mod.out_channels for mod in m.features if isinstance(mod, torch.nn.Conv2d)] == [
        128, 128, 64]
    assert all(mod.kernel_size == (5, 5) and mod.stride == (1, 1)
               for mod in m.features if isinstance(mod, torch.nn.Conv2d))


def test_paper_widths_give_the_papers_35_4m():
    # Sabour et al.: conv 256, 256, 128 (5x5, stride 1), FC 328, 192: "35.4M" parameters,
    # which only "same" padding without pooling reproduces.
    m = CNNBaseline(conv_channels=(256, 256, 128), hidden=(328, 192))
    assert n_params(m) == 35_445_522


def test_affnist_canvas_and_class_count():
    m = tiny(in_shape=(1, 40, 40), num_classes=7).eval()
    out = m(torch.rand(3, 1, 40, 40))
    assert out.logits.shape == (3, 7)
    assert out.poses is None and out.reconstruction is None and out.couplings is None
    # the full-size model at 40x40: fc1 grows with H*W
    assert n_params(CNNBaseline(in_shape=(1, 40, 40))) == 16_094_737


def test_cross_entropy_loss_matches_reference():
    m = tiny()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([3, 1, 0, 9])
    out = m(x, y)
    loss, parts = m.loss(out, x, y)
    logp = out.logits.detach().log_softmax(1)
    ref = -sum(float(logp[b, y[b]]) for b in range(4)) / 4
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert set(parts) == {"cross_entropy"}


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    x = torch.rand(4, 1, 28, 28)
    m.eval()
    torch.testing.assert_close(m(x).logits, m(x).logits)
    m.train()
    assert not torch.equal(m(x).logits, m(x).logits)


def bce_loop(logits, hot):
    total = 0.0
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            p = 1.0 / (1.0 + torch.exp(-logits[b, k].double()))
            t = float(hot[b, k])
            total -= t * torch.log(p) + (1 - t) * torch.log(1 - p)
    return float(total) / logits.shape[0]


def test_multi_label_loss_with_two_class_lists_matches_loop():
    m = tiny(multi_label=True)
    x = torch.rand(3, 1, 28, 28)
    y2 = torch.tensor([[1, 7], [0, 9], [4, 2]])
    out = m(x, y2)
    loss, parts = m.loss(out, x, y2)
    hot = torch.zeros(3, 10)
    for b in range(3):
        hot[b, y2[b, 0]] = hot[b, y2[b, 1]] = 1
    assert loss.item() == pytest.approx(bce_loop(out.logits.detach(), hot), rel=1e-5)
    assert set(parts) == {"bce"}
    # the same targets given as a (B, K) float multi-hot mask
    loss_hot, _ = m.loss(m.eval()(x, hot), x, hot)
    loss_idx, _ = m.loss(m(x, y2), x, y2)
    torch.testing.assert_close(loss_hot, loss_idx)


def test_multi_label_accepts_single_labels_and_backpropagates_everywhere():
    m = tiny(multi_label=True).train()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    loss, _ = m.loss(m(x, y), x, y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_labels_to_multi_hot():
    hot = labels_to_multi_hot(torch.tensor([[1, 3], [2, 2], [0, 4]]), 5)
    torch.testing.assert_close(hot, torch.tensor(
        [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 1.0]]))
    one = labels_to_multi_hot(torch.tensor([2]), 3)
    torch.testing.assert_close(one, torch.tensor([[0, 0, 1.0]]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        labels_to_multi_hot(torch.tensor([[1, 5]]), 5)
    with pytest.raises(TypeError, match="integer tensor"):
        labels_to_multi_hot(torch.tensor([[1.0, 2.0]]), 5)


def test_bad_labels_are_clear():
    x = torch.rand(2, 1, 28, 28)
    single = tiny()
    with pytest.raises(ValueError, match="labels must have shape"):
        single(x, torch.tensor([[0, 1], [2, 3]]))  # (B, 2) needs multi_label=True
    multi = tiny(multi_label=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        multi(x, torch.tensor([[0, 1], [2, 10]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        multi(x, torch.tensor([[0, 1], [2, 3], [4, 5]]))
    with pytest.raises(ValueError, match="multi-hot mask of 0s and 1s"):
        multi(x, torch.full((2, 10), 0.5))
    with pytest.raises(ValueError, match="labels must have shape"):
        multi(x, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="labels must have shape"):
        multi(x, torch.tensor([0, 1, 2]))


def test_bad_options():
    with pytest.raises(ValueError, match="dropout"):
        CNNBaseline(dropout=1.0)
    with pytest.raises(ValueError, match="kernel_size"):
        CNNBaseline(kernel_size=4)
    with pytest.raises(ValueError, match="conv_channels"):
        CNNBaseline(conv_channels=(8, 0))
    with pytest.raises(ValueError, match="hidden"):
        CNNBaseline(hidden=(-1,))


def test_overfits_a_tiny_batch():

    m = CNNBaseline(conv_channels=(8, 8, 4), hidden=(32, 16), dropout=0.0)
    loss, acc = overfit_tiny_batch(m, steps=80, lr=3e-3)
    assert acc == 1.0
    assert loss < 0.1
