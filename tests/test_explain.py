"""Explanation figures: routing maps and class-capsule length bars."""

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.image import imread

from torchcaps.functional import capsule_length
from torchcaps.layers import PrimaryCaps
from torchcaps.models._base import CapsuleModel, ModelOutput
from torchcaps.models._registry import create_model
from torchcaps.models.cnn_baseline import CNNBaseline
from torchcaps.viz import FigurePath
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
    assert path == tmp_path / "routing.png" and isinstance(path, FigurePath)
    assert path.stat().st_size > 1024
    img = imread(path)
    assert img.shape[:2] == (400, 1000)  # 10 x 4 inches at 100 dpi
    assert img[..., :3].std() > 0.05  # not blank


def test_capsule_length_figure_is_a_readable_png(tmp_path):
    m = tiny_capsnet()
    x = torch.rand(3, 1, 28, 28)
    path = capsule_length_figure(m, x, tmp_path / "lengths.png", labels=torch.tensor([1, 2, 3]))
    assert path.stat().st_size > 1024
    img = imread(path)
    assert img.shape[:2] == (600, 700)  # 7 x (1.8 * 3 + 0.6) inches at 100 dpi
    assert img[..., :3].std() > 0.05


def test_capsule_length_figure_draws_the_lengths(tmp_path, monkeypatch):
    m = tiny_capsnet().eval()
    x = torch.rand(2, 1, 28, 28)
    drawn = []
    real_bar = Axes.bar

    def spy(self, xs, heights, *a, **kw):
        drawn.append((torch.as_tensor(heights), kw.get("color")))
        return real_bar(self, xs, heights, *a, **kw)

    monkeypatch.setattr(Axes, "bar", spy)
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


# -- where the cells sit on the image ---------------------------------------------------------
# CapsNet: a 9x9 conv, then a 9x9 stride-2 conv, so primary cell (h, w) sees input rows
# 2h .. 2h+16 and columns 2w .. 2w+16, centred on pixel (8 + 2h, 8 + 2w).


def sees(cell, lo, hi):
    """Whether a CapsNet primary cell's receptive field overlaps input pixels lo..hi."""
    return 2 * cell <= hi and 2 * cell + 16 >= lo


def test_capsnet_receptive_fields_are_composed_from_its_layers():
    for size, side in ((28, 6), (36, 10)):
        r = routing_map(tiny_capsnet(size).eval(), torch.rand(1, 1, size, size))
        assert r["grid"][1:] == (side, side)
        assert r["geometry"] == {"receptive_field": (17, 17), "stride": (2, 2),
                                 "first_centre": (8.0, 8.0)}


CORNERS = {"top-left": (1, 1), "top-right": (1, 21), "bottom-left": (21, 1),
           "bottom-right": (21, 21)}


@pytest.mark.parametrize("corner", sorted(CORNERS))
def test_a_blob_in_one_corner_lights_the_cells_that_see_it(corner):
    m = tiny_capsnet().eval()
    with torch.no_grad():  # no biases: blank input regions give zero-length primaries
        m.conv1.bias.zero_()
        m.primary.conv.bias.zero_()
    y0, x0 = CORNERS[corner]
    x = torch.zeros(1, 1, 28, 28)
    x[..., y0:y0 + 6, x0:x0 + 6] = 1.0
    r = routing_map(m, x)
    cell = r["map"]  # (6, 6)
    lit = cell > 2 * cell.min()  # blank cells: only the length's epsilon, sqrt(1e-8)
    for h in range(6):
        for w in range(6):
            if lit[h, w]:  # a lit cell must see the blob
                assert sees(h, y0, y0 + 5) and sees(w, x0, x0 + 5), (h, w)
    top = divmod(int(cell.argmax()), 6)
    assert top[0] < 3 if y0 < 14 else top[0] >= 3
    assert top[1] < 3 if x0 < 14 else top[1] >= 3
    far = (5 if y0 < 14 else 0, 5 if x0 < 14 else 0)  # the opposite corner cell
    assert not lit[far]
    # on the image: cells sit at their receptive-field centres, pixels 8..18; nothing is
    # drawn beyond the outer cells' edges (7..19), where a stretched grid would put cell 0
    up = r["upsampled"]
    assert up[:7].abs().max() == 0 and up[20:].abs().max() == 0
    assert up[:, :7].abs().max() == 0 and up[:, 20:].abs().max() == 0
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    com = (float((up * yy).sum() / up.sum()), float((up * xx).sum() / up.sum()))
    assert (com[0] < 13) == (y0 < 14) and (com[1] < 13) == (x0 < 14), com


