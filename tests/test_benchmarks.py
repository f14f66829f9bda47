"""The benchmark scripts run and write the JSON the README tables are built from."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_script_writes_json(tmp_path):
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", "capsnet",
                    "--batch-size", "2", "--warmup", "1", "--repeats", "2", "--steps", "1",
                    "--json", str(out)], check=True, capture_output=True, text=True)
    r = json.loads(out.read_text())
    for key in ("train_images_per_s", "infer_images_per_s", "machine", "command"):
        assert key in r
    assert r["train"]["images_per_s"] > 0 and len(r["train"]["runs_images_per_s"]) == 2
    assert r["train"]["peak_memory_mb"] > 0 and r["machine"]["torch_version"]


def test_make_tables_builds_rows_from_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_tables
    finally:
        sys.path.pop(0)
    table = make_tables.accuracy_table()
    assert table.startswith("| result | test accuracy")
    n_results = sum(1 for p in (ROOT / "benchmarks" / "results").glob("*.json")
                    if "test_accuracy" in json.loads(p.read_text()))
    assert len(table.splitlines()) == 2 + n_results
