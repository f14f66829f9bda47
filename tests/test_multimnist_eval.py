"""MultiMNIST helpers (Sabour et al. 2017, arXiv 1710.09829, Sec. 6)."""

import pytest
import torch

from torchcaps.functional import margin_loss
from torchcaps.models._registry import create_model
from torchcaps.train.multimnist import (
    evaluate_multimnist,
    reconstruct_each,
    top2_accuracy,
    top2_hits,
    two_digit_reconstruction_loss,
    two_hot,
    two_label_margin_loss,
)


def tiny_capsnet(**kw):
    return create_model("capsnet", in_shape=(1, 36, 36), conv_channels=16, primary_types=4, **kw)


def margin_loop(lengths, labels_2, m_pos=0.9, m_neg=0.1, lam=0.5):
    """Eq. 4 of the paper with T_k = 1 for both digits, written with loops in float64."""
    total = 0.0
    for b in range(lengths.shape[0]):
        present = {int(labels_2[b, 0]), int(labels_2[b, 1])}
        for k in range(lengths.shape[1]):
            v = float(lengths[b, k])
            if k in present:
                total += max(0.0, m_pos - v) ** 2
            else:
                total += lam * max(0.0, v - m_neg) ** 2
    return total / lengths.shape[0]


def random_labels_2(b, k=10):
    first = torch.randint(0, k, (b,))
    second = (first + torch.randint(1, k, (b,))) % k  # always a different class
    return torch.stack([first, second], dim=1)


def test_two_label_margin_loss_matches_loop_reference():
    lengths = torch.rand(6, 10, dtype=torch.float64)
    y2 = random_labels_2(6)
    loss = two_label_margin_loss(lengths, y2)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(margin_loop(lengths, y2), rel=1e-12)
    loss2 = two_label_margin_loss(lengths, y2, m_pos=0.8, m_neg=0.2, lambda_neg=0.25)
    assert loss2.item() == pytest.approx(margin_loop(lengths, y2, 0.8, 0.2, 0.25), rel=1e-12)
    # the same as the library's margin loss with a hand-made two-hot mask
    hot = torch.zeros(6, 10, dtype=torch.float64)
    hot[torch.arange(6), y2[:, 0]] = 1
    hot[torch.arange(6), y2[:, 1]] = 1
    torch.testing.assert_close(loss, margin_loss(lengths, hot))
    # order of the two labels does not matter
    torch.testing.assert_close(two_label_margin_loss(lengths, y2.flip(1)), loss)


