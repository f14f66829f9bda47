"""Training recipes and paper figures registered with the models; training over several seeds."""

import dataclasses
import json
import statistics

import pytest

import torchcaps.train.seeds as seeds_module
from torchcaps.cli import main
from torchcaps.models import ModelCfg, get_model_cfg, list_models
from torchcaps.models import _registry as registry
from torchcaps.train import TrainConfig, train_seeds
from torchcaps.train.seeds import seed_statistics

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
#: a few steps on the bundled subset with a tiny CNN: seconds per run
TINY = ["--model", "cnn_baseline", "--model-kwargs", '{"conv_channels": [4, 4, 4], "hidden": [8, 8]}',
        "--max-steps", "2", "--epochs", "1", "--no-progress", "--threads", "1"]
#: efficient_capsnet narrowed (its recipe sets no model arguments), a few steps
QUICK = ["--model-kwargs", '{"channels": [8, 8, 8, 16], "decoder_hidden": [16, 16]}',
         "--max-steps", "2", "--epochs", "1", "--no-progress", "--threads", "1"]


def _recorded(out):
    return json.loads((out / "last.json").read_text())["config"]


@pytest.mark.parametrize("name", list_models())
def test_every_classifier_has_a_valid_recipe_and_paper_figure(name):
    cfg = get_model_cfg(name)
    assert isinstance(cfg, ModelCfg) and cfg.citation
    assert set(cfg.recipe) <= FIELDS - {"model", "out", "dataset", "seed"}, name
    assert isinstance(cfg.paper.get("mnist"), str) and cfg.paper["mnist"]
    built = TrainConfig(model=name, out=None, **cfg.recipe_kwargs())  # valid values
    for key, value in cfg.recipe_kwargs().items():
        assert json.dumps(getattr(built, key)) == json.dumps(value), key
    assert TrainConfig.from_recipe(name).out == f"runs/{name}"


def test_recipe_values_and_overrides_in_python():
    assert get_model_cfg("efficient_capsnet").recipe["batch_size"] == 16
    assert get_model_cfg("capsnet").recipe == {}  # TrainConfig's defaults are Sabour et al.'s
    assert get_model_cfg("segcaps") == ModelCfg()  # a model registered without a cfg
    cfg = TrainConfig.from_recipe("efficient_capsnet", batch_size=32, out=None)
    assert (cfg.batch_size, cfg.lr, cfg.augment, cfg.lr_staircase) == (32, 5e-4, "efficient", True)
    assert TrainConfig(model="efficient_capsnet").batch_size == 128  # no recipe applied silently
    em = TrainConfig.from_recipe("em_capsnet", model_kwargs={"iterations": 3})
    assert em.model_kwargs == {"iterations": 3} and em.lr_milestones == (25600, 34380)
    with pytest.raises(TypeError):
        TrainConfig.from_recipe("capsnet", bogus=1)