class CouplingStub(CapsuleModel):
    """Real primary capsules on a 10 x 12 grid (2 types), couplings chosen by the test."""

    def __init__(self, couplings):
        super().__init__((1, 28, 32), num_classes=couplings.shape[1])
        self.primary = PrimaryCaps(1, num_types=2, dim=4, kernel_size=9, stride=2)
        self.couplings = couplings  # (I, J)

    def forward(self, images, labels=None):
        self.primary(images)  # (B, 2 * 10 * 12, 4), observed by routing_map's hook
        b = images.shape[0]
        logits = self.couplings.sum(0).expand(b, -1)  # (B, J): most coupling mass wins
        return ModelOutput(logits=logits, couplings=self.couplings.expand(b, -1, -1))


def test_known_couplings_land_on_their_exact_cells(tmp_path):
    t, h, w = 1, 2, 9  # capsule index t*H'*W' + h*W' + w on the non-square 10 x 12 grid
    c = torch.full((2 * 10 * 12, 3), 1e-4)
    c[t * 120 + h * 12 + w, 1] = 1.0
    r = routing_map(CouplingStub(c), torch.rand(1, 1, 28, 32), weight="coupling")
    assert r["pred"] == 1 and r["grid"] == (2, 10, 12) and r["grid_source"] == "primary"
    assert r["geometry"] == {"receptive_field": (9, 9), "stride": (2, 2),
                             "first_centre": (4.0, 4.0)}
    assert divmod(int(r["per_type"].argmax()), 120) == (t, h * 12 + w)
    assert divmod(int(r["map"].argmax()), 12) == (h, w)
    # the cell sums both types: 1 + 1e-4 of the column total 1 + 239e-4
    torch.testing.assert_close(r["share"][h, w], torch.tensor((1 + 1e-4) / (1 + 239e-4)))
    assert r["uniform_share"] == 1 / 120
    # on the image: the cell's receptive-field centre, pixel (4 + 2h, 4 + 2w) = (8, 22)
    assert divmod(int(r["upsampled"].argmax()), 32) == (8, 22)
    path = routing_map_figure(CouplingStub(c), torch.rand(1, 1, 28, 32), tmp_path / "r.png",
                              weight="coupling")
    assert path.notes == ()  # one cell holds all votes: nothing to warn about


def test_colour_scales_start_at_zero_and_a_flat_map_says_so(tmp_path, monkeypatch):
    shown = []
    real_imshow = Axes.imshow

    def spy(self, data, *a, **kw):
        shown.append(kw)
        return real_imshow(self, data, *a, **kw)

    monkeypatch.setattr(Axes, "imshow", spy)
    c = torch.full((2 * 10 * 12, 3), 1 / 3)  # uniform couplings: every cell the same
    path = routing_map_figure(CouplingStub(c), torch.rand(1, 1, 28, 32), tmp_path / "r.png",
                              weight="coupling")
    maps = [kw for kw in shown if kw.get("cmap") == "inferno"]
    assert len(maps) == 2 and all(kw["vmin"] == 0 for kw in maps)
    assert path.notes == ("routing map is nearly flat: the top cell holds 0.8% of the votes "
                          "for class 0, 1.00x the uniform 0.8%",)


def test_a_stretched_grid_is_noted(tmp_path):
    em = create_model("em_capsnet").eval()
    x = torch.rand(1, 1, 28, 28)
    r = routing_map(em, x, grid=(32, 3, 3))
    assert r["geometry"]["receptive_field"] is None  # the routed children are not primaries
    # stretched: each of the 3x3 cells covers a ninth of the image
    torch.testing.assert_close(r["upsampled"].sum() / r["map"].sum(), torch.tensor(28 * 28 / 9),
                               rtol=0.05, atol=0)
    path = routing_map_figure(em, x, tmp_path / "em.png", grid=(32, 3, 3))
    assert "routing map: receptive fields unknown, grid stretched over the image" in path.notes
