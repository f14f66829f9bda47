"""benchmarks/depth_sweep.py: a tiny sweep writes usable JSON and a PNG, and redraws from JSON."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def depth_sweep():
    return _load("depth_sweep")


def _args(tmp_path, *extra):
    # skip 1: depth 1 has no shortcut that fits (residual = plain), depth 2 gets 0->1
    return ["--dataset", "mnist-mini", "--depths", "1", "2", "--max-steps", "2",
            "--batch-size", "8", "--skip", "1", "--val-size", "100", "--train-eval-size", "32",
            "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "sweep.json"),
            "--png", str(tmp_path / "sweep.png"), *extra]


@pytest.fixture(scope="module")
def swept(depth_sweep, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    depth_sweep.main(_args(tmp_path))
    return tmp_path


def test_sweep_writes_rows_and_png(swept):
    result = json.loads((swept / "sweep.json").read_text())
    assert result["benchmark"] == "depth_sweep" and result["machine"]["torch_version"]
    assert result["command"].startswith("python benchmarks/depth_sweep.py --dataset mnist-mini")
    rows = {(r["depth"], r["skips"]): r for r in result["rows"]}
    assert sorted(rows) == [(1, False), (1, True), (2, False), (2, True)]
    for r in rows.values():
        assert r["steps"] == 2 and r["diverged"] is None
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert math.isfinite(r["final_train_loss"]) and r["final_train_loss"] > 0
        assert r["train_minutes"] >= 0 and r["parameters"] > 0
    # shortcuts have no parameters: plain and residual of one depth are the same size
    assert rows[1, False]["parameters"] == rows[1, True]["parameters"]
    assert rows[2, False]["parameters"] == rows[2, True]["parameters"] > rows[1, False]["parameters"]
    # depth 1, skip 1: the stack's two layers differ in shape, so the residual net is the plain one
    assert rows[1, True]["same_as_plain"] and rows[1, True]["shortcuts"] == []
    assert rows[1, True]["test_accuracy"] == rows[1, False]["test_accuracy"]
    assert rows[2, True]["shortcuts"] == [[0, 1]] and not rows[2, True]["same_as_plain"]
    assert not rows[2, False]["skips"] and rows[2, False]["shortcuts"] == []
    assert [r["depth"] for r in result["rows"]] == [1, 1, 2, 2]
    png = (swept / "sweep.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_from_json_redraws_without_training(depth_sweep, swept, monkeypatch, capsys):
    monkeypatch.setattr(depth_sweep, "run_one", lambda *a, **k: pytest.fail("trained"))
    out = swept / "redrawn.png"
    result = depth_sweep.main(["--from-json", str(swept / "sweep.json"), "--png", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert len(result["rows"]) == 4
    printed = capsys.readouterr().out
    assert "test acc % plain" in printed and f"wrote {out}" in printed


def test_resume_reuses_rows_and_checks_settings(depth_sweep, swept, monkeypatch):
    monkeypatch.setattr(depth_sweep, "run_one", lambda *a, **k: pytest.fail("trained again"))
    before = json.loads((swept / "sweep.json").read_text())["rows"]
    after = depth_sweep.main(_args(swept, "--resume"))["rows"]
    assert after == before
    with pytest.raises(SystemExit, match="other settings"):
        depth_sweep.main(_args(swept, "--resume", "--lr", "0.01"))


def test_shortcuts_follow_the_stack_rule(depth_sweep):
    assert depth_sweep._shortcuts(1, 2, {}) == []  # skip longer than the stack allows
    assert depth_sweep._shortcuts(2, 2, {}) == []  # layer 2 is the class layer: shapes differ
    assert depth_sweep._shortcuts(3, 2, {}) == [[0, 2]]
    assert depth_sweep._shortcuts(4, 2, {}) == [[0, 2]]
    assert depth_sweep._shortcuts(5, 2, {}) == [[0, 2], [2, 4]]
    assert depth_sweep._shortcuts(15, 2, {}) == [[i, i + 2] for i in range(0, 14, 2)]


def test_bad_arguments_are_rejected(depth_sweep):
    with pytest.raises(SystemExit):
        depth_sweep.parse_args(["--depths", "3"])  # no budget
    with pytest.raises(SystemExit):
        depth_sweep.parse_args(["--max-steps", "5", "--skip", "0"])


def test_make_tables_depth_sweep(swept, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_tables
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(make_tables, "RESULTS", swept / "empty")
    assert len(make_tables.depth_sweep_table().splitlines()) == 2  # header only when absent
    monkeypatch.setattr(make_tables, "RESULTS", swept)
    (swept / "depth_sweep.json").write_text((swept / "sweep.json").read_text())
    lines = make_tables.depth_sweep_table().splitlines()
    assert lines[0].startswith("| depth | parameters | test accuracy plain / residual")
    assert lines[2].startswith("| 1 |") and "none fits (residual = plain)" in lines[2]
    assert lines[3].startswith("| 2 |") and "| 0->1 |" in lines[3]
    assert "mnist-mini" in lines[-1] and "depth_sweep.py" in lines[-1]
