"""benchmarks/bench_models.py sweeps registered models into one JSON; make_tables renders it.

Also torchcaps.bench's warnings that a run's figures are not representative.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchcaps import bench, precision

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _import(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "bench_models_fp32.json"
    args = ["--models", "cnn_baseline", "ida_capsnet", "--batch-size", "2", "--batch-cap",
            "ida_capsnet=1", "--warmup", "1", "--repeats", "2", "--steps", "1",
            "--json", str(out)]
    # run main() in a fresh interpreter and check it never imported torch itself (a large
    # parent process would raise every child's peak RSS)
    code = ("import runpy, sys; sys.argv = ['bench_models.py', *sys.argv[1:]]; "
            f"m = runpy.run_path({str(BENCH / 'bench_models.py')!r}); rc = m['main'](); "
            "assert 'torch' not in sys.modules, 'the sweeping process imported torch'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_sweep_writes_one_row_per_model(sweep):
    out, stdout = sweep
    r = json.loads(out.read_text())
    assert [row["model"] for row in r["rows"]] == ["cnn_baseline", "ida_capsnet"]
    for key in ("machine", "machine_limits", "command", "precision", "batch_caps"):
        assert key in r, key
    assert r["precision"] == "fp32" and r["machine"]["torch_version"]
    assert r["command"].startswith("python benchmarks/bench_models.py --models cnn_baseline")
    assert r["machine_limits"]["matmul_fp32_gflops"] > 0
    for row in r["rows"]:
        assert "error" not in row, row.get("error")
        for key in ("parameters", "train_images_per_s", "infer_images_per_s",
                    "train_peak_memory_mb", "infer_peak_memory_mb", "train_flops_per_image",
                    "train_fraction_of_matmul_rate", "infer_fraction_of_matmul_rate"):
            assert row[key] > 0, key
        assert len(row["train"]["runs_images_per_s"]) == 2
        assert row["train_flops_per_image"] > row["infer_flops_per_image"]
        assert row["train"]["batch_size"] == row["batch_size"]
    by = {row["model"]: row for row in r["rows"]}
    assert by["cnn_baseline"]["batch_size"] == 2 and by["cnn_baseline"]["note"] == ""
    assert by["ida_capsnet"]["batch_size"] == 1 and "batch 1, not 2" in by["ida_capsnet"]["note"]
    assert r["batch_caps"] == {"em_capsnet": 16, "ida_capsnet": 1}
    assert "ida_capsnet batch 1" in stdout


def test_make_tables_renders_the_sweep(sweep, tmp_path):
    make_tables = _import("make_tables")
    out, _ = sweep
    table = make_tables.models_table([out])
    lines = table.splitlines()
    assert lines[0].startswith("| model | precision | parameters")
    assert lines[2].startswith("| cnn_baseline | fp32 |")
    assert lines[3].startswith("| ida_capsnet | fp32 |") and "batch 1, not 2" in lines[3]
    assert any(line.startswith("* fp32: `python benchmarks/bench_models.py") for line in lines)

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- models:start -->\nold\n<!-- models:end -->\ntail\n")
    make_tables.write_models_table(readme, [out])
    text = readme.read_text()
    assert "old" not in text and table in text and text.endswith("<!-- models:end -->\ntail\n")

    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no models markers"):
        make_tables.write_models_table(readme, [out])


def test_make_tables_without_results_gives_header_only(tmp_path, monkeypatch):
    make_tables = _import("make_tables")
    monkeypatch.setattr(make_tables, "RESULTS", tmp_path)
    assert len(make_tables.models_table().splitlines()) == 2


def test_failed_model_row_is_rendered(tmp_path):
    make_tables = _import("make_tables")
    p = tmp_path / "bench_models_fp32.json"
    p.write_text(json.dumps({
        "precision": "fp32", "command": "python benchmarks/bench_models.py", "warmup_steps": 3,
        "repeats": 5, "steps_per_repeat": 2,
        "machine": {"cpu": "c", "cores": 2, "torch_version": "t"},
        "machine_limits": {"matmul_fp32_gflops": 100.0, "copy_bandwidth_gbs": 10.0},
        "rows": [{"model": "em_capsnet", "batch_size": 16, "note": "",
                  "error": "train: exit status -9: killed | oom"}]}))
    row = make_tables.models_table([p]).splitlines()[2]
    assert row.startswith("| em_capsnet | fp32 | - | 16 |") and "failed: train" in row
    assert row.count("|") == 11  # the error's own "|" does not add a column


def test_batch_cap_argument_is_checked():
    bench_models = _import("bench_models")
    assert bench_models._cap("em_capsnet=8") == ("em_capsnet", 8)
    for bad in ("em_capsnet", "em_capsnet=0", "=4", "em_capsnet=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=N"):
            bench_models._cap(bad)


# -- warnings: a shared machine, bf16 without fast kernels ------------------------------------

QUIET_LIMITS = {"matmul_fp32_gflops": 100.0, "matmul_fp32_gflops_best": 110.0}


@pytest.fixture
def machine(monkeypatch):
    def set_to(load, cores):
        monkeypatch.setattr(bench.os, "getloadavg", lambda: (load, 0.0, 0.0))
        monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: set(range(cores)))
    return set_to


def test_load_above_the_cores_is_reported(machine):
    machine(3.1, 2)
    assert bench.contention_warnings() == [
        "load average 3.1 on 2 cores: other work is sharing the cores; throughput figures "
        "will be low"]
    assert bench.contention_warnings(QUIET_LIMITS, recheck_gflops=95.0)[0].startswith(
        "load average 3.1 on 2 cores")


@pytest.mark.parametrize("load, cores", [(0.4, 2), (1.0, 2), (3.1, 16), (0.0, 1)])
def test_light_load_gives_no_warning(machine, load, cores):
    machine(load, cores)
    assert bench.contention_warnings(QUIET_LIMITS, recheck_gflops=90.0) == []


def test_an_explicit_load_reading_wins(machine):
    machine(0.0, 2)
    assert "load average 2.5" in bench.contention_warnings(load=2.5)[0]


def test_matmul_rate_spread_and_drift_are_reported(machine):
    machine(0.0, 2)
    spread = {"matmul_fp32_gflops": 40.0, "matmul_fp32_gflops_best": 100.0}
    (w,) = bench.contention_warnings(spread, recheck_gflops=45.0)
    assert w.startswith("the matmul rate varied between runs (median 40, best 100 GFLOP/s)")
    (w,) = bench.contention_warnings(QUIET_LIMITS, recheck_gflops=12.0)
    assert w.startswith("the matmul rate measured 100 GFLOP/s once and 12 GFLOP/s another time")
    assert len(bench.contention_warnings(QUIET_LIMITS, recheck_gflops=400.0)) == 1


def test_run_benchmark_returns_its_warnings(machine, monkeypatch):
    machine(3.1, 2)
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(precision, "bf16_slowdown", lambda *a, **k: 80.0)
    monkeypatch.setattr(bench, "measure_machine", lambda *a, **k: dict(QUIET_LIMITS))
    monkeypatch.setattr(bench, "measure_throughput", lambda name, mode, **k: {
        "images_per_s": 12.0, "peak_memory_mb": 1.0, "achieved_gflops": 1.0})
    r = bench.run_benchmark("cnn_baseline", precision="bf16")
    assert len(r["warnings"]) == 2
    assert r["warnings"][0].startswith("bf16 on this CPU (capability AVX2, no native bf16) runs "
                                       "about 80 times slower than fp32")
    assert r["warnings"][1].startswith("load average 3.1 on 2 cores")
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AMX_BF16")
    machine(0.1, 2)
    assert bench.run_benchmark("cnn_baseline", precision="bf16")["warnings"] == []
