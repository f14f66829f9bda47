"""Explanation figures: routing maps and class-capsule length bars."""

import matplotlib.pyplot as plt
import pytest
import torch

from torchcaps.functional import capsule_length
from torchcaps.models._registry import create_model
from torchcaps.models.cnn_baseline import CNNBaseline
from torchcaps.viz.explain import capsule_length_figure, routing_map, routing_map_figure


def tiny_capsnet(size=28, **kw):
    return create_model("capsnet", in_shape=(1, size, size), conv_channels=16, primary_types=4,
                        **kw)


def routing_map_loop(model, image, pred_class, use_length=True):
    """The map rebuilt by hand in float64; capsule (t, h, w) is index t*H'*W' + h*W' + w."""
    with torch.no_grad():
        u = model.primary(torch.relu(model.conv1(image)))[0].double()  # (I, D)
        c = model(image).couplings[0].double()  # (I, J)
    t_n = model.primary.num_types
    side = int(round((u.shape[0] / t_n) ** 0.5))
    cell = torch.zeros(side, side, dtype=torch.float64)
    for t in range(t_n):
        for h in range(side):
            for w in range(side):
                i = t * side * side + h * side + w
                s = c[i, pred_class]
                if use_length:
                    s = s * torch.sqrt((u[i] ** 2).sum() + 1e-8)
                cell[h, w] += s
    return cell


@pytest.mark.parametrize("weight", ["length", "coupling"])
def test_routing_map_matches_loop_reference(weight):
    m = tiny_capsnet().eval()
    x = torch.rand(1, 1, 28, 28)
    r = routing_map(m, x, weight=weight)
    assert r["grid"] == (4, 6, 6) and r["grid_source"] == "primary" and r["weight"] == weight
    assert r["pred"] == int(m(x).logits.argmax())
    ref = routing_map_loop(m, x, r["pred"], use_length=weight == "length")
    torch.testing.assert_close(r["map"].double(), ref, rtol=1e-5, atol=1e-7)
    assert r["upsampled"].shape == (28, 28)
    assert r["per_type"].shape == (4, 6, 6)


def test_routing_map_grid_from_primary_on_a_36px_canvas():
    m = tiny_capsnet(36).eval()
    r = routing_map(m, torch.rand(1, 36, 36))  # (C, H, W) is accepted too
    assert r["grid"] == (4, 10, 10)
    assert r["upsampled"].shape == (36, 36)


def test_routing_map_leaves_the_mode_and_no_hooks_behind():
    m = tiny_capsnet().train()
    routing_map(m, torch.rand(1, 1, 28, 28))
    assert m.training
    assert not m.primary._forward_hooks


def test_routing_map_figure_is_a_readable_png(tmp_path):
    m = tiny_capsnet()
    path = routing_map_figure(m, torch.rand(1, 1, 28, 28), tmp_path / "routing.png")
    assert path == tmp_path / "routing.png"
    assert path.stat().st_size > 1024
    img = plt.imread(path)
    assert img.shape[:2] == (340, 900)  # 9 x 3.4 inches at 100 dpi
    assert img[..., :3].std() > 0.05  # not blank


def test_capsule_length_figure_is_a_readable_png(tmp_path):
    m = tiny_capsnet()
    x = torch.rand(3, 1, 28, 28)
    path = capsule_length_figure(m, x, tmp_path / "lengths.png", labels=torch.tensor([1, 2, 3]))
    assert path.stat().st_size > 1024
    img = plt.imread(path)
    assert img.shape[:2] == (600, 700)  # 7 x (1.8 * 3 + 0.6) inches at 100 dpi
    assert img[..., :3].std() > 0.05


def test_capsule_length_figure_draws_the_lengths(tmp_path, monkeypatch):
    m = tiny_capsnet().eval()
    x = torch.rand(2, 1, 28, 28)
    drawn = []
    real_bar = plt.Axes.bar

    def spy(self, xs, heights, *a, **kw):
        drawn.append((torch.as_tensor(heights), kw.get("color")))
        return real_bar(self, xs, heights, *a, **kw)

    monkeypatch.setattr(plt.Axes, "bar", spy)
    capsule_length_figure(m, x, tmp_path / "l.png")
    with torch.no_grad():
        out = m(x)
    lengths = capsule_length(out.poses)
    for r, (heights, colors) in enumerate(drawn):
        torch.testing.assert_close(heights.float(), lengths[r])
        pred = int(out.logits[r].argmax())
        assert [c for c in colors if c != "tab:gray"] == ["tab:orange"]
        assert colors[pred] == "tab:orange"
    assert len(drawn) == 2


def test_bad_inputs_are_clear(tmp_path):
    caps = tiny_capsnet()
    cnn = CNNBaseline(conv_channels=(4, 4, 2), hidden=(8, 8))
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(ValueError, match="no routing couplings"):
        routing_map_figure(cnn, x, tmp_path / "a.png")
    with pytest.raises(ValueError, match="no class capsules"):
        capsule_length_figure(cnn, x, tmp_path / "b.png")
    with pytest.raises(ValueError, match="image must have shape"):
        routing_map_figure(caps, torch.rand(2, 1, 28, 28), tmp_path / "c.png")
    with pytest.raises(ValueError, match="image must have shape"):
        routing_map_figure(caps, torch.rand(1, 1, 30, 30), tmp_path / "c.png")
    with pytest.raises(TypeError, match="floating-point"):
        routing_map_figure(caps, torch.zeros(1, 1, 28, 28, dtype=torch.uint8), tmp_path / "c.png")
    with pytest.raises(ValueError, match="weight must be"):
        routing_map(caps, x, weight="votes")
    with pytest.raises(ValueError, match="grid"):
        routing_map(caps, x, grid=(4, 5, 5))
    with pytest.raises(ValueError, match="1 to 16 images"):
        capsule_length_figure(caps, torch.rand(17, 1, 28, 28), tmp_path / "d.png")
    with pytest.raises(ValueError, match="images must have shape"):
        capsule_length_figure(caps, torch.rand(2, 1, 27, 28), tmp_path / "d.png")
    with pytest.raises(ValueError, match="labels must be a tensor of shape"):
        capsule_length_figure(caps, torch.rand(2, 1, 28, 28), tmp_path / "d.png",
                              labels=torch.tensor([1]))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_grid_cannot_be_inferred_without_a_primary_layer():
    em = create_model("em_capsnet").eval()  # routes 288 class-layer children, not primaries
    with pytest.raises(ValueError, match="cannot infer the primary capsule grid"):
        routing_map(em, torch.rand(1, 1, 28, 28))
    r = routing_map(em, torch.rand(1, 1, 28, 28), grid=(32, 3, 3))
    assert r["grid"] == (32, 3, 3) and r["grid_source"] == "given"
    assert r["weight"] == "coupling"  # its primary capsules are not the routed children
