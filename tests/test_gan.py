"""GANs on the engine: the four generative pairs, their losses, the scores against closed
forms and loop references, the task's optimiser isolation, exact resume and the CLI."""

import json
import math

import pytest
import torch

from torchcaps.data import DatasetSplits, Split, load_dataset
from torchcaps.evaluation.generative import (
    FeatureClassifier,
    confident_share,
    knn_radii,
    precision_recall,
)
from torchcaps.models import CNNBaseline, create_model, list_models, model_task
from torchcaps.models.gan import GAN_MODELS, GANPair
from torchcaps.train import TrainConfig, Trainer
from torchcaps.train.checkpoint import CheckpointError, load_checkpoint, model_state
from torchcaps.train.gan import GANSettings, GANTask, train_gan

LATENT = 8
TINY_G = {"g_width": 8}
TINY_CAPS_G = {"top_caps": 3, "top_dim": 4, "part_types": 2, "part_dim": 4, "g_width": 8}
TINY_D = {"d_width": 8}
TINY_CAPS_D = {"conv_channels": 8, "primary_types": 4, "primary_dim": 4, "out_dim": 8}
TINY = {"dcgan": {**TINY_G, **TINY_D}, "capsule_gan": {**TINY_G, **TINY_CAPS_D},
        "capsule_generator_gan": {**TINY_CAPS_G, **TINY_D},
        "capsule_both_gan": {**TINY_CAPS_G, **TINY_CAPS_D}}


def tiny_pair(name, num_classes=0) -> GANPair:
    return create_model(name, latent_dim=LATENT, num_classes=num_classes, **TINY[name])


@pytest.fixture(scope="module")
def mini():
    return load_dataset("mnist-mini")


@pytest.fixture(scope="module")
def tiny_data(mini):
    def first(split, n):
        return Split(split.images[:n], split.labels[:n])

    return DatasetSplits("mnist-mini", first(mini.train, 32), first(mini.val, 12),
                         first(mini.test, 12), 10)


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return FeatureClassifier(CNNBaseline(conv_channels=(4,), hidden=(8,)), info={"checkpoint": None})


# ---------------------------------------------------------------- models
def test_the_four_pairs_are_registered_for_generation():
    assert set(GAN_MODELS) <= set(list_models(task="generation"))
    assert not set(GAN_MODELS) & set(list_models())  # not among the classifiers
    assert all(model_task(n) == "generation" for n in GAN_MODELS)


@pytest.mark.parametrize("name, counts", [
    ("dcgan", (759_681, 138_689, 1_007_746)),
    ("capsule_gan", (759_681, 408_256, 1_278_881)),
    ("capsule_generator_gan", (584_737, 138_689, 732_290)),
    ("capsule_both_gan", (584_737, 408_256, 1_003_425)),
])
def test_parameter_counts_of_the_docstring_table(name, counts):
    g, d, conditional_total = counts
    assert create_model(name).parameter_counts() == {"generator": g, "discriminator": d,
                                                     "total": g + d}
    assert create_model(name, num_classes=10).parameter_counts()["total"] == conditional_total


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("name", GAN_MODELS)
def test_shapes_ranges_and_every_parameter_gets_a_gradient(name, conditional):
    k = 10 if conditional else 0
    pair = tiny_pair(name, k)
    z = torch.randn(4, LATENT)
    y = torch.tensor([0, 3, 3, 9]) if conditional else None
    x = pair.generate(z, y)
    assert x.shape == (4, 1, 28, 28) and float(x.detach().abs().max()) <= 1.0
    scores = pair.discriminate(x, y).detach()
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    if pair.kind == "length":
        assert float(scores.min()) >= 0.0 and float(scores.max()) < 1.0
    real = torch.rand(4, 1, 28, 28) * 2 - 1
    pair.discriminator_loss(pair.discriminate(real, y), pair.discriminate(x.detach(), y)).backward()
    for n, p in pair.discriminator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(p.grad is None for p in pair.generator.parameters())
    pair.generator_loss(pair.discriminate(pair.generate(z, y), y)).backward()
    for n, p in pair.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert float(p.grad.abs().sum()) > 0, n


