"""Dilution measures (torchcaps.evaluation.dilution) and the `torchcaps dilution` command."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from torchcaps import functional as F
from torchcaps.evaluation.dilution import (
    analyze_dilution,
    check_dilution_model,
    dilution_figure,
    ink_fraction,
    receptive_box,
    vote_mass,
    vote_share,
)
from torchcaps.models import create_model

SMALL = dict(conv_channels=8, primary_types=4)  # capsnet with a 6x6x4 primary grid at 28x28


def _capsnet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("capsnet", **{**SMALL, **kw}).double().eval()


def _internals(model, x):
    """Primary capsules, votes, couplings and class lengths, computed by hand."""
    u = model.primary(torch.relu(model.conv1(x)))  # (B, I, K)
    routed = model.digit(u)
    return u, model.digit.votes(u), routed.couplings, routed.poses.norm(dim=-1)


# ------------------------------------------------------------------ vote mass and share


def test_vote_share_hand_set_case():
    # child 0: votes of norm 5 and 1; child 1: 2 and 10; child 2: 1 and 0
    votes = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]],
                           [[0.0, 2.0], [6.0, 8.0]],
                           [[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)  # (1, 3, 2, 2)
    couplings = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]], dtype=torch.float64)
    mass = vote_mass(couplings, votes)
    torch.testing.assert_close(mass, torch.tensor([[[2.5, 0.5], [0.5, 7.5], [1.0, 0.0]]],
                                                  dtype=torch.float64))
    mask = torch.tensor([[True, False, True]])
    # parent 0: (2.5 + 1) / 4 ; parent 1: (0.5 + 0) / 8
    torch.testing.assert_close(vote_share(mass, mask),
                               torch.tensor([[0.875, 0.0625]], dtype=torch.float64))
    torch.testing.assert_close(vote_share(mass, torch.zeros(1, 3, dtype=torch.bool)),
                               torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(vote_share(mass, torch.ones(1, 3, dtype=torch.bool)),
                               torch.ones(1, 2, dtype=torch.float64))
    # a parent that receives nothing has share 0, not NaN
    assert torch.equal(vote_share(torch.zeros(1, 3, 2, dtype=torch.float64), mask),
                       torch.zeros(1, 2, dtype=torch.float64))


def test_vote_share_matches_loop():
    b_n, i_n, j_n, d_n = 3, 7, 4, 5
    votes = torch.randn(b_n, i_n, j_n, d_n, dtype=torch.float64)
    couplings = torch.softmax(torch.randn(b_n, i_n, j_n, dtype=torch.float64), dim=2)
    mask = torch.rand(b_n, i_n) < 0.4
    share = vote_share(vote_mass(couplings, votes), mask)
    for b in range(b_n):
        for j in range(j_n):
            num = den = 0.0
            for i in range(i_n):
                m = float(couplings[b, i, j]) * sum(float(v) ** 2 for v in votes[b, i, j]) ** 0.5
                den += m
                num += m if bool(mask[b, i]) else 0.0
            assert abs(float(share[b, j]) - num / den) < 1e-12


def test_vote_share_rejects_bad_masks():
    mass = torch.rand(2, 3, 4)
    with pytest.raises(TypeError, match="bool"):
        vote_share(mass, torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        vote_share(mass, torch.ones(2, 4, dtype=torch.bool))


# ------------------------------------------------------------------ receptive fields


def test_capsnet_receptive_box_and_single_pixel():
    model = _capsnet()
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    r, c = 13, 4
    x[0, 0, r, c] = 0.7
    from torchcaps.evaluation.dilution import _spatial_layers

    assert receptive_box(_spatial_layers(model, x)) == ((17, 17), (2, 2), (0, 0))
    frac = ink_fraction(model, x)[0]  # (6, 6)
    sees = torch.zeros(6, 6, dtype=torch.bool)
    for h in range(6):
        for w in range(6):
            sees[h, w] = 2 * h <= r <= 2 * h + 16 and 2 * w <= c <= 2 * w + 16
    assert torch.equal(frac > 0, sees)
    torch.testing.assert_close(frac[sees], torch.full((int(sees.sum()),), 1 / 289,
                                                      dtype=torch.float64))


class _PaddedCapsNet(torch.nn.Module):
    """conv (3x3, dilation 2, padding 2) -> PrimaryCaps (3x3, stride 2, padding 1) -> CapsLinear."""

    def __init__(self):
        super().__init__()
        from torchcaps.layers import CapsLinear, PrimaryCaps

        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=2, dilation=2)
        self.primary = PrimaryCaps(4, num_types=2, dim=4, kernel_size=3, stride=2, padding=1)
        self.digit = CapsLinear(2 * 6 * 6, 4, 3, 5)
        self.in_shape = (1, 11, 11)

    def forward(self, x):
        u = self.primary(torch.relu(self.conv1(x)))
        poses = self.digit(u).poses
        return type("Out", (), {"logits": F.capsule_length(poses)})()


def test_receptive_box_matches_autograd_with_padding_and_dilation():
    model = _PaddedCapsNet().double()
    x = torch.zeros(1, 1, 11, 11, dtype=torch.float64)
    from torchcaps.evaluation.dilution import _spatial_layers

    (kh, kw), (sh, sw), (ph, pw) = receptive_box(_spatial_layers(model, x))
    # the linear chain with positive weights: an input pixel reaches a position iff the
    # Jacobian entry is nonzero
    w1 = model.conv1.weight.detach().abs() + 0.1
    w2 = model.primary.conv.weight.detach().abs() + 0.1

    def chain(img):
        y = torch.nn.functional.conv2d(img, w1, padding=2, dilation=2)
        return torch.nn.functional.conv2d(y, w2, stride=2, padding=1).sum(1)  # (1, 6, 6)

    jac = torch.autograd.functional.jacobian(chain, x)[0, :, :, 0, 0]  # (6, 6, 11, 11)
    for h in range(6):
        for w in range(6):
            rows, cols = torch.nonzero(jac[h, w], as_tuple=True)
            box_rows = [r for r in range(h * sh - ph, h * sh - ph + kh) if 0 <= r < 11]
            box_cols = [c for c in range(w * sw - pw, w * sw - pw + kw) if 0 <= c < 11]
            assert int(rows.min()) == box_rows[0] and int(rows.max()) == box_rows[-1]
            assert int(cols.min()) == box_cols[0] and int(cols.max()) == box_cols[-1]


# ------------------------------------------------------------------ analysis


def _half_blank(n: int = 3) -> torch.Tensor:
    """Ink only in columns 20..27: primary positions w' = 0, 1 (columns 2w'..2w'+16) see none."""
    x = torch.zeros(n, 1, 28, 28, dtype=torch.float64)
    x[:, :, 4:24, 20:27] = torch.rand(n, 1, 20, 7, dtype=torch.float64) * 0.9 + 0.1
    return x


