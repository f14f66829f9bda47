"""benchmarks/zoo.py: --resume continues an existing run; make_tables marks each row's goal."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from torchcaps.models import get_model_cfg

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_zoo(zoo, monkeypatch, tmp_path, *extra, speed=None):
    calls = []

    def fake_train(cfg, resume=False):
        calls.append((cfg.model, resume, cfg.batch_size, cfg.checkpoint_every))
        return {"test_accuracy": 0.99, "best": {"epoch": 1}, "steps": 3, "train_seconds": 60.0}

    monkeypatch.setattr(zoo, "train", fake_train)
    monkeypatch.setattr(zoo, "measure_throughput",
                        speed or (lambda *a, **k: {"images_per_s": 10.0}))
    out_json = tmp_path / "zoo.json"
    monkeypatch.setattr(sys, "argv", ["zoo.py", "--models", "ida_capsnet", "capsnet",
                                      "--dataset", "mnist-mini", "--out", str(tmp_path / "runs"),
                                      "--json", str(out_json), *extra])
    zoo.main()
    return calls, json.loads(out_json.read_text())


def test_zoo_resume_only_where_a_checkpoint_exists(monkeypatch, tmp_path):
    zoo = _load("zoo")
    (tmp_path / "runs" / "ida_capsnet").mkdir(parents=True)
    (tmp_path / "runs" / "ida_capsnet" / "last.safetensors").write_bytes(b"x")
    calls, report = _run_zoo(zoo, monkeypatch, tmp_path, "--resume", "--checkpoint-every", "7")
    assert [(m, r) for m, r, _, _ in calls] == [("ida_capsnet", True), ("capsnet", False)]
    assert calls[0][2] == get_model_cfg("ida_capsnet").recipe["batch_size"]  # the recipe reaches train
    assert [c for *_, c in calls] == [7, 7]
    assert [r["resumed"] for r in report["rows"]] == [True, False]
    assert "--resume" in report["command"]
    # without --resume an existing checkpoint is not picked up
    calls, report = _run_zoo(zoo, monkeypatch, tmp_path)
    assert [(r, c) for _, r, _, c in calls] == [(False, 0), (False, 0)]


def test_zoo_table_marks_goals_and_fills_paper_column():
    make_tables = _load("make_tables")
    row = {"model": "efficient_capsnet", "test_accuracy": 0.996, "train_minutes": 45.0}
    assert make_tables.zoo_target(row) == "yes (>= 99.5% in 60 min)"
    assert make_tables.zoo_target({**row, "train_minutes": 61.0}).startswith("no")
    assert make_tables.zoo_target({**row, "test_accuracy": 0.994}).startswith("no")
    assert make_tables.zoo_target({"model": "capsnet", "test_accuracy": 0.990,
                                   "train_minutes": 500}) == "yes (>= 99.0%)"
    assert make_tables.zoo_target({"model": "capsnet", "test_accuracy": 0.9899,
                                   "train_minutes": 1}) == "no (>= 99.0%)"
    lines = make_tables.zoo_table().splitlines()
    assert lines[0].startswith("| model | parameters | test accuracy | goal met |")
    n_rows = sum(len(json.loads(p.read_text())["rows"])
                 for p in (ROOT / "benchmarks" / "results").glob("zoo_*.json"))
    train_runs = make_tables.train_runs_as_zoo_rows()  # full-MNIST `torchcaps train` runs
    assert "capsnet" in {r["model"] for r, _ in train_runs}
    assert all(z["dataset"] == "mnist" for _, z in train_runs)
    assert len(lines) == 2 + n_rows + len(train_runs)
    capsnet = [line for line in lines[2:] if line.startswith("| capsnet |")]
    assert len(capsnet) == sum(r["model"] == "capsnet" for r, _ in train_runs)
    assert all("99.75%" in line for line in capsnet)
    models = [line.split("|")[1].strip() for line in lines[2:]]
    assert models == sorted(models)  # grouped by model
    # older rows without a paper figure show the one their model's longest run recorded
    eff = [line.split("|")[5].strip() for line in lines[2:] if line.startswith("| efficient_capsnet")]
    assert len(eff) >= 2 and all(e.startswith("99.74% mean") for e in eff)


def test_zoo_model_kwargs_reach_training_and_throughput(monkeypatch, tmp_path):
    zoo = _load("zoo")
    seen = {"train": [], "speed": []}

    def fake_train(cfg, resume=False):
        seen["train"].append(cfg.model_kwargs)
        return {"test_accuracy": 0.5, "best": {"epoch": 1}, "steps": 1, "train_seconds": 1.0}

    def fake_speed(name, mode, **kwargs):
        seen["speed"].append(kwargs["model_kwargs"])
        return {"images_per_s": 1.0}

    monkeypatch.setattr(zoo, "train", fake_train)
    monkeypatch.setattr(zoo, "measure_throughput", fake_speed)
    monkeypatch.setattr(sys, "argv", ["zoo.py", "--models", "em_capsnet", "--dataset",
                                      "mnist-mini", "--out", str(tmp_path / "runs"),
                                      "--json", str(tmp_path / "zoo.json")])
    zoo.main()
    want = get_model_cfg("em_capsnet").recipe_kwargs()["model_kwargs"]
    assert want == {"iterations": 2}
    assert seen == {"train": [want], "speed": [want, want]}  # train and infer throughput
    row = json.loads((tmp_path / "zoo.json").read_text())["rows"][0]
    assert row["recipe"]["model_kwargs"] == want and row["parameters"] == 318_964


def test_zoo_recipe_override_merges_records_and_rejects_bad_input(monkeypatch, tmp_path, capsys):
    zoo = _load("zoo")
    override = '{"lr": 0.002, "lr_milestones": [30, 40]}'
    seen = []

    def fake_train(cfg, resume=False):
        seen.append((cfg.lr, cfg.lr_milestones, cfg.batch_size))
        return {"test_accuracy": 0.5, "best": {"epoch": 1}, "steps": 1, "train_seconds": 1.0}

    monkeypatch.setattr(zoo, "train", fake_train)
    monkeypatch.setattr(zoo, "measure_throughput", lambda *a, **k: {"images_per_s": 1.0})
    argv = ["zoo.py", "--models", "ida_capsnet", "--dataset", "mnist-mini",
            "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "zoo.json")]
    monkeypatch.setattr(sys, "argv", [*argv, "--recipe", override])
    zoo.main()
    batch = get_model_cfg("ida_capsnet").recipe["batch_size"]  # the model's own recipe is kept ...
    assert seen == [(0.002, (30, 40), batch)]  # ... and the override wins where it speaks
    report = json.loads((tmp_path / "zoo.json").read_text())
    assert report["rows"][0]["recipe"] == {**get_model_cfg("ida_capsnet").recipe, "lr": 0.002,
                                           "lr_milestones": [30, 40]}
    assert f"--recipe '{override}'" in report["command"]  # quoted: the command replays as is
    for bad, message in (('{"lr": ', "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                         ('{"lr_milestone": [3]}', "lr_milestone"),
                         ('{"epochs": 3}', "epochs")):
        monkeypatch.setattr(sys, "argv", [*argv, "--recipe", bad])
        try:
            zoo.main()
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"--recipe {bad!r} was accepted")
        assert message in capsys.readouterr().err


def test_zoo_note_and_device_are_recorded_and_tabled(monkeypatch, tmp_path):
    zoo, make_tables = _load("zoo"), _load("make_tables")
    devices = []

    def fake_speed(name, mode, **kwargs):
        devices.append(kwargs["device"])
        return {"images_per_s": 1.0}

    note = "epochs 1-9 on a GPU"
    _, report = _run_zoo(zoo, monkeypatch, tmp_path, "--note", note, speed=fake_speed)
    assert report["note"] == note
    # throughput is measured where the model trained (TrainConfig's device, "auto" here)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices == [want] * 4  # train and infer for each of the two models
    assert [r["device"] for r in report["rows"]] == [want, want]
    results = tmp_path / "results"
    results.mkdir()
    (results / "zoo_x.json").write_text(json.dumps(report))
    monkeypatch.setattr(make_tables, "RESULTS", results)
    lines = make_tables.zoo_table().splitlines()[2:]
    assert len(lines) == 2 and all(line.endswith(f"; {note} |") for line in lines)
    _, report = _run_zoo(zoo, monkeypatch, tmp_path)
    assert "note" not in report
