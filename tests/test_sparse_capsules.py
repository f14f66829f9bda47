"""Sparse unsupervised capsules: model, sparsening, boosting, task, resume, command line."""

import json
import math

import numpy as np
import pytest
import torch

from torchcaps.data import DatasetSplits, Split, load_dataset
from torchcaps.models.sparse_capsnet import (
    SparseCapsNet,
    rank_mask,
    routing_mass,
    update_boost,
    update_win_rate,
    win_rates,
)
from torchcaps.train import CheckpointError, TrainConfig
from torchcaps.train.checkpoint import load_checkpoint, model_state
from torchcaps.train.unsupervised import (
    SparseCapsuleSettings,
    SparseCapsuleTask,
    load_sparse_capsnet,
    sparse_capsule_config,
    train_sparse_capsules,
)

TINY = {"conv_channels": 8, "primary_types": 4, "primary_dim": 4, "latent_caps": 6,
        "latent_dim": 4, "decoder_hidden": [32]}


def tiny_model(**kw) -> SparseCapsNet:
    return SparseCapsNet(in_shape=(1, 24, 24), **{**TINY, **kw})


# ---------------------------------------------------------------- loop references (float64)
def ref_routing_mass(c: torch.Tensor, types: int, score: str) -> torch.Tensor:
    b, i, j = c.shape
    n = i // types
    out = torch.zeros(b, j, dtype=torch.float64)
    for bb in range(b):
        for jj in range(j):
            if score == "release":  # max over runs of `types` consecutive children
                out[bb, jj] = sum(max(float(c[bb, g * types + k, jj]) for k in range(types))
                                  for g in range(n))
            elif score == "per_position":  # max over the types at each position
                out[bb, jj] = sum(max(float(c[bb, t * n + p, jj]) for t in range(types))
                                  for p in range(n))
            else:
                out[bb, jj] = sum(float(c[bb, ii, jj]) for ii in range(i))
    return out


def ref_rank_mask(scores: torch.Tensor, steepness: float = 12.0, clip: float = 0.01):
    b, j = scores.shape
    ranks = torch.zeros(b, j, dtype=torch.int64)
    mask = torch.zeros(b, j, dtype=torch.float64)
    for bb in range(b):
        s = [float(v) for v in scores[bb]]
        for c in range(j):  # capsules scoring higher, and equal ones with a lower index
            r = sum(1 for k in range(j) if s[k] > s[c] or (s[k] == s[c] and k < c))
            ranks[bb, c] = r
            m = math.exp(-steepness * r / (j - 1))
            mask[bb, c] = m if m >= clip else 0.0
    return mask, ranks


def ref_boost(boost, ema, step, low, high):
    out = boost.clone()
    for c in range(len(out)):
        if float(ema[c]) < low:
            out[c] += step
        if float(ema[c]) > high:
            out[c] -= step
        out[c] = max(1.0, float(out[c]))
    return out


# ---------------------------------------------------------------- model
def test_shapes_gradients_and_codes():
    m = tiny_model()
    x = torch.rand(3, 1, 24, 24)
    out = m(x)
    n_primary = 4 * 4 * 4  # (24 - 8) = 16 -> 9x9 stride 2 -> 4x4 grid, 4 types
    assert out.poses.shape == (3, 6, 4) and out.couplings.shape == (3, n_primary, 6)
    assert out.scores.shape == out.ranks.shape == out.mask.shape == (3, 6)
    assert out.reconstruction.shape == x.shape and not out.mask.requires_grad
    loss = m.loss(out, x)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.encode(x).shape == (3, 24)
    assert torch.allclose(m.encode(x), out.poses.flatten(1), atol=1e-6)
    dense = tiny_model(sparsening=False)
    out = dense(x)
    assert out.mask is None and out.reconstruction.shape == x.shape
    assert int(dense.boost_steps) == 0  # no statistics without sparsening
    with pytest.raises(ValueError, match="too small"):
        SparseCapsNet(in_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="latent_caps"):
        tiny_model(latent_caps=1)


def test_release_geometry():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        m = SparseCapsNet()  # 40x40: 32 x 32 conv grid, 12 x 12 x 32 = 4608 primary capsules
    assert m.latent.in_caps == 4608 and (m.latent_caps, m.latent_dim) == (16, 16)
    assert m.parameter_counts() == {"total": 17_064_000, "encoder": 14_767_104,
                                    "decoder": 2_296_896}
    # the release's mask keeps six of 16 capsules: exp(-0.8 r) >= 0.01 for r <= 5
    mask, _ = rank_mask(torch.arange(16.0)[None].double())
    assert int((mask > 0).sum()) == 6 and mask.max() == 1.0


@pytest.mark.parametrize("score", ["release", "per_position", "sum"])
def test_routing_mass_matches_loop(score):
    c = torch.softmax(torch.randn(2, 12, 5, dtype=torch.float64), dim=2)  # I = 3 types x 4
    assert torch.allclose(routing_mass(c, 3, score), ref_routing_mass(c, 3, score), atol=1e-12)