def test_sample_is_in_unit_range_reproducible_and_keeps_the_mode():
    pair = tiny_pair("capsule_both_gan", 10)
    pair.train()
    labels = torch.arange(6) % 10
    a = pair.sample(6, labels, torch.Generator().manual_seed(1), batch_size=4)
    b = pair.sample(6, labels, torch.Generator().manual_seed(1), batch_size=4)
    c = pair.sample(6, labels, torch.Generator().manual_seed(1))  # one batch: other round-off
    assert a.shape == (6, 1, 28, 28) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-5) and pair.training


def test_the_losses_are_bce_and_the_margin_loss():
    logit = tiny_pair("dcgan")
    s = torch.tensor([2.0, -1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(logit.discriminator_loss(s, -s),
                          bce(s, torch.ones(2)) + bce(-s, torch.zeros(2)))
    assert torch.allclose(logit.generator_loss(s), bce(s, torch.ones(2)))
    caps = tiny_pair("capsule_gan")
    v_real, v_fake = torch.tensor([0.95, 0.5]), torch.tensor([0.05, 0.3])
    # L_M(|v|, 1) = max(0, 0.9 - |v|)^2; L_M(|v|, 0) = 0.5 max(0, |v| - 0.1)^2; batch means
    d = ((0.0 + 0.4 ** 2) + 0.5 * (0.0 + 0.2 ** 2)) / 2
    assert float(caps.discriminator_loss(v_real, v_fake)) == pytest.approx(d)
    assert float(caps.generator_loss(v_fake)) == pytest.approx((0.85 ** 2 + 0.6 ** 2) / 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="conditional"):
        tiny_pair("dcgan", 10).generate(torch.randn(2, LATENT))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_pair("dcgan").generate(torch.randn(2, LATENT), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        tiny_pair("capsule_gan", 10).discriminate(torch.zeros(2, 1, 28, 28), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        tiny_pair("dcgan").generate(torch.randn(2, LATENT + 1))
    with pytest.raises(ValueError, match="multiples of 4"):
        create_model("dcgan", image_shape=(1, 30, 30))
    with pytest.raises(ValueError, match="17x17"):
        create_model("capsule_gan", image_shape=(1, 16, 16))
    with pytest.raises(TypeError, match="unexpected"):
        create_model("dcgan", primary_types=4)


@pytest.mark.parametrize("name", ["dcgan", "capsule_gan"])
def test_the_discriminator_learns_to_separate_a_real_batch_from_noise(name, mini):
    torch.manual_seed(0)
    pair = tiny_pair(name)
    x = mini.train.raw(torch.arange(8))[0] * 2 - 1  # real digits in [-1, 1]
    noise = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opt = torch.optim.Adam(pair.discriminator.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = pair.discriminator_loss(pair.discriminate(x), pair.discriminate(noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():  # train mode: the batch statistics it was trained with
        assert (pair.real_probability(pair.discriminate(x)) > 0.5).all()
        assert (pair.real_probability(pair.discriminate(noise)) < 0.5).all()
    assert losses[-1] < 0.2 * losses[0]


# ---------------------------------------------------------------- scores
def _with_moments(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``z`` moved to have exactly this sample mean and (unbiased) sample covariance."""
    zc = z - z.mean(0)
    white = zc @ torch.linalg.inv(torch.linalg.cholesky(zc.T @ zc / (len(z) - 1))).T
    return white @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_is_zero_for_identical_sets():
    pytest.importorskip("torchmetrics")
    from torchcaps.evaluation.generative import frechet_distance

    x = torch.randn(200, 5, dtype=torch.float64)
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    pytest.importorskip("torchmetrics")
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from torchcaps.evaluation.generative import frechet_distance

    g = torch.Generator().manual_seed(0)
    f, f64 = 4, torch.float64
    a, b = torch.randn(f, f, generator=g, dtype=f64), torch.randn(f, f, generator=g, dtype=f64)
    s1, s2 = a @ a.T + 0.5 * torch.eye(f, dtype=f64), b @ b.T + 0.1 * torch.eye(f, dtype=f64)
    m1, m2 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=f64), torch.zeros(f, dtype=f64)
    x = _with_moments(torch.randn(300, f, generator=g, dtype=f64), m1, s1)
    y = _with_moments(torch.randn(250, f, generator=g, dtype=f64), m2, s2)
    root = scipy_linalg.sqrtm((s1 @ s2).numpy()).real
    closed = float(((m1 - m2) ** 2).sum() + torch.trace(s1 + s2)) - 2 * float(root.trace())
    assert frechet_distance(x, y) == pytest.approx(closed, rel=1e-7)
    # diagonal covariances: sum (sqrt a_i - sqrt b_i)^2 plus the squared mean distance
    d1, d2 = torch.tensor([1.0, 4.0, 9.0, 0.25]), torch.tensor([4.0, 1.0, 1.0, 1.0])
    x = _with_moments(torch.randn(300, f, generator=g, dtype=f64), m1, torch.diag(d1).double())
    y = _with_moments(torch.randn(300, f, generator=g, dtype=f64), m2, torch.diag(d2).double())
    by_hand = float(((m1 - m2) ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum())
    assert frechet_distance(x, y) == pytest.approx(by_hand, rel=1e-7)


def _radii_loop(x: torch.Tensor, k: int) -> list[float]:
    out = []
    for i in range(len(x)):
        d = sorted(math.dist(x[i].tolist(), x[j].tolist()) for j in range(len(x)) if j != i)
        out.append(d[k - 1])
    return out


def _precision_recall_loop(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    def covered(points, centres, radii):
        return sum(any(math.dist(p.tolist(), c.tolist()) <= r for c, r in zip(centres, radii))
                   for p in points) / len(points)

    return (covered(fake, real, _radii_loop(real, k)), covered(real, fake, _radii_loop(fake, k)))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_and_recall_match_the_float64_loop_reference(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(33, 3, generator=g, dtype=torch.float64) + 0.8
    p, r = precision_recall(real, fake, k, chunk=7)
    assert (p, r) == _precision_recall_loop(real, fake, k)
    assert 0 < p < 1 and 0 < r < 1
    assert knn_radii(real, k, chunk=5).tolist() == pytest.approx(_radii_loop(real, k), rel=1e-12)
    assert precision_recall(real, real.clone(), k) == (1.0, 1.0)


def test_confident_share():
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.2, 0.8]])
    assert confident_share(probs) == pytest.approx(0.5)


# ---------------------------------------------------------------- the task
def _config(name, out, **kw):
    base = dict(model=name, model_kwargs=TINY[name], dataset="mnist-mini", epochs=2, batch_size=16,
                lr=2e-4, lr_decay=1.0, optimizer_kwargs={"betas": [0.5, 0.999]}, augment="none",
                out=None if out is None else str(out), progress=False)
    return TrainConfig(**{**base, **kw})


SETTINGS = GANSettings(latent_dim=LATENT, score_samples=12, test_samples=12, grid=8)


@pytest.mark.parametrize("name", ["dcgan", "capsule_both_gan"])
def test_each_update_changes_only_its_own_network(name, tiny_data, tiny_classifier):
    task = GANTask(GANSettings(latent_dim=LATENT, d_steps=2, score_samples=12, test_samples=12),
                   tiny_data, tiny_classifier)
    trainer = Trainer(task, _config(name, None))
    gen, disc = task.model.generator, task.model.discriminator
    ids = {id(p) for p in task.parameters("generator")}
    assert ids.isdisjoint(id(p) for p in task.parameters("discriminator"))

    def snap(module):
        return [p.detach().clone() for p in module.parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    seen, original = [], task.step

    def watched(batch):
        for item in original(batch):
            before = (snap(gen), snap(disc))
            yield item  # the engine back-propagates and steps this optimiser meanwhile
            seen.append((item[0], before, (snap(gen), snap(disc))))

    task.step = watched
    sums = {}
    trainer._train_step(task.batch(0, 0, trainer.aug_gen), 1.0, sums)
    assert [s[0] for s in seen] == ["discriminator", "discriminator", "generator"]
    for which, (g0, d0), (g1, d1) in seen:
        if which == "discriminator":
            assert same(g0, g1) and not same(d0, d1)
        else:
            assert same(d0, d1) and not same(g0, g1)
    assert sums["seen"] == 16 and sums["d_judged"] == 2 * 2 * 16


def test_batches_are_a_pure_function_of_position_and_generator(tiny_data, tiny_classifier):
    task = GANTask(SETTINGS, tiny_data, tiny_classifier)
    Trainer(task, _config("dcgan", None))
    a = task.batch(1, 1, torch.Generator().manual_seed(5))
    b = task.batch(1, 1, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y, z = a
    assert x.shape == (16, 1, 28, 28) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert z.shape == (16, 1, LATENT) and y.shape == (16,)


def test_exact_resume_and_settings_check(tmp_path, tiny_data, tiny_classifier):
    pytest.importorskip("torchmetrics")
    name = "capsule_both_gan"
    full = train_gan(_config(name, tmp_path / "a"), SETTINGS, data=tiny_data,
                     classifier=tiny_classifier)
    train_gan(_config(name, tmp_path / "b", epochs=1), SETTINGS, data=tiny_data,
              classifier=tiny_classifier)
    resumed = train_gan(_config(name, tmp_path / "b"), SETTINGS, resume=True, data=tiny_data,
                        classifier=tiny_classifier)
    a, b = load_checkpoint(tmp_path / "a" / "last"), load_checkpoint(tmp_path / "b" / "last")
    wa, wb = model_state(a[1]), model_state(b[1])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["val_fd"] for h in a[0]["history"]] == [h["val_fd"] for h in b[0]["history"]]
    assert full["test"] == resumed["test"] and full["best"] == resumed["best"]
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "a" / "curves.png").is_file()
    assert set(full["test"]) == {"fd", "precision", "recall", "confident"}
    with pytest.raises(CheckpointError, match="GAN settings"):
        train_gan(_config(name, tmp_path / "b", epochs=3),
                  GANSettings(latent_dim=LATENT, score_samples=12, test_samples=12, d_steps=2),
                  resume=True, data=tiny_data, classifier=tiny_classifier)


def test_the_task_refuses_classifiers_and_augmentation(tiny_data, tiny_classifier):
    with pytest.raises(ValueError, match="capsnet is a classification model"):
        Trainer(GANTask(SETTINGS, tiny_data, tiny_classifier),
                TrainConfig(model="capsnet", augment="none", out=None))
    with pytest.raises(ValueError, match="augment"):
        train_gan(_config("dcgan", None, augment="shift"), SETTINGS, data=tiny_data)
    with pytest.raises(ValueError, match="latent_dim"):
        Trainer(GANTask(SETTINGS, tiny_data, tiny_classifier),
                _config("dcgan", None, model_kwargs={"latent_dim": 4}))
    with pytest.raises(ValueError, match="score_samples"):
        GANSettings(score_samples=3)


# ---------------------------------------------------------------- command line
def test_cli_train_sample_score(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchmetrics")
    import torchcaps.cli as cli

    if "gan" not in cli._COMMANDS:
        monkeypatch.setattr(cli, "_COMMANDS", cli._COMMANDS + ("gan",))
    run = tmp_path / "run"
    common = ["--data-dir", str(tmp_path), "--threads", "1"]
    argv = ["gan", "train", "--model", "capsule_both_gan", "--dataset", "mnist-mini",
            "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--conditional",
            "--latent-dim", str(LATENT), "--model-kwargs", json.dumps(TINY["capsule_both_gan"]),
            "--score-samples", "10", "--test-samples", "10", "--grid", "10",
            "--classifier-epochs", "1", "--classifier-max-steps", "2", "--out", str(run),
            "--no-progress", "--json", str(tmp_path / "summary.json"), *common]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model_kwargs"]["num_classes"] == 10
    assert "label_agreement" in summary["test"] and (run / "samples.png").is_file()
    assert "--max-steps 2" in summary["classifier"]["command"]
    assert cli.main(["gan", "sample", str(run / "best"), "--out", str(tmp_path / "g.png"),
                     "--num", "12", "--label", "3"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["gan", "score", str(run / "best"), "--json", str(tmp_path / "score.json"),
                     *common]) == 0
    assert "Frechet distance" in capsys.readouterr().out
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["fd"] == pytest.approx(summary["test"]["fd"], rel=1e-9)  # the summary, again
    # refusals: a classifier, a changed setting on resume, a label for the wrong model
    assert cli.main(["gan", "train", "--model", "capsnet", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["gan", "train", "--out", str(run), "--resume", "--latent-dim", "9"]) == 2
    assert cli.main(["gan", "sample", str(run / "best"), "--out", str(tmp_path / "h.png"),
                     "--label", "10"]) == 2
    assert "cannot change mid-run: --latent-dim" in capsys.readouterr().err
