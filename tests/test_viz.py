"""torchcaps.viz: no global matplotlib state, and the perturbation figure says when it is flat."""

import subprocess
import sys

import torch
from matplotlib.axes import Axes
from torch import nn

from torchcaps.models._base import ModelOutput
from torchcaps.models._registry import create_model
from torchcaps.viz import FigurePath, perturbation_figure, reconstruction_figure


def test_importing_and_drawing_leave_the_backend_alone(tmp_path):
    code = f"""
import sys, matplotlib, torch
import torchcaps.viz, torchcaps.viz.explain
from torchcaps.models._registry import create_model
m = create_model("capsnet", conv_channels=8, primary_types=2)
x = torch.rand(1, 1, 28, 28)
torchcaps.viz.perturbation_figure(m, x, {str(tmp_path / "p.png")!r}, steps=3)
torchcaps.viz.routing_map_figure(m, x, {str(tmp_path / "r.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
print(matplotlib.get_backend())
"""
    env = {"MPLBACKEND": "svg", "PATH": "", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"  # the user's choice, not Agg
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "r.png").exists()


class PoseDecoderStub(nn.Module):
    """Class capsules of 2 dimensions: dimension 0 moves every pixel, dimension 1 none."""

    in_shape = (1, 4, 4)

    def decoder(self, poses, labels):  # (B, J, D), (B,) -> (B, 1, 4, 4)
        x = poses[torch.arange(len(labels)), labels, 0]  # (B,)
        return (0.5 + 2 * x).clamp(0, 1)[:, None, None, None].expand(-1, 1, 4, 4)

    def forward(self, images):
        poses = torch.zeros(images.shape[0], 3, 2)  # (B, J, D)
        poses[:, 1] = 0.2  # class 1 is the longest
        return ModelOutput(logits=poses.norm(dim=-1), poses=poses)


def titles_and_labels(monkeypatch) -> list:
    """Record the text of every axes title and y label drawn from now on."""
    seen = []

    def spy(real):
        def call(self, text, *args, **kwargs):
            seen.append(text)
            return real(self, text, *args, **kwargs)
        return call

    for name in ("set_title", "set_ylabel"):
        monkeypatch.setattr(Axes, name, spy(getattr(Axes, name)))
    return seen


def test_a_flat_perturbation_grid_is_reported(tmp_path):
    m = create_model("capsnet", conv_channels=8, primary_types=2)  # untrained: decoder ~ 0.5
    path = perturbation_figure(m, torch.rand(1, 1, 28, 28), tmp_path / "p.png")
    assert path == tmp_path / "p.png" and isinstance(path, FigurePath)
    assert path.stat().st_size > 1000
    (note,) = path.notes
    assert note.startswith("perturbation: no visible effect, no capsule dimension changes any "
                           "pixel by 0.25 or more (largest change 0.0")


def test_rows_without_effect_are_marked(tmp_path, monkeypatch):
    seen = titles_and_labels(monkeypatch)
    path = perturbation_figure(PoseDecoderStub(), torch.rand(1, 1, 4, 4), tmp_path / "p.png")
    assert path.notes == ("perturbation: 1 of 2 dimensions change no pixel by 0.25 or more "
                          "(rows marked 'no effect')",)
    # dimension 0 sweeps 0.2 + [-0.25, 0.25]: pixels 0.5 + 2 x run over [0.4, 1] (clamped)
    assert "dim 0\nchange 0.60" in seen and "dim 1\nchange 0.00\nno effect" in seen
    assert perturbation_figure(PoseDecoderStub(), torch.rand(1, 1, 4, 4), tmp_path / "q.png",
                               min_change=0.0).notes == ()


def test_column_headers_never_show_negative_zero(tmp_path, monkeypatch):
    seen = titles_and_labels(monkeypatch)
    perturbation_figure(PoseDecoderStub(), torch.rand(1, 1, 4, 4), tmp_path / "p.png")
    headers = [t for t in seen if not t.startswith("dim")]
    assert headers == ["-0.25", "-0.20", "-0.15", "-0.10", "-0.05", "0.00", "+0.05", "+0.10",
                       "+0.15", "+0.20", "+0.25"]  # linspace's middle value is -3.7e-09


def test_reconstruction_figure_returns_its_path(tmp_path):
    m = create_model("capsnet", conv_channels=8, primary_types=2)
    path = reconstruction_figure(m, torch.rand(2, 1, 28, 28), tmp_path / "r.png")
    assert path == tmp_path / "r.png" and path.notes == () and path.stat().st_size > 1000