def test_rank_mask_matches_loop():
    scores = torch.randn(7, 9, dtype=torch.float64)
    scores[0, 3] = scores[0, 5]  # a tie: the lower index ranks first
    boost = 1.0 + torch.rand(9, dtype=torch.float64)
    mask, ranks = rank_mask(scores * boost)
    ref_mask, ref_ranks = ref_rank_mask(scores * boost)
    assert torch.equal(ranks, ref_ranks)
    assert torch.allclose(mask, ref_mask, atol=1e-15, rtol=0)
    mask, _ = rank_mask(scores, steepness=6.0, clip=0.1)
    assert torch.allclose(mask, ref_rank_mask(scores, 6.0, 0.1)[0], atol=1e-15, rtol=0)


def test_mask_zeroes_low_ranked_capsules():
    m = tiny_model()
    scores = torch.tensor([[0.5, 3.0, 1.0, 0.1, 2.0, 0.2]], dtype=torch.float64)
    mask, ranks = rank_mask(scores)  # 6 capsules: exp(-2.4 r); only ranks 0 and 1 survive
    assert ranks.tolist() == [[3, 0, 2, 5, 1, 4]]
    assert mask[0, 1] == 1.0 and mask[0, 4] == pytest.approx(math.exp(-2.4))
    assert (mask[0, [0, 2, 3, 5]] == 0).all()  # reversed ranks would keep capsules 3 and 5
    # the decoder sees nothing of a zeroed capsule, everything of the winner
    poses = torch.rand(1, 6, 4)
    base = m.decoder(poses, mask.float())
    moved = poses.clone()
    moved[0, 3] += 5.0
    assert torch.equal(m.decoder(moved, mask.float()), base)
    moved = poses.clone()
    moved[0, 1] += 5.0
    assert not torch.allclose(m.decoder(moved, mask.float()), base)
    # the boost multiplies the score before ranking: a starved capsule can win
    boosted, _ = rank_mask(scores * torch.tensor([1, 1, 1, 40, 1, 1.0], dtype=torch.float64))
    assert boosted[0, 3] == 1.0


def test_boost_and_win_rate_updates_match_loop():
    for _ in range(5):
        ema = torch.rand(10, dtype=torch.float64) * 0.2
        boost = 1.0 + torch.rand(10, dtype=torch.float64) * 0.3
        got = update_boost(boost, ema, 0.1, 0.03, 0.12)
        assert torch.allclose(got, ref_boost(boost, ema, 0.1, 0.03, 0.12), atol=1e-15, rtol=0)
    ranks = torch.tensor([[0, 1, 2], [1, 0, 2], [0, 2, 1], [0, 1, 2]])
    rates = win_rates(ranks)
    assert rates.tolist() == [0.75, 0.25, 0.0]
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(update_win_rate(zero, rates, 0.99), rates)  # first update: as they are
    prev = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    ref = [0.99 * p + 0.01 * r for p, r in zip(prev.tolist(), rates.tolist())]
    assert update_win_rate(prev, rates, 0.99).tolist() == pytest.approx(ref, abs=1e-15)


def test_boosting_raises_a_starved_capsule_after_the_interval():
    m = tiny_model(boost_every=3)
    starved = torch.tensor([[0, 1, 2, 3, 4, 5]] * 4)  # capsule 0 always wins, 5 never
    for _ in range(2):
        m.update_statistics(starved)
    assert torch.equal(m.boost, torch.ones(6, dtype=torch.float64))  # not yet due
    m.update_statistics(starved)
    assert int(m.boost_steps) == 3
    assert m.boost.tolist() == pytest.approx([1.0, 1.1, 1.1, 1.1, 1.1, 1.1])  # 0 stays at the floor
    for _ in range(3):
        m.update_statistics(starved)
    assert m.boost[5] == pytest.approx(1.2)
    # forward passes update the statistics in training mode only
    x = torch.rand(2, 1, 24, 24)
    m.eval()
    m(x)
    assert int(m.boost_steps) == 6
    m.train()
    m(x)
    assert int(m.boost_steps) == 7
    nob = tiny_model(boost_every=1, boosting=False)
    nob.update_statistics(starved)
    assert torch.equal(nob.boost, torch.ones(6, dtype=torch.float64)) and nob.win_rate[0] == 1.0
    assert {"boost", "win_rate", "boost_steps"} <= set(m.state_dict())


def test_a_tiny_batch_is_learned():
    torch.manual_seed(0)
    m = tiny_model()
    x = load_dataset("mnist-mini").train.raw(slice(0, 8))[0][:, :, 2:26, 2:26]  # (8, 1, 24, 24)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = m.loss(m(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- task on the engine
