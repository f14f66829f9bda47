"""3D-UCaps (Nguyen et al. 2021) and the self-supervised pretext of SS-3DCapsNet (Tran et al. 2022)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from torchcaps.models import SegmentationOutput, create_model, list_models, model_task
from torchcaps.models.ucaps import (
    ENCODER_PREFIXES,
    UCaps3D,
    pretext_batch,
    pretext_loss,
    ucaps3d,
    ucaps_margin_loss,
)

# small widths for fast tests; the architecture (depth, strides, skips) is the paper's
TINY = dict(stem_channels=(4, 8, 8), primary_types=2, primary_atoms=4, encoder_types=(2, 2, 2, 2, 2),
            encoder_atoms=(4, 4, 4, 4, 4, 8), decoder_channels=(8, 8, 8), fuse_channels=(8, 8),
            recon_channels=(4, 4))


def n_params(m, prefix=""):
    return sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))


def tiny(**kw):
    return ucaps3d(**{**TINY, **kw})


def cube(size=16, batch=1, channels=1):
    """A bright box in a darker volume and its labels."""
    y = torch.zeros(batch, size, size, size, dtype=torch.long)
    y[:, 4:12, 5:13, 3:11] = 1
    x = (y.float() * 0.6 + 0.2 + 0.05 * torch.randn(batch, size, size, size)).clamp(0, 1)
    return x[:, None].expand(batch, channels, size, size, size).contiguous(), y


def test_registered_as_segmentation_model():
    assert "ucaps3d" in list_models(task="segmentation")
    assert "ucaps3d" not in list_models()  # not a classifier
    assert model_task("ucaps3d") == "segmentation"
    m = create_model("ucaps3d", **TINY)
    assert isinstance(m, UCaps3D)
    assert (m.in_channels, m.num_classes, m.spatial_dims, m.size_multiple) == (1, 2, 3, 8)


def test_official_iseg_configuration_and_parameter_count():
    m = ucaps3d(in_channels=2, num_classes=4)
    # the capsule encoder of the official code: (types, atoms, stride, iterations)
    layers = [m.primary, *m.encoder]
    assert [(l.out_types, l.out_dim, l.stride, l.routing.iterations, l.kernel_size, l.padding)
            for l in layers] == [(16, 4, 1, 1, 3, 1), (16, 8, 2, 3, 3, 1), (16, 8, 1, 3, 3, 1),
                                 (8, 16, 2, 3, 3, 1), (8, 16, 1, 3, 3, 1), (8, 32, 2, 3, 3, 1),
                                 (4, 64, 1, 3, 3, 1)]
    assert all(l.share_weight for l in layers)
    assert [c.dilation for c in (m.stem[0][0], m.stem[1][0], m.stem[2][0])] == [(1,) * 3, (2,) * 3, (2,) * 3]
    assert isinstance(m.stem[2][2], torch.nn.Tanh)
    # derived by hand: stem convs (no bias) + PReLU slopes; capsule kernels + routing biases;
    # transposed convs 2^3; 3^3 convs (no bias) + PReLU; 1^3 heads
    stem = 2 * 16 * 125 + 1 + 16 * 32 * 125 + 1 + 32 * 64 * 125
    caps_in = [64, 4, 8, 8, 16, 16, 32]
    caps_out = [16 * 4, 16 * 8, 16 * 8, 8 * 16, 8 * 16, 8 * 32, 4 * 64]
    caps = sum(i * o * 27 + o for i, o in zip(caps_in, caps_out))
    decoder = (256 * 256 * 8 + 256) + (384 * 128 * 27 + 1) + (128 * 128 * 8 + 128) + \
              (256 * 64 * 27 + 1) + (64 * 64 * 8 + 64) + (128 * 4 + 4)
    recon = 128 * 64 + 64 + 64 * 128 + 128 + 128 * 2 + 2
    assert n_params(m, "stem.") == stem == 324_002
    assert n_params(m, "primary.") + n_params(m, "encoder.") == caps == 567_872
    assert n_params(m) == stem + caps + decoder + recon == 3_367_274
    # the official module counts 3,368,362: it also has a bias on each capsule layer's
    # vote convolution (C * D_out values per layer), which this layer does not
    assert n_params(m) + sum(caps_out) == 3_368_362


def test_default_model_forward_backward_reaches_every_parameter():
    m = ucaps3d(in_channels=2, num_classes=4)
    x = torch.rand(1, 2, 16, 16, 16)
    y = torch.randint(0, 4, (1, 16, 16, 16))
    out = m(x, y)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (1, 4, 16, 16, 16)
    assert out.reconstruction.shape == (1, 2, 16, 16, 16)
    assert out.aux["lengths"].shape == (1, 4, 2, 2, 2)
    assert ((out.aux["lengths"] >= 0) & (out.aux["lengths"] < 1)).all()
    loss, parts = m.loss(out, x, y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_tiny_non_cubic_shapes_and_batch():
    m = tiny(in_channels=3, num_classes=5)
    x = torch.rand(2, 3, 8, 16, 24)
    out = m(x)
    assert out.logits.shape == (2, 5, 8, 16, 24)
    assert out.reconstruction.shape == x.shape
    assert ((out.reconstruction > 0) & (out.reconstruction < 1)).all()  # sigmoid
    assert out.aux["lengths"].shape == (2, 5, 1, 2, 3)
    # samples do not interact (instance norm, per-position routing)
    one = m(x[1:]).logits
    torch.testing.assert_close(one, out.logits[1:], atol=1e-5, rtol=1e-4)


def test_loss_parts_weights_and_references():
    m = tiny(num_classes=3)
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 16, 16, 16))
    out = m(x, y)
    loss, parts = m.loss(out, x, y)
    assert set(parts) == {"margin", "cross_entropy", "reconstruction"}
    assert all(not v.requires_grad and torch.isfinite(v) for v in parts.values())
    torch.testing.assert_close(loss.detach(), 0.1 * parts["margin"] + parts["cross_entropy"]
                               + 0.1 * parts["reconstruction"])
    torch.testing.assert_close(parts["cross_entropy"], F.cross_entropy(out.logits.detach(), y))
    # masked reconstruction: squared error over channels and foreground voxels / foreground count
    rec, ref = out.reconstruction.detach(), []
    for b in range(2):
        fg = y[b] > 0
        ref.append(((rec[b] - x[b])[:, fg] ** 2).sum() / fg.sum())
    torch.testing.assert_close(parts["reconstruction"], torch.stack(ref).mean())


def test_margin_loss_uses_labels_downsampled_to_the_capsule_grid():
    torch.manual_seed(1)
    lengths = torch.rand(2, 3, 2, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 16, 16, 16))
    # trilinear interpolation by 1/8 (align_corners=False) reads the centre 2^3 of each 8^3 block
    onehot = F.one_hot(y, 3).permute(0, 4, 1, 2, 3).double()
    target = torch.zeros(2, 3, 2, 2, 2, dtype=torch.float64)
    for i, j, k in itertools.product(range(2), repeat=3):
        target[..., i, j, k] = onehot[..., 8 * i + 3:8 * i + 5, 8 * j + 3:8 * j + 5,
                                      8 * k + 3:8 * k + 5].mean(dim=(-3, -2, -1))
    ref = 0.0
    for b, c, i, j, k in itertools.product(range(2), range(3), range(2), range(2), range(2)):
        t, v = target[b, c, i, j, k], lengths[b, c, i, j, k]
        ref += 0.5 * t * max(0.0, 0.7 - v) ** 2 + 0.25 * (1 - t) * max(0.0, v - 0.3) ** 2
    ref /= 2 * 8  # mean over batch and positions, sum over classes
    assert ucaps_margin_loss(lengths, y).item() == pytest.approx(float(ref), rel=1e-10)
    # labels away from the block centres do not reach the margin term ...
    y2 = y.clone()
    y2[:, 0:3] = (y2[:, 0:3] + 1) % 3
    assert ucaps_margin_loss(lengths, y2).item() == pytest.approx(float(ref), rel=1e-10)
    # ... while the centres do
    y2[:, 3:5, 3:5, 3:5] = (y2[:, 3:5, 3:5, 3:5] + 1) % 3
    assert ucaps_margin_loss(lengths, y2).item() != pytest.approx(float(ref), rel=1e-6)


def test_margin_part_of_the_model_loss():
    m = tiny()
    x, y = cube()
    out = m(x, y)
    _, parts = m.loss(out, x, y)
    torch.testing.assert_close(parts["margin"], ucaps_margin_loss(out.aux["lengths"].detach(), y))


def test_loss_without_foreground_and_other_classification_losses():
    x = torch.rand(1, 1, 8, 8, 8)
    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    m = tiny()
    loss, parts = m.loss(m(x), x, y)
    assert parts["reconstruction"] == 0 and torch.isfinite(loss)
    for kind, key in (("dice_ce", "dice_ce"), ("dice", "dice")):
        m = tiny(cls_loss=kind)
        loss, parts = m.loss(m(x), x, y)
        assert set(parts) == {"margin", key, "reconstruction"} and torch.isfinite(loss)


def test_overfits_a_tiny_volume():
    torch.manual_seed(0)
    m = tiny()
    x, y = cube()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def dice():
        with torch.no_grad():
            p = m(x).logits.argmax(1) == 1
        return 2 * (p & (y == 1)).sum().item() / (p.sum().item() + (y == 1).sum().item())

    before = dice()
    first = None
    for _ in range(30):
        loss, _ = m.loss(m(x, y), x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    assert dice() > 0.9 > before + 0.3


def test_input_errors():
    m = tiny()
    with pytest.raises(ValueError, match="3D model"):
        m(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        m(torch.rand(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match="dimension 1"):
        m(torch.rand(1, 2, 16, 16, 16))
    x, y = cube()
    with pytest.raises(ValueError, match="shape of the images"):
        m(x, y[:, :8])
    out = m(x)
    with pytest.raises(ValueError, match="shape of the images"):
        m.loss(out, x, y[:, :, :8])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        m.loss(out, x, y * 2)
    with pytest.raises(TypeError, match="integer class indices"):
        m.loss(out, x, y.float())
    with pytest.raises(ValueError, match="spatial_dims=3"):
        ucaps3d(spatial_dims=2)
    with pytest.raises(ValueError, match="cls_loss"):
        ucaps3d(cls_loss="focal")


# ---------------------------------------------------------------------- pretext
def test_pretext_batch_is_deterministic_per_seed():
    vols = torch.rand(3, 2, 16, 16, 16)

    def make(seed):
        return pretext_batch(vols, torch.Generator().manual_seed(seed))

    (a, ta), (b, _), (c, _) = make(0), make(0), make(1)
    assert a.shape == vols.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(ta, vols) and ta.data_ptr() != vols.data_ptr()
    assert not torch.equal(a, vols)
    # the generator advances by the same count whatever the sizes: a resumed run stays aligned
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pretext_batch(vols, g1)
    pretext_batch(torch.rand(3, 1, 8, 16, 24), g2, transforms=("mask",))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_pretext_transforms():
    vols = torch.rand(4, 1, 8, 16, 16)
    g = torch.Generator().manual_seed(0)
    flipped, _ = pretext_batch(vols, g, transforms=("flip",))
    for x, v in zip(flipped, vols):
        flips = [v.flip(list(a)) if a else v for r in range(4) for a in itertools.combinations((1, 2, 3), r)]
        assert any(torch.equal(x, f) for f in flips)
    rotated, _ = pretext_batch(vols, g, transforms=("rotate",))
    assert rotated.shape == vols.shape  # non-square planes only turn by 0 or 180 degrees
    for x, v in zip(rotated, vols):
        turns = [torch.rot90(v, k, p) for k in range(4) for p in ((1, 2), (1, 3), (2, 3))]
        assert any(t.shape == x.shape and torch.equal(x, t) for t in turns)
    masked, _ = pretext_batch(vols + 1, g, transforms=("mask",), mask_fraction=(0.25, 0.5))
    for x in masked:
        zero = x[0] == 0
        idx = zero.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        assert zero.sum() == (hi - lo).prod()  # one cuboid
        sides = (hi - lo).tolist()
        assert all(round(0.25 * n) <= s <= round(0.5 * n) for s, n in zip(sides, (8, 16, 16)))
    with pytest.raises(ValueError, match="unknown pretext"):
        pretext_batch(vols, g, transforms=("jigsaw",))
    with pytest.raises(ValueError, match="5 dimensions"):
        pretext_batch(vols[0], g)


def test_pretext_trains_the_encoder_and_transfers_to_a_fresh_model():
    torch.manual_seed(0)
    pre = tiny()
    vols, _ = cube(batch=2)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        inputs, targets = pretext_batch(vols, g)
        loss, parts = pretext_loss(pre.pretext(inputs), targets)
        assert set(parts) == {"reconstruction"} and not parts["reconstruction"].requires_grad
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in pre.named_parameters() if n.startswith(ENCODER_PREFIXES))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    fresh = tiny()
    decoder_before = {k: v.clone() for k, v in fresh.state_dict().items()
                      if not k.startswith(ENCODER_PREFIXES)}
    enc = pre.encoder_state_dict()
    assert enc and all(k.startswith(ENCODER_PREFIXES) for k in enc)
    assert not torch.equal(fresh.encoder_state_dict()["primary.weight"], enc["primary.weight"])
    fresh.load_encoder_state_dict(pre.state_dict())  # a whole pretext model's state dict
    for k, v in fresh.encoder_state_dict().items():
        assert torch.equal(v, enc[k]), k
    for k, v in fresh.state_dict().items():
        if k in decoder_before:
            assert torch.equal(v, decoder_before[k]), k
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(pre.encode(x), fresh.encode(x)):
            torch.testing.assert_close(a, b)
    # a model of another configuration cannot take it
    with pytest.raises(ValueError, match="shape"):
        tiny(num_classes=3).load_encoder_state_dict(enc)
    with pytest.raises(KeyError, match="encoder entries"):
        tiny().load_encoder_state_dict({k: v for k, v in enc.items() if not k.startswith("stem.")})
