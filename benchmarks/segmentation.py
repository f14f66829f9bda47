"""Segmentation results on the MNI152 tissue benchmark: capsules against UNets, label efficiency.

    python benchmarks/segmentation.py run --runs runs/segbench            # every experiment
    python benchmarks/segmentation.py run --only 2d --seeds 0             # a part of it
    python benchmarks/segmentation.py memory                               # peak memory per patch
    python benchmarks/segmentation.py table --markdown docs/results-segmentation.md

Experiments (``EXPERIMENTS``; every run is ``torchcaps segment train`` / ``pretrain`` with the
settings below, on ``--dataset mni152`` at 2 mm, the default region split):

* ``2d``: SegCaps against a 2D UNet on axial slices (64x64 patches), 3 seeds.
* ``3d``: 3D-UCaps against a 3D UNet of comparable size (16^3 patches), 3 seeds.
* ``labels``: 3D-UCaps trained on 5%, 10%, 25% and 100% of the training patch pool, from
  scratch and from the encoder of a self-supervised pretraining run (one per seed), 3 seeds.

Each run keeps its own directory under ``--runs`` with the engine's ``summary.json``; a run
whose summary exists is not repeated, so the script can be stopped and started again (and a
run interrupted mid-way is resumed from its last checkpoint). ``table`` collects every
summary into ``benchmarks/results/segmentation.json`` and the markdown tables (mean and
standard deviation over seeds; minutes are wall-clock minutes of training plus evaluation).

``memory`` measures the peak resident memory of one training step (forward, loss, backward,
Adam) of each 3D model at two patch sizes (32^3 and 48^3, batch 1) in fresh processes, fits
``peak(v) = base + per_voxel * v`` and reports the largest cubic patch (a multiple of 8) that
trains within 16 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchcaps.bench import machine_info

RESULTS = Path(__file__).parent / "results" / "segmentation.json"
SEEDS = (0, 1, 2)
FRACTIONS = (0.05, 0.1, 0.25, 1.0)

#: shared settings of every run: data, budget, inference
COMMON = ["--dataset", "mni152", "--spacing", "2", "--pool", "512", "--no-progress",
          "--threads", "2"]
#: per model: patch, batch, budget and optimiser (the same budget within each comparison)
RECIPES = {
    "segcaps": ["--patch", "64", "64", "--batch-size", "8", "--epochs", "3",
                "--samples-per-epoch", "128", "--lr", "1e-3"],
    "unet2d": ["--patch", "64", "64", "--batch-size", "8", "--epochs", "3",
               "--samples-per-epoch", "128", "--lr", "1e-3"],
    "ucaps3d": ["--patch", "16", "16", "16", "--batch-size", "4", "--epochs", "2",
                "--samples-per-epoch", "128", "--lr", "1e-3", "--overlap", "0.25",
                "--sw-batch-size", "8"],
    "unet3d": ["--patch", "16", "16", "16", "--batch-size", "4", "--epochs", "2",
               "--samples-per-epoch", "128", "--lr", "1e-3", "--overlap", "0.25",
               "--sw-batch-size", "8", "--model-kwargs", '{"channels": [24, 48, 96, 192]}'],
}
PRETEXT = ["--patch", "16", "16", "16", "--batch-size", "4", "--epochs", "2",
           "--samples-per-epoch", "128", "--lr", "1e-3", "--sw-batch-size", "8"]


def _runs(only: set[str], seeds) -> list[dict]:
    """Every run of the selected experiments, in an order that satisfies dependencies."""
    runs = []
    if "2d" in only:
        runs += [{"name": f"2d/{m}-s{s}", "model": m, "seed": s, "experiment": "2d"}
                 for s in seeds for m in ("segcaps", "unet2d")]
    if "3d" in only:
        runs += [{"name": f"3d/{m}-s{s}", "model": m, "seed": s, "experiment": "3d"}
                 for s in seeds for m in ("ucaps3d", "unet3d")]
    if "labels" in only:
        for s in seeds:
            runs.append({"name": f"labels/pretrain-s{s}", "model": "ucaps3d", "seed": s,
                         "experiment": "pretrain"})
            for f in FRACTIONS:
                for pre in (False, True):
                    if f == 1.0 and not pre:
                        continue  # the 3d experiment's 3D-UCaps run is this run
                    runs.append({"name": f"labels/f{f:g}-{'pre' if pre else 'scratch'}-s{s}",
                                 "model": "ucaps3d", "seed": s, "experiment": "labels",
                                 "fraction": f, "pretrained": pre})
    return runs


def _command(run: dict, root: Path) -> list[str]:
    out = root / run["name"]
    action = "pretrain" if run["experiment"] == "pretrain" else "train"
    cmd = [sys.executable, "-m", "torchcaps", "segment", action, "--model", run["model"],
           "--seed", str(run["seed"]), "--out", str(out), *COMMON]
    cmd += PRETEXT if action == "pretrain" else RECIPES[run["model"]]
    if run.get("fraction") is not None:
        cmd += ["--fraction", f"{run['fraction']:g}"]
    if run.get("pretrained"):
        cmd += ["--pretrained", str(root / f"labels/pretrain-s{run['seed']}" / "best")]
    return cmd


def run_all(root: Path, only: set[str], seeds) -> None:
    for run in _runs(only, seeds):
        out = root / run["name"]
        if (out / "summary.json").is_file():
            continue
        cmd = _command(run, root)
        if (out / "last.json").is_file():
            cmd.append("--resume")
        print("$", " ".join(_shown(cmd)), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        summary["wall_minutes"] = round(wall / 60 + summary.get("wall_minutes", 0.0), 2)
        summary["command"] = " ".join(_shown(cmd)).replace(str(root), "RUNS")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _shown(cmd: list[str]) -> list[str]:
    shown = ["torchcaps" if c == sys.executable else c for c in cmd]
    if shown[1:3] == ["-m", "torchcaps"]:
        shown = shown[:1] + shown[3:]
    return [f"'{c}'" if "{" in c else c for c in shown]


# ---------------------------------------------------------------- memory
def _peak_mb(model: str, size: int, kwargs: dict) -> float:
    code = (
        "import json, resource, torch; import torchcaps.models as M; "
        f"m = M.create_model({model!r}, in_channels=1, num_classes=3, **{kwargs!r}); "
        "opt = torch.optim.Adam(m.parameters()); "
        f"x = torch.rand(1, 1, {size}, {size}, {size}); "
        f"y = torch.randint(0, 3, (1, {size}, {size}, {size})); "
        "out = m(x, y); loss, _ = m.loss(out, x, y); loss.backward(); opt.step(); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory(sizes=(32, 48)) -> list[dict]:
    rows = []
    for model, kwargs in (("ucaps3d", {}), ("unet3d", {"channels": [24, 48, 96, 192]})):
        a, b = sizes
        ma, mb = _peak_mb(model, a, kwargs), _peak_mb(model, b, kwargs)
        per_voxel = (mb - ma) / (b ** 3 - a ** 3)
        base = ma - per_voxel * a ** 3
        side = int(((16 * 1024 - base) / per_voxel) ** (1 / 3)) // 8 * 8
        rows.append({"model": model, "model_kwargs": kwargs, "peak_mb": {f"{a}^3": ma, f"{b}^3": mb},
                     "per_patch_mb": {f"{a}^3": round(ma - base, 1), f"{b}^3": round(mb - base, 1)},
                     "base_mb": round(base, 1), "mb_per_1000_voxels": round(1000 * per_voxel, 3),
                     "largest_cubic_patch_16gb": side})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- tables
def _collect(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.glob("*/*/summary.json")):
        s = json.loads(path.read_text())
        s["name"] = str(path.parent.relative_to(root))
        found.append(s)
    return found


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _group(runs: list[dict], prefix: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["name"].startswith(prefix):
            key = r["name"].split("/", 1)[1].rsplit("-s", 1)[0]
            groups.setdefault(key, []).append(r)
    return groups


def tables(root: Path, memory_rows: list[dict] | None) -> tuple[dict, str]:
    runs = _collect(root)
    lines = []

    def compare(prefix: str, models: tuple[str, ...], title: str) -> None:
        groups = _group(runs, prefix)
        lines.extend([f"### {title}", "",
                      "| model | parameters | seeds | Dice GM | Dice WM | mean Dice | HD95 GM (mm) "
                      "| HD95 WM (mm) | minutes per run |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"])
        for m in models:
            rs = groups.get(m, [])
            if not rs:
                continue
            t = [r["test"] for r in rs]
            hd = [[x.get(f"hd95_{c}") for x in t] for c in ("grey_matter", "white_matter")]
            lines.append(
                f"| {m} | {rs[0]['parameters']:,} | {len(rs)} | "
                f"{_mean_std([x.get('dice_grey_matter') for x in t])} | "
                f"{_mean_std([x.get('dice_white_matter') for x in t])} | "
                f"{_mean_std([x['mean_dice'] for x in t])} | "
                f"{_plain_mean(hd[0])} | {_plain_mean(hd[1])} | "
                f"{statistics.mean(r.get('wall_minutes', 0) for r in rs):.1f} |")
        lines.append("")
        for m in models:
            if groups.get(m):
                lines.append(f"- `{groups[m][0].get('command', '')}` (seeds {_seeds(groups[m])})")
        lines.append("")

    compare("2d/", ("segcaps", "unet2d"), "SegCaps against a 2D UNet (axial slices)")
    compare("3d/", ("ucaps3d", "unet3d"), "3D-UCaps against a 3D UNet")
    labels = _group(runs, "labels/")
    full = _group(runs, "3d/").get("ucaps3d", [])
    if labels or full:
        lines.extend(["### Label efficiency of 3D-UCaps, with and without self-supervised "
                      "pretraining", "",
                      "Mean foreground Dice (%) on the test region, mean ± std over seeds.", "",
                      "| training patches | from scratch | pretrained | difference |",
                      "|---|---:|---:|---:|"])
        for f in FRACTIONS:
            scratch = labels.get(f"f{f:g}-scratch") or (full if f == 1.0 else [])
            pre = labels.get(f"f{f:g}-pre", [])
            d_s = [r["test"]["mean_dice"] for r in scratch]
            d_p = [r["test"]["mean_dice"] for r in pre]
            diff = (f"{100 * (statistics.mean(d_p) - statistics.mean(d_s)):+.1f}"
                    if d_s and d_p else "-")
            lines.append(f"| {100 * f:g}% | {_mean_std(d_s)} | {_mean_std(d_p)} | {diff} |")
        lines.append("")
        example = labels.get("f0.1-pre") or []
        if example:
            lines.append(f"- e.g. `{example[0].get('command', '')}`")
        pre_runs = _group(runs, "labels/").get("pretrain", [])
        if pre_runs:
            lines.append(f"- pretraining: `{pre_runs[0].get('command', '')}`")
        lines.append("")
    if memory_rows:
        lines.extend(["### Memory per training patch (batch 1, forward + backward + Adam)", "",
                      "| model | per 32^3 patch (MB) | per 48^3 patch (MB) | MB per 1000 voxels "
                      "| largest cubic patch in 16 GB |", "|---|---:|---:|---:|---:|"])
        for r in memory_rows:
            p = r["per_patch_mb"]
            lines.append(f"| {r['model']} | {p['32^3']:.0f} | {p['48^3']:.0f} | "
                         f"{r['mb_per_1000_voxels']:.2f} | {r['largest_cubic_patch_16gb']}^3 |")
        lines.extend(["", "- `python benchmarks/segmentation.py memory`", ""])
    data = {"machine": machine_info(), "runs": runs, "memory": memory_rows}
    return data, "\n".join(lines)


def _plain_mean(values) -> str:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return f"{statistics.mean(ok):.1f}" if ok else "-"


def _seeds(rs: list[dict]) -> str:
    return ", ".join(r["name"].rsplit("-s", 1)[1] for r in rs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run")
    r.add_argument("--runs", default="runs/segbench")
    r.add_argument("--only", nargs="+", choices=["2d", "3d", "labels"],
                   default=["2d", "3d", "labels"])
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    sub.add_parser("memory")
    t = sub.add_parser("table")
    t.add_argument("--runs", default="runs/segbench")
    t.add_argument("--json", default=str(RESULTS))
    t.add_argument("--markdown", default=None, help="also write the tables here")
    a = p.parse_args()
    if a.action == "run":
        run_all(Path(a.runs), set(a.only), a.seeds)
    elif a.action == "memory":
        rows = memory()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        path = RESULTS.with_name("segmentation_memory.json")
        path.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    else:
        mem_path = RESULTS.with_name("segmentation_memory.json")
        mem = json.loads(mem_path.read_text())["rows"] if mem_path.is_file() else None
        data, md = tables(Path(a.runs), mem)
        text = json.dumps(data, indent=2) + "\n"  # run directories recorded relative to RUNS
        for root in (str(Path(a.runs).resolve()), str(Path(a.runs))):
            text = text.replace(root, "RUNS")
        Path(a.json).write_text(text)
        print(md)
        if a.markdown:
            _write_markdown(Path(a.markdown), md, data["machine"])


def _write_markdown(path: Path, tables_md: str, machine: dict) -> None:
    """Replace the generated part of the results page (between the markers) with the tables."""
    start, end = "<!-- tables:start -->", "<!-- tables:end -->"
    text = path.read_text() if path.is_file() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    where = (f"Machine: {machine.get('cpu', '?')} ({machine.get('cpu_capability', '?')}), "
             f"{machine.get('cores', '?')} cores, torch {machine.get('torch_version', '?')}, CPU only.")
    path.write_text(f"{head}{start}\n{where}\n\n{tables_md}\n{end}{tail}")


if __name__ == "__main__":
    main()