@pytest.fixture(scope="module")
def tiny_data():
    from torchcaps.evaluation.suites import build_affnist_data

    splits, affine = build_affnist_data("mnist-mini", affine_size=24)
    cut = {"train": 48, "val": 24, "test": 24}
    small = DatasetSplits(splits.name, *(Split(getattr(splits, k).images[:n],
                                               getattr(splits, k).labels[:n])
                                         for k, n in cut.items()), num_classes=10)
    return small, affine


SETTINGS = SparseCapsuleSettings(probe_train=24, summary_train=48, summary_probes=("logistic",))


def _config(out, **kw):
    return sparse_capsule_config(dataset="mnist-mini", model_kwargs={**TINY, "boost_every": 2},
                                 batch_size=16, out=str(out) if out else None, progress=False,
                                 threads=1, **kw)


def test_exact_resume_restores_boosts(tiny_data, tmp_path):
    full = train_sparse_capsules(_config(tmp_path / "a", epochs=2), SETTINGS, data=tiny_data)
    train_sparse_capsules(_config(tmp_path / "b", epochs=1), SETTINGS, data=tiny_data)
    resumed = train_sparse_capsules(_config(tmp_path / "b", epochs=2), SETTINGS, resume=True,
                                    data=tiny_data)
    a, b = load_checkpoint(tmp_path / "a" / "last"), load_checkpoint(tmp_path / "b" / "last")
    wa, wb = model_state(a[1]), model_state(b[1])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert int(wa["boost_steps"]) == 6 and not torch.equal(wa["boost"], torch.ones(6).double())
    assert [h["val_probe_accuracy"] for h in a[0]["history"]] == \
        [h["val_probe_accuracy"] for h in b[0]["history"]]
    assert full["best"] == resumed["best"]
    for key in ("translated", "affine"):
        assert full["probes"]["logistic"][key] == resumed["probes"]["logistic"][key]
    model, meta = load_sparse_capsnet(tmp_path / "b" / "last")
    assert torch.equal(model.boost, wa["boost"]) and meta["task_state"]["boost"] == model.boost.tolist()
    with pytest.raises(CheckpointError, match="sparse-capsule settings"):
        train_sparse_capsules(_config(tmp_path / "b", epochs=3),
                              SparseCapsuleSettings(probe_train=12, summary_train=48,
                                                    summary_probes=("logistic",)),
                              resume=True, data=tiny_data)


def test_the_task_refuses_other_models_and_placements(tiny_data):
    from torchcaps.train import Trainer

    with pytest.raises(ValueError, match="sparse_capsnet"):
        Trainer(SparseCapsuleTask(SETTINGS, tiny_data), TrainConfig(out=None, augment="shift"))
    with pytest.raises(ValueError, match="max_shift <= 6"):
        Trainer(SparseCapsuleTask(SETTINGS, tiny_data), _config(None, max_shift=7))
    with pytest.raises(ValueError, match="in_shape"):
        Trainer(SparseCapsuleTask(SETTINGS, tiny_data),
                sparse_capsule_config(model_kwargs={"in_shape": [1, 40, 40]}, out=None))
    with pytest.raises(ValueError, match="probe"):
        SparseCapsuleSettings(probe="knn")


# ---------------------------------------------------------------- command line
def test_cli_train_and_codes(tmp_path, monkeypatch, capsys):
    import torchcaps.cli as cli

    if "unsupervised" not in cli._COMMANDS:
        monkeypatch.setattr(cli, "_COMMANDS", cli._COMMANDS + ("unsupervised",))
    run = tmp_path / "run"
    argv = ["unsupervised", "train", "--dataset", "mnist-mini", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "8", "--model-kwargs", json.dumps(TINY), "--probe-train", "30",
            "--probe-val", "30", "--summary-train", "40", "--summary-probes", "logistic", "svm",
            "--affine-size", "40", "--out", str(run), "--threads", "1", "--no-progress",
            "--json", str(tmp_path / "summary.json")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == "sparse_capsnet"
    assert set(summary["probes"]) == {"logistic", "svm"} and summary["sizes"]["affine_test"] == 40
    assert "translated" in capsys.readouterr().out
    out = tmp_path / "codes.npz"
    assert cli.main(["unsupervised", "codes", str(run / "best"), "--split", "affine",
                     "--out", str(out), "--limit", "10", "--threads", "1"]) == 0
    with np.load(out) as f:
        codes, labels, info = f["codes"], f["labels"], json.loads(str(f["info"]))
    assert codes.shape == (10, 24) and codes.dtype == np.float32 and labels.dtype == np.int64
    assert info["split"] == "affine" and info["dataset"] == "mnist-mini"
    # refusals: a changed setting on resume, a directory that holds a run
    assert cli.main(["unsupervised", "train", "--out", str(run), "--resume", "--no-sparsening"]) == 2
    assert cli.main(argv[:-2]) == 2
    err = capsys.readouterr().err
    assert "cannot change mid-run: --no-sparsening" in err and "already holds" in err