def test_model_cfg_is_read_only_and_register_model_keeps_its_forms(monkeypatch):
    cfg = get_model_cfg("em_capsnet")
    with pytest.raises(TypeError):
        cfg.recipe["lr"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.citation = "x"
    copy = cfg.recipe_kwargs()
    copy["model_kwargs"]["iterations"] = 5  # a fresh copy: the registered recipe is unchanged
    assert get_model_cfg("em_capsnet").recipe["model_kwargs"]["iterations"] == 2
    with pytest.raises(TypeError, match="string keys"):
        ModelCfg(recipe={1: 2})

    # a registry of its own, so the test models never reach other tests' sweeps
    monkeypatch.setattr(registry, "_MODELS", registry.Registry("model"))
    monkeypatch.setattr(registry, "_TASK_OF", {})
    monkeypatch.setattr(registry, "_CFG_OF", {})

    @registry.register_model
    def bare(**kw):
        return None

    @registry.register_model(task="segmentation")
    def seg(**kw):
        return None

    @registry.register_model(default_cfg=ModelCfg(recipe={"lr": 1e-4}, paper={"mnist": "1%"}))
    def with_cfg(**kw):
        return None

    assert get_model_cfg("bare") == get_model_cfg("seg") == ModelCfg()
    assert registry.model_task("seg") == "segmentation"
    assert dict(get_model_cfg("with_cfg").recipe) == {"lr": 1e-4}
    with pytest.raises(TypeError, match="ModelCfg"):
        registry.register_model(default_cfg={"lr": 1.0})
    with pytest.raises(KeyError, match="unknown model"):
        get_model_cfg("nope")


def test_train_cli_applies_the_recipe_unless_a_flag_or_no_recipe_says_otherwise(tmp_path, capsys):
    out = tmp_path / "eff"
    assert main(["train", "--model", "efficient_capsnet", "--out", str(out), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "recipe of efficient_capsnet: lr 0.0005, batch_size 16, lr_decay 0.97" in err
    saved = _recorded(out)
    assert (saved["batch_size"], saved["lr"], saved["augment"]) == (16, 5e-4, "efficient")
    assert (saved["lr_staircase"], saved["lr_min"], saved["lr_decay_steps"]) == (True, 5e-5, 3438)

    # a typed flag wins over the recipe, the rest of the recipe still applies
    out2 = tmp_path / "eff-b8"
    assert main(["train", "--model", "efficient_capsnet", "--out", str(out2), "--batch-size", "8",
                 "--augment", "none", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "(typed instead: --batch-size 8, --augment none)" in err and "batch_size 16" not in err
    saved = _recorded(out2)
    assert (saved["batch_size"], saved["augment"], saved["lr"]) == (8, "none", 5e-4)

    # a resumed run keeps its recorded config; changing a recipe setting is refused as before
    assert main(["train", "--out", str(out2), "--resume", "--max-steps", "3", "--no-progress",
                 "--threads", "1"]) == 0
    assert _recorded(out2)["batch_size"] == 8 and "recipe of" not in capsys.readouterr().err
    assert main(["train", "--out", str(out2), "--resume", "--batch-size", "16"]) == 2
    assert "cannot change mid-run" in capsys.readouterr().err


def test_no_recipe_takes_the_defaults(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["train", "--model", "cnn_baseline", "--no-recipe", "--out", str(out),
                 *TINY[2:]]) == 0
    assert "recipe of" not in capsys.readouterr().err
    assert _recorded(out)["lr"] == 1e-3  # cnn_baseline's recipe would set 3e-4


def test_models_command_prints_recipe_and_paper_figure(capsys):
    assert main(["models", "efficient*", "--task", "classification"]) == 0
    text = capsys.readouterr().out
    assert "99.74% mean, 99.84% best (Mazzia et al. 2021)" in text
    assert "recipe: lr 0.0005, batch_size 16" in text


def test_seeds_cli_writes_mean_and_std_and_resumes_or_skips(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert main(["train", "--seeds", "0", "1", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "seeds.json").read_text())
    accs = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["test_accuracy"]
            for s in (0, 1)]
    assert report["seeds"] == [0, 1] and [r["status"] for r in report["runs"]] == ["trained"] * 2
    assert [r["summary"]["test_accuracy"] for r in report["runs"]] == accs
    assert report["mean"]["test_accuracy"] == pytest.approx(statistics.mean(accs))
    assert report["std"]["test_accuracy"] == pytest.approx(statistics.stdev(accs))
    assert {"test_loss", "test_correct", "test_total"} <= set(report["mean"])
    assert report["config"]["lr"] == 3e-4 and "seed" not in report["config"]  # the recipe
    assert _recorded(out / "seed-1")["seed"] == 1
    mean, std = 100 * statistics.mean(accs), 100 * statistics.stdev(accs)
    assert f"test accuracy: {mean:.2f} ± {std:.2f}% over 2 seeds" in printed

    # seed 1 interrupted after its last checkpoint: re-running resumes it, skips seed 0
    (out / "seed-1" / "summary.json").unlink()
    assert main(["train", "--seeds", "0", "1", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "seeds.json").read_text())
    assert [r["status"] for r in report["runs"]] == ["skipped", "resumed"]
    assert report["runs"][1]["summary"]["test_accuracy"] == accs[1]

    # finished seeds are not trained again
    monkeypatch.setattr(seeds_module, "train", lambda *a, **k: pytest.fail("trained again"))
    assert main(["train", "--seeds", "0", "1", "--out", str(out), *TINY]) == 0
    assert "over 2 seeds" in capsys.readouterr().out
    # other settings than the recorded ones are refused, as is --resume and --seed with --seeds
    assert main(["train", "--seeds", "0", "1", "--out", str(out), *TINY, "--lr", "0.01"]) == 2
    assert "lr=0.0003 (now 0.01)" in capsys.readouterr().err
    assert main(["train", "--seeds", "0", "--out", str(out), "--resume"]) == 2
    assert "without --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--seeds", "0", "--seed", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_train_seeds_statistics(monkeypatch):
    accuracy = {3: 0.97, 5: 0.99, 8: 0.9825}
    seen = []

    def fake_train(cfg, resume=False, changes=None):
        seen.append((cfg.seed, cfg.out, cfg.lr, resume))
        return {"test_accuracy": accuracy[cfg.seed], "test_loss": cfg.seed / 10,
                "test_correct": int(accuracy[cfg.seed] * 400), "test_total": 400,
                "test_flag": True, "steps": 2}

    monkeypatch.setattr(seeds_module, "train", fake_train)
    report = train_seeds(TrainConfig(model="capsnet", out=None, lr=2e-3), [3, 5, 8])
    assert seen == [(3, None, 2e-3, False), (5, None, 2e-3, False), (8, None, 2e-3, False)]
    values = list(accuracy.values())
    assert report["mean"]["test_accuracy"] == pytest.approx(statistics.mean(values), abs=1e-15)
    assert report["std"]["test_accuracy"] == pytest.approx(statistics.stdev(values), abs=1e-15)
    assert report["std"]["test_loss"] == pytest.approx(statistics.stdev([0.3, 0.5, 0.8]))
    assert report["mean"]["test_total"] == 400 and report["std"]["test_total"] == 0
    assert "test_flag" not in report["mean"] and "steps" not in report["mean"]  # not test metrics
    mean, std = seed_statistics([{"test_accuracy": 0.5}])
    assert mean == {"test_accuracy": 0.5} and std == {"test_accuracy": None}  # one seed: no spread
    for bad in ([], [1, 1]):
        with pytest.raises(ValueError):
            train_seeds(TrainConfig(out=None), bad)
