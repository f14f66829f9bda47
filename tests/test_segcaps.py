"""SegCaps (LaLonde & Bagci 2018) and the MONAI U-Net baselines under the segmentation contract."""

import pytest
import torch

from torchcaps.functional import margin_loss
from torchcaps.models import SegCaps, create_model, list_models, model_task
from torchcaps.models.segmentation import SegmentationOutput


def _squares(n=1, size=16):
    """Images with a bright square on a noisy background and its label."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = 2 + 3 * i, 4 + 2 * i
        x[i, :, r:r + 6, c:c + 6] += 1.0
        y[i, r:r + 6, c:c + 6] = 1
    return x, y


def _dice(logits, y):
    p = logits.argmax(1) == 1
    t = y == 1
    return (2 * (p & t).sum() / (p.sum() + t.sum())).item()


def test_registered_as_segmentation_models():
    assert {"segcaps", "unet2d", "unet3d"} <= set(list_models(task="segmentation"))
    assert not {"segcaps", "unet2d", "unet3d"} & set(list_models())
    assert all(model_task(n) == "segmentation" for n in ("segcaps", "unet2d", "unet3d"))


def test_parameter_count_of_the_official_r3_network():
    # from the official code: K*K*D_in*C*D_out kernel weights + C*D_out routing bias per capsule layer
    caps = [(5, 16, 2, 16), (5, 16, 4, 16), (5, 16, 4, 32), (5, 32, 8, 32), (5, 32, 8, 64),
            (5, 64, 8, 32), (4, 32, 8, 32), (5, 32, 4, 32), (4, 32, 4, 16), (5, 16, 4, 16),
            (4, 16, 2, 16), (1, 16, 1, 16)]
    conv1 = 5 * 5 * 1 * 16 + 16
    decoder = (16 * 64 + 64) + (64 * 128 + 128) + (128 * 1 + 1)
    derived = conv1 + sum(k * k * i * c * d + c * d for k, i, c, d in caps) + decoder
    assert derived == 1_425_649  # the paper's "1.4M"
    model = create_model("segcaps")
    assert sum(p.numel() for p in model.parameters()) == 1_425_649
    no_decoder = create_model("segcaps", reconstruction=False)
    assert sum(p.numel() for p in no_decoder.parameters()) == 1_425_649 - decoder == 1_416_112


def test_binary_output_shapes_and_probabilities():
    torch.manual_seed(0)
    model = create_model("segcaps")
    x, y = _squares(2)
    out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 2, 16, 16) and out.reconstruction.shape == (2, 1, 16, 16)
    assert out.aux["lengths"].shape == (2, 1, 16, 16) and out.aux["poses"].shape == (2, 1, 16, 16, 16)
    p = out.aux["lengths"][:, 0]
    assert (p < 1).all()
    torch.testing.assert_close(out.logits.softmax(1)[:, 1], p.clamp(1e-7, 1 - 1e-7))
    # with labels the decoder sees the capsule on the foreground only
    masked = model(x, y)
    torch.testing.assert_close(masked.reconstruction,
                               model.reconstruct(out.aux["poses"], (y == 1).unsqueeze(1)))


def test_multiclass_extension_shapes_and_margin_loss():
    torch.manual_seed(0)
    model = create_model("segcaps", in_channels=2, num_classes=4)
    x = torch.rand(1, 2, 8, 16)
    y = torch.randint(0, 4, (1, 8, 16))
    out = model(x, y)
    assert out.logits.shape == (1, 4, 8, 16) and out.reconstruction.shape == (1, 2, 8, 16)
    assert out.aux["lengths"].shape == (1, 4, 8, 16)
    assert torch.equal(out.logits.argmax(1), out.aux["lengths"].argmax(1))
    loss, parts = model.loss(out, x, y)
    want = margin_loss(out.aux["lengths"].permute(0, 2, 3, 1).reshape(-1, 4), y.reshape(-1))
    torch.testing.assert_close(parts["segmentation"], want.detach())
    torch.testing.assert_close(loss.detach(), parts["segmentation"] + parts["reconstruction"])


def test_binary_loss_is_weighted_bce_plus_masked_reconstruction():
    torch.manual_seed(0)
    model = create_model("segcaps").double()
    x, y = _squares(2)
    x = x.double()
    out = model(x)
    loss, parts = model.loss(out, x, y)
    p = out.aux["lengths"][:, 0].clamp(1e-7, 1 - 1e-7)
    t = y.double()
    w = (t.numel() - t.sum()) / t.sum()  # negatives per positive pixel
    bce = -(w * t * p.log() + (1 - t) * (1 - p).log()).mean()
    torch.testing.assert_close(parts["segmentation"], bce.detach())
    recon = model.reconstruct(out.aux["poses"], (y == 1).unsqueeze(1))
    mse = ((recon - x * t.unsqueeze(1)) ** 2).mean()
    torch.testing.assert_close(parts["reconstruction"], 0.1 * mse.detach())
    torch.testing.assert_close(loss.detach(), parts["segmentation"] + parts["reconstruction"])
    fixed = create_model("segcaps", pos_weight=1.0).double()
    fixed.load_state_dict(model.state_dict())
    unweighted = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    torch.testing.assert_close(fixed.loss(out, x, y)[1]["segmentation"], unweighted.detach())


@pytest.mark.parametrize("name,kw", [("segcaps", {}), ("segcaps", {"num_classes": 3}),
                                     ("unet2d", {"channels": (4, 8, 16)})])
def test_gradients_reach_every_parameter(name, kw):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x, y = _squares(1)
    if kw.get("num_classes") == 3:
        y[0, :2] = 2
    loss, _ = model.loss(model(x, y), x, y)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_segcaps_overfits_one_image():
    torch.manual_seed(0)
    model = create_model("segcaps")
    x, y = _squares(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss, _ = model.loss(model(x, y), x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    assert model.loss(out, x, y)[0].item() < 0.3 * first
    assert _dice(out.logits, y) > 0.9


def test_unet_overfits_one_image():
    torch.manual_seed(0)
    model = create_model("unet2d", channels=(8, 16, 32), num_res_units=1)
    x, y = _squares(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss, parts = model.loss(model(x), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"dice_ce"}
    with torch.no_grad():
        assert _dice(model(x).logits, y) > 0.9


def test_unet_sizes():
    assert create_model("unet2d").size_multiple == 16
    assert sum(p.numel() for p in create_model("unet2d").parameters()) == 25_970_809
    model = create_model("unet3d", channels=(4, 8, 16))
    assert model.spatial_dims == 3 and model.size_multiple == 4
    out = model(torch.rand(1, 1, 8, 4, 8))
    assert out.logits.shape == (1, 2, 8, 4, 8)


@pytest.mark.parametrize("name", ["segcaps", "unet2d"])
def test_clear_errors_for_bad_inputs(name):
    model = create_model(name, **({"channels": (4, 8)} if name == "unet2d" else {}))
    x, y = _squares(1)
    with pytest.raises(ValueError, match="is a 2D model .* 3D volumes"):
        model(torch.rand(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.rand(1, 1, 12, 16) if name == "segcaps" else torch.rand(1, 1, 7, 16))
    with pytest.raises(ValueError, match="dimension 1 is 3, expected 1"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="shape of the images without the channel axis"):
        model(x, y[:, :8])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        model(x, y + 1)
    with pytest.raises(TypeError, match="integer class indices"):
        model(x, y.float())
    out = model(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        model.loss(out, x, y * 2)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SegCaps(num_classes=1)
    with pytest.raises(ValueError, match="pos_weight"):
        SegCaps(pos_weight=0.0)
    with pytest.raises(RuntimeError, match="reconstruction=False"):
        m = SegCaps(reconstruction=False)
        m.reconstruct(torch.zeros(1, 1, 8, 8, 16), None)