def test_two_label_margin_loss_on_model_output_has_finite_gradients():
    m = tiny_capsnet()
    x = torch.rand(2, 1, 36, 36)
    y2 = torch.tensor([[1, 7], [0, 3]])
    loss = two_label_margin_loss(m(x).logits, y2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.conv1.weight.grad.abs().sum() > 0


def test_two_hot():
    torch.testing.assert_close(two_hot(torch.tensor([[0, 2]]), 4), torch.tensor([[1, 0, 1, 0.0]]))


def test_top2_accuracy_hand_cases():
    logits = torch.tensor([
        [0.1, 0.9, 0.2, 0.8],  # top-2 {1, 3}
        [0.9, 0.1, 0.8, 0.2],  # top-2 {0, 2}
        [0.5, 0.4, 0.3, 0.2],  # top-2 {0, 1}
        [0.0, 0.1, 0.7, 0.6],  # top-2 {2, 3}
    ])
    labels = torch.tensor([[3, 1],   # both right (order irrelevant)
                           [0, 1],   # one right
                           [2, 3],   # none right
                           [2, 3]])  # both right
    assert top2_hits(logits, labels).tolist() == [2, 1, 0, 2]
    assert top2_accuracy(logits, labels) == pytest.approx(0.5)
    # the official code's test case (layers_test.py::testEvaluateMulti): 1 correct of 3
    off_logits = torch.tensor([[-0.3, 0.3, 0.9, 0.0], [1.2, 0.5, -0.5, 0.0],
                               [0.0, 0.0, 0.0, 0.01]])
    off_labels = torch.tensor([[0, 2], [2, 3], [1, 3]])
    assert top2_hits(off_logits, off_labels).tolist() == [1, 0, 1]
    assert top2_accuracy(off_logits, off_labels) == pytest.approx(0.0)
    assert top2_accuracy(off_logits[:1], torch.tensor([[2, 1]])) == 1.0


def test_bad_labels_are_clear():
    lengths = torch.rand(2, 10)
    with pytest.raises(ValueError, match="must differ"):
        two_label_margin_loss(lengths, torch.tensor([[1, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"labels_2 must have shape \(2, 2\)"):
        top2_accuracy(lengths, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="int64"):
        top2_accuracy(lengths, torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        two_label_margin_loss(lengths, torch.tensor([[1, 10], [2, 3]]))
    with pytest.raises(ValueError, match="lengths contains non-finite"):
        two_label_margin_loss(torch.full((2, 10), float("nan")), torch.tensor([[1, 0], [2, 3]]))


def test_reconstruct_each_shapes_and_matches_single_decodes():
    m = tiny_capsnet().eval()
    x = torch.rand(3, 1, 36, 36)
    y2 = torch.tensor([[1, 7], [0, 3], [9, 4]])
    recon = reconstruct_each(m, x, y2)
    assert recon.shape == (3, 2, 1, 36, 36)
    poses = m(x).poses
    for n in range(2):
        torch.testing.assert_close(recon[:, n], m.decoder(poses, y2[:, n]))
    # poses of order 1 (an untrained net's are tiny) make every mix-up visible
    poses = torch.randn(3, 10, 16)
    recon = reconstruct_each(m, x, y2, poses=poses)
    for n in range(2):
        torch.testing.assert_close(recon[:, n], m.decoder(poses, y2[:, n]))
        for b in range(3):
            one = m.decoder(poses[b:b + 1], y2[b:b + 1, n])[0]
            torch.testing.assert_close(recon[b, n], one)
    assert (recon[:, 0] - recon[:, 1]).abs().max() > 1e-3
    # classes=None: the two longest capsules, in order of length
    top = m(x).logits.topk(2, dim=1).indices
    torch.testing.assert_close(reconstruct_each(m, x), reconstruct_each(m, x, top))


def test_each_reconstruction_depends_only_on_its_own_capsule():
    torch.manual_seed(1)
    m = tiny_capsnet().eval()
    x = torch.rand(2, 1, 36, 36)
    y2 = torch.tensor([[2, 5], [8, 0]])
    with torch.no_grad():
        poses = m(x).poses.clone()
    for n in range(2):
        p = poses.clone().requires_grad_(True)
        reconstruct_each(m, x, y2, poses=p)[:, n].sum().backward()
        grad_norm = p.grad.norm(dim=2)  # (B, K)
        for b in range(2):
            for k in range(10):
                if k == int(y2[b, n]):
                    assert grad_norm[b, k] > 0
                else:
                    assert grad_norm[b, k] == 0, (n, b, k)
    # changing the other digit's capsule (and any absent class) leaves a reconstruction alone
    before = reconstruct_each(m, x, y2, poses=poses)
    changed = poses.clone()
    changed[torch.arange(2), y2[:, 1]] += 0.3
    changed[:, 4] -= 0.2  # class 4 is absent everywhere
    after = reconstruct_each(m, x, y2, poses=changed)
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_reconstruct_each_bad_input():
    x = torch.rand(2, 1, 36, 36)
    with pytest.raises(ValueError, match="no reconstruction decoder"):
        reconstruct_each(tiny_capsnet(reconstruction=False), x, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="must differ"):
        reconstruct_each(tiny_capsnet(), x, torch.tensor([[1, 1], [3, 4]]))
    with pytest.raises(ValueError, match="poses must have shape"):
        reconstruct_each(tiny_capsnet(), x, torch.tensor([[1, 2], [3, 4]]),
                         poses=torch.rand(3, 10, 16))


def test_two_digit_reconstruction_loss_matches_loop():
    recon = torch.rand(3, 2, 1, 5, 4, dtype=torch.float64)
    singles = torch.rand(3, 2, 1, 5, 4, dtype=torch.float64)
    ref = 0.0
    for b in range(3):
        for n in range(2):
            ref += float(((recon[b, n] - singles[b, n]) ** 2).sum())
    loss = two_digit_reconstruction_loss(recon, singles, weight=0.01)
    assert loss.item() == pytest.approx(0.01 * ref / 3, rel=1e-12)
    with pytest.raises(ValueError, match="singles must have shape"):
        two_digit_reconstruction_loss(recon, singles[:, :1])
    with pytest.raises(ValueError, match="recon_each must have 5 dimensions"):
        two_digit_reconstruction_loss(recon[:, 0], singles[:, 0])


def overlay_pairs(n, seed=0):
    """A few MultiMNIST-style images from the bundled MNIST sample: two digits of different
    classes, each shifted by up to 4 px on a 36x36 canvas, overlaid with a pixel-wise max
    (the authors' generator clips the sum instead; either will do for this test). Also
    returns each digit alone on the canvas."""
    from torchcaps.data import load_dataset

    g = torch.Generator().manual_seed(seed)
    x, y = load_dataset("mnist-mini").train.batch(slice(0, 64))
    images, labels, singles = [], [], []
    while len(images) < n:
        i, j = torch.randint(0, len(y), (2,), generator=g).tolist()
        if y[i] == y[j]:
            continue
        alone = torch.zeros(2, 1, 36, 36)
        for slot, k in enumerate((i, j)):
            dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()  # 4 +- 4 px
            alone[slot, :, dy:dy + 28, dx:dx + 28] = x[k]
        images.append(alone.max(dim=0).values)
        singles.append(alone)
        labels.append([int(y[i]), int(y[j])])
    return torch.stack(images), torch.tensor(labels), torch.stack(singles)


def test_evaluate_multimnist_agrees_with_top2_accuracy_and_training_learns():
    torch.manual_seed(0)
    x, y2, singles = overlay_pairs(12)
    m = tiny_capsnet()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.train()
    first = None
    for _ in range(40):
        out = m(x)
        loss = two_label_margin_loss(out.logits, y2)
        # reconstruct each digit from its own capsule, against that digit alone
        recon = reconstruct_each(m, x, y2, poses=out.poses)  # (B, 2, 1, 36, 36)
        loss = loss + two_digit_reconstruction_loss(recon, singles)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    res = evaluate_multimnist(m, x, y2, batch_size=5)
    m.eval()
    with torch.no_grad():
        direct = top2_accuracy(m(x).logits, y2)
    assert res["top2_accuracy"] == pytest.approx(direct)
    assert res["error"] == pytest.approx(1 - direct)
    assert res["total"] == 12 and res["at_least_one"] >= res["top2_accuracy"]
    assert m.training is False  # evaluate restored the mode it found (eval here)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_multimnist(m, x, y2, batch_size=0)
