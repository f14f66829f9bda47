"""Regenerate the result tables in README.md from benchmarks/results/*.json.

    python benchmarks/make_tables.py

Tables live between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _machine(m: dict) -> str:
    s = f"{m['cpu']}, {m['cores']} cores, torch {m['torch_version']}"
    return s + (f", {m['cuda_device']}" if "cuda_device" in m else "")


def accuracy_table() -> str:
    rows = ["| result | test accuracy | epochs | minutes (train / wall) | best epoch (val acc) "
            "| command | machine | note |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        if "test_accuracy" not in r:
            continue
        b = r["best"]
        wall = "-" if r.get("wall_minutes") is None else f"{r['wall_minutes']:.1f}"
        rows.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {r['epochs']} | "
                    f"{r['train_minutes']:.1f} / {wall} | "
                    f"{b['epoch']} ({100 * b['val_accuracy']:.2f}%) | `{r['command']}` | "
                    f"{_machine(r['machine'])} | {r.get('note', '')} |")
    return "\n".join(rows)


def throughput_table() -> str:
    rows = ["| model | batch | train images/s | infer images/s | peak memory train / infer (MB) "
            "| command | machine |", "|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("throughput_*.json")):
        r = json.loads(p.read_text())
        rows.append(f"| {r['model']} | {r['batch_size']} | {r['train_images_per_s']:.1f} | "
                    f"{r['infer_images_per_s']:.1f} | {r['train']['peak_memory_mb']:.0f} / "
                    f"{r['infer']['peak_memory_mb']:.0f} | `{r['command']}` | "
                    f"{_machine(r['machine'])} |")
    return "\n".join(rows)


def zoo_table() -> str:
    rows = ["| model | parameters | test accuracy | epochs | training minutes | train images/s "
            "| infer images/s | settings | command | machine |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("zoo_*.json")):
        z = json.loads(p.read_text())
        for r in z["rows"]:
            rows.append(f"| {r['model']} | {r['parameters']:,} | {100 * r['test_accuracy']:.2f}% | "
                        f"{r['epochs']} | {r['train_minutes']:.1f} | {r['train_images_per_s']:.0f} | "
                        f"{r['infer_images_per_s']:.0f} | {json.dumps(r['recipe']) or '{}'} | "
                        f"`{z['command']}` | {_machine(z['machine'])} |")
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    tables = (("accuracy", accuracy_table()), ("throughput", throughput_table()), ("zoo", zoo_table()))
    for name, table in tables:
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {name} markers")
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    readme.write_text(text)
    print("README.md tables updated")


if __name__ == "__main__":
    main()
