"""benchmarks/memory_table.py: the linear memory model and the generated table."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_table
    finally:
        sys.path.pop(0)
    return memory_table


def test_two_points_give_the_largest_batch(monkeypatch):
    mt = _module()
    peaks = {16: 500.0 + 16 * 10.0, 64: 500.0 + 64 * 10.0}  # base 500 MB, 10 MB per image
    monkeypatch.setattr(mt, "CASES", [("capsnet", None, (16, 64))])
    monkeypatch.setattr(mt, "_peak_mb", lambda model, shape, batch, device: peaks[batch])
    monkeypatch.setattr(sys, "argv", ["memory_table.py"])
    out = {}
    monkeypatch.setattr(mt.Path, "write_text", lambda self, text: out.setdefault(self.name, text))
    monkeypatch.setattr(sys, "argv", ["memory_table.py", "--markdown", "memory.md"])
    mt.main()
    # (8 * 1024 - 500) / 10 = 769.2 -> 769; (16 * 1024 - 500) / 10 = 1588.4 -> 1588
    assert "| capsnet | native | 500 | 10.00 | 769 | 1,588 |" in out["memory.md"]


def test_the_committed_table_is_the_generated_one():
    import json

    mt = _module()
    result = json.loads((ROOT / "benchmarks" / "results" / "memory_table.json").read_text())
    assert (ROOT / "docs" / "memory.md").read_text() == mt.markdown(result)