def test_blank_half_background_and_share_match_hand_computation():
    model = _capsnet(1)
    x = _half_blank()
    r = analyze_dilution(model, x, threshold=0.05)
    expected_bg = torch.zeros(3, 6, 6, dtype=torch.bool)
    expected_bg[:, :, :2] = True
    assert torch.equal(r.background, expected_bg)
    torch.testing.assert_close(r.fraction["background"], torch.full((3,), 2 / 6,
                                                                    dtype=torch.float64))
    u, votes, c, lengths = _internals(model, x)
    mass = c * votes.norm(dim=-1)  # (B, I, J)
    pos = torch.arange(36).remainder(6)  # column w' of capsule t*36 + h*6 + w
    is_bg = (pos < 2).repeat(4)  # type-major order: 4 types x 36 positions
    expected = mass[:, is_bg].sum(1) / mass.sum(1)
    torch.testing.assert_close(r.share["background"], expected)
    torch.testing.assert_close(r.lengths, lengths)
    # removal: zero those capsules before routing, route again
    removed = model.digit(u * (~is_bg).to(u.dtype)[None, :, None]).poses.norm(dim=-1)
    torch.testing.assert_close(r.removed_lengths["background"], removed)
    short = u.norm(dim=-1) < 0.05
    torch.testing.assert_close(r.share["short"], vote_share(mass, short))
    # the maps: shares of the predicted class summed over types, summing to 1 per image
    torch.testing.assert_close(r.position_share.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    j = r.predicted
    by_pos = (mass[torch.arange(3), :, j] / mass[torch.arange(3), :, j].sum(1, keepdim=True))
    torch.testing.assert_close(r.position_share, by_pos.view(3, 4, 6, 6).sum(1))


def test_background_capsules_without_bias_do_not_dilute():
    """With zero conv biases an empty receptive field gives exactly zero primary capsules:
    no vote mass, and removing them changes nothing. With a bias they dilute."""
    model = _capsnet(2)
    with torch.no_grad():
        model.conv1.bias.zero_()
        model.primary.conv.bias.zero_()
    x = _half_blank()
    r = analyze_dilution(model, x)
    assert torch.equal(r.share["background"], torch.zeros(3, 10, dtype=torch.float64))
    assert torch.equal(r.removed_lengths["background"], r.lengths)
    assert r.summary()["background"]["prediction_changed"] == 0.0
    assert r.summary()["mean_primary_length_background"] == 0.0
    with torch.no_grad():
        model.primary.conv.bias.fill_(0.5)
    r = analyze_dilution(model, x)
    assert bool((r.share["background"] > 0.05).all())
    assert not torch.equal(r.removed_lengths["background"], r.lengths)


def test_short_threshold_extremes():
    model = _capsnet(3)
    x = _half_blank(2)
    none = analyze_dilution(model, x, threshold=0.0)
    assert torch.equal(none.fraction["short"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(none.removed_lengths["short"], none.lengths)
    everything = analyze_dilution(model, x, threshold=10.0)
    torch.testing.assert_close(everything.share["short"], torch.ones(2, 10, dtype=torch.float64))
    # all capsules removed: all votes zero, and capsnet has no routing bias
    assert torch.equal(everything.removed_lengths["short"], torch.zeros(2, 10, dtype=torch.float64))
    s = everything.summary()["short"]
    assert s["fraction"] == 1.0 and s["relative_length_change_predicted"] == pytest.approx(1.0)


def test_batching_does_not_change_results_and_mode_is_restored():
    model = _capsnet(4)
    model.train()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64) * (torch.rand(5, 1, 28, 28) > 0.7)
    a = analyze_dilution(model, x, batch_size=2)
    assert model.training
    b = analyze_dilution(model, x, batch_size=128)
    for name in ("background", "short"):
        torch.testing.assert_close(a.share[name], b.share[name])
        torch.testing.assert_close(a.removed_lengths[name], b.removed_lengths[name])
    torch.testing.assert_close(a.lengths, b.lengths)


def test_summary_is_json_ready():
    model = _capsnet(5)
    x = _half_blank(4)
    s = analyze_dilution(model, x, torch.tensor([0, 1, 2, 3])).summary()
    json.dumps(s)
    assert s["images"] == 4 and s["grid"] == [4, 6, 6] and 0 <= s["accuracy"] <= 1
    assert s["background"]["fraction"] == pytest.approx(1 / 3)
    for name in ("background", "short"):
        assert set(s[name]) == {"fraction", "share_predicted", "share_all_classes",
                                "length_change_predicted", "relative_length_change_predicted",
                                "prediction_changed"}


def test_restrained_model_is_supported():
    model = _capsnet(6, primary_restraint="topk", primary_restraint_kwargs={"k": 1})
    r = analyze_dilution(model, _half_blank(2), threshold=1e-6)
    # 3 of the 4 types are zeroed at every position: at least that many capsules are "short"
    assert bool((r.fraction["short"] >= 0.75).all())


@pytest.mark.parametrize("name", ["res_capsnet", "cnn_baseline"])
def test_other_models_are_refused_by_name(name):
    model = create_model(name)
    with pytest.raises(ValueError, match=f"does not support model '{name}'"):
        analyze_dilution(model, torch.rand(1, 1, 28, 28), name=name)
    with pytest.raises(ValueError, match=type(model).__name__):
        check_dilution_model(model)


def test_bad_arguments():
    model = _capsnet()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match="threshold"):
        analyze_dilution(model, x, threshold=-0.1)
    with pytest.raises(ValueError, match="background_ink"):
        analyze_dilution(model, x, background_ink=1.0)
    with pytest.raises(ValueError, match="labels"):
        analyze_dilution(model, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch_size"):
        analyze_dilution(model, x, batch_size=0)
    with pytest.raises(ValueError, match="images"):
        analyze_dilution(model, torch.rand(2, 28, 28, dtype=torch.float64))


def test_figure_writes_png_without_pyplot_figures(tmp_path):
    model = _capsnet(7)
    x = _half_blank(3)
    r = analyze_dilution(model, x)
    plt = sys.modules.get("matplotlib.pyplot")
    before = plt.get_fignums() if plt else []
    path = dilution_figure(r, x, tmp_path / "sub" / "d.png", index=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt = sys.modules.get("matplotlib.pyplot")
    assert (plt.get_fignums() if plt else []) == before
    with pytest.raises(ValueError, match="index"):
        dilution_figure(r, x, tmp_path / "e.png", index=3)


# ------------------------------------------------------------------ command line


def _parser():
    from torchcaps.cli import dilution as cmd

    p = argparse.ArgumentParser(prog="torchcaps")
    cmd.add_parser(p.add_subparsers(dest="command"))
    return p, cmd


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A capsnet with the power restraint trained for 2 steps on the bundled subset."""
    from torchcaps.train import TrainConfig, train

    out = tmp_path_factory.mktemp("dilution") / "run"
    summary = train(TrainConfig(
        model="capsnet", model_kwargs={**SMALL, "primary_restraint": "power",
                                       "primary_restraint_kwargs": {"p": 2.0}},
        dataset="mnist-mini", epochs=1, max_steps=2, batch_size=16, seed=0, out=str(out),
        threads=1, progress=False))
    return summary["checkpoint"]


def test_cli_end_to_end_on_a_trained_checkpoint(tiny_run, tmp_path, capsys):
    parser, cmd = _parser()
    js = tmp_path / "d.json"
    args = parser.parse_args(["dilution", tiny_run, "--n", "40", "--batch-size", "16",
                              "--out", str(tmp_path / "fig"), "--json", str(js),
                              "--threshold", "0.2"])
    assert cmd.run(args) == 0
    printed = capsys.readouterr().out
    assert "40 images" in printed and "short (|u| < 0.2)" in printed
    s = json.loads(js.read_text())
    assert s["images"] == 40 and s["model"] == "capsnet" and s["threshold"] == 0.2
    assert (tmp_path / "fig" / "dilution.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_arguments_are_checked():
    parser, _ = _parser()
    for bad in (["--threshold", "-1"], ["--background-ink", "1"], ["--n", "0"],
                ["--split", "train"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["dilution", "ck", *bad])


def test_cli_refuses_other_models_and_needs_translate(tmp_path):
    from torchcaps.train import save_checkpoint

    parser, cmd = _parser()
    manifest = {"step": 0, "epoch": 0, "config": {"dataset": "mnist-mini"}}
    res_kw = {"conv_channels": 8, "primary_types": 4, "depth": 1, "skip": 0}
    save_checkpoint(tmp_path / "res", create_model("res_capsnet", **res_kw),
                    {**manifest, "model": "res_capsnet", "model_kwargs": res_kw})
    args = parser.parse_args(["dilution", str(tmp_path / "res.json"), "--no-plots"])
    with pytest.raises(ValueError, match="does not support model 'res_capsnet'"):
        cmd.run(args)

    kw40 = {**SMALL, "in_shape": [1, 40, 40]}
    save_checkpoint(tmp_path / "c40", create_model("capsnet", **kw40),
                    {**manifest, "model": "capsnet", "model_kwargs": kw40})
    args = parser.parse_args(["dilution", str(tmp_path / "c40.json"), "--n", "8", "--no-plots"])
    with pytest.raises(ValueError, match="--translate"):
        cmd.run(args)
    args = parser.parse_args(["dilution", str(tmp_path / "c40.json"), "--n", "8", "--no-plots",
                              "--translate", "--json", str(tmp_path / "t.json")])
    assert cmd.run(args) == 0
    s = json.loads((tmp_path / "t.json").read_text())
    assert s["grid"] == [4, 12, 12] and s["translated"] is True
