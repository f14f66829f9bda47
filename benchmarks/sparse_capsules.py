"""Sparse unsupervised capsules on the affNIST protocol, with and without sparsening.

    python benchmarks/sparse_capsules.py run --runs runs/sparsebench              # every run (long)
    python benchmarks/sparse_capsules.py run --runs runs/sparsebench --seeds 0    # a part of it
    python benchmarks/sparse_capsules.py table --runs runs/sparsebench \\
        --markdown docs/results-sparse-capsules.md

Rawlinson, Ahmed, Kowadlo 2018 (arXiv 1804.06094) report 90% on affNIST for codes of a
sparse unsupervised CapsNet classified by an SVM, against 79% for the supervised CapsNet of
Sabour et al. 2017. Here every run is ``torchcaps unsupervised train`` with the same recipe
(``RECIPE``: full MNIST minus 5,000 validation digits, moved at random on a 40x40 canvas;
the release's 30,000 steps of 128 with Adam at 1e-3 decayed by 0.96 every 2,000 steps; the
checkpoint chosen on the validation accuracy of a linear probe fitted on 1,000 training
digits; the summary's classifiers fitted on the codes of all 55,000 training digits,
centred as the release encodes them). Two variants x three seeds:

* ``sparse``: the rank mask and boosting (the paper's network);
* ``dense``: ``--no-sparsening``, every latent capsule decoded unmasked (the ablation).

Each variant's summary reports two classifiers of the codes: ``logistic`` (the release's
logistic regression, a linear probe) and ``svm`` (the release's RBF SVM, the paper's number),
each on the translated test digits and on the regenerated affine test set (the affNIST
suite's sets: same seeds, same warps; not the official affNIST files).

``table`` also reads the supervised rows (CapsNet and the CNN baseline, each classifying
directly) from the affNIST suite's reports where they exist: ``--suite-reports`` (globs of
``report.json`` files of ``torchcaps suite affnist`` runs) and the collected
``benchmarks/results/robustness.json``. Their budgets differ from this recipe: the table
lists each row's steps and command.

Each run keeps its own directory under ``--runs``; a run whose ``summary.json`` exists is
not repeated, and one interrupted mid-way is resumed from its last checkpoint, so the
script can be stopped and started again. ``table`` writes ``--results`` (default
``benchmarks/results/sparse_capsules.json``: machine, recipe, rows, runs) and a markdown
table (mean ± std over seeds, minutes per run, commands).

Cost: the network has 17.1M parameters and routes 4,608 primary capsules to 16 latent ones;
on one thread of a busy 2-core CPU a step of 8 images took about 2.5 s (forward and
backward), so a step of 128 is tens of seconds and the recipe (30,000 steps) is weeks per
run on such a CPU: run it on a GPU. ``--dataset``, ``--epochs``, ``--max-steps`` and
``--extra`` change the recipe for a quick check (keep its results away from the real ones
with ``--runs`` and ``--results``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sparse_capsules.json"
ROBUSTNESS = Path(__file__).parent / "results" / "robustness.json"
VARIANTS = {"sparse": [], "dense": ["--no-sparsening"]}
SEEDS = (0, 1, 2)
CLASSIFIERS = ("logistic", "svm")
#: the budget, data and probes every run shares (the release's schedule: 30,000 steps)
RECIPE = {"--dataset": "mnist", "--epochs": "70", "--max-steps": "30000", "--batch-size": "128",
          "--lr": "1e-3", "--lr-decay": "0.96", "--lr-decay-steps": "2000",
          "--probe": "logistic", "--probe-train": "1000", "--summary-train": "55000",
          "--probe-placement": "centre", "--threads": None, "--device": "auto"}
#: what the paper reports on affNIST (accuracy)
PAPER = {"sparse_svm": 0.90, "supervised_capsnet": 0.79}


def _launcher() -> list[str]:
    """``python -m torchcaps``, or this script standing in for it while ``unsupervised`` is
    not yet a command of the installed ``torchcaps``."""
    import torchcaps.cli as cli

    if "unsupervised" in cli._COMMANDS:
        return [sys.executable, "-m", "torchcaps"]
    return [sys.executable, str(Path(__file__).resolve()), "cli"]


def _command(variant: str, seed: int, out: Path, recipe: dict, extra: list[str]) -> list[str]:
    cmd = [*_launcher(), "unsupervised", "train", *VARIANTS[variant], "--seed", str(seed),
           "--out", str(out), "--no-progress"]
    overridden = {w for w in extra if w.startswith("--")}  # --extra wins over the recipe
    for flag, value in recipe.items():
        if value is not None and flag not in overridden:
            cmd += [flag, value]
    return cmd + extra


def _shown(cmd: list[str], root: Path) -> str:
    """The command as a user types it: ``torchcaps unsupervised train ...``, runs as RUNS."""
    words = ["torchcaps", *cmd[cmd.index("unsupervised"):]]
    return " ".join(f"'{w}'" if "{" in w else w for w in words).replace(f"{root}/", "RUNS/")


def run_all(root: Path, variants, seeds, recipe: dict, extra: list[str]) -> None:
    for seed in seeds:
        for variant in variants:
            out = root / f"{variant}-s{seed}"
            if (out / "summary.json").is_file():
                continue
            cmd = _command(variant, seed, out, recipe, extra)
            if (out / "last.json").is_file():
                cmd.append("--resume")
            print("$", _shown(cmd, root), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "summary.json").read_text())
            summary["wall_minutes"] = round(wall / 60 + summary.get("wall_minutes", 0.0), 2)
            summary["command"] = _shown([c for c in cmd if c != "--resume"], root)
            summary["variant"] = variant
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------- tables
def _collect(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.glob("*-s*/summary.json")):
        s = json.loads(path.read_text())
        s["name"] = path.parent.name
        s.setdefault("variant", "sparse" if s.get("sparsening", True) else "dense")
        runs.append(s)
    return runs


def _supervised(patterns: list[str]) -> list[dict]:
    """affNIST suite rows (model, accuracies, budget, command) from reports and the
    collected robustness results, without duplicates."""
    rows, seen = [], set()
    found = [json.loads(Path(p).read_text()) for pat in patterns for p in sorted(glob.glob(pat))]
    if ROBUSTNESS.is_file():
        found += json.loads(ROBUSTNESS.read_text()).get("rows", [])
    for r in found:
        if r.get("suite") != "affnist" or r.get("affine_accuracy") is None:
            continue
        key = (r.get("model"), r.get("command"))
        if key in seen:
            continue
        seen.add(key)
        rows.append({k: r.get(k) for k in ("model", "parameters", "dataset", "epochs", "steps",
                                           "translated_test_accuracy", "affine_accuracy",
                                           "target_reached", "wall_minutes", "command")})
    return rows


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _pct(values) -> str:
    v = [100 * x for x in _finite(values)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (variant, classifier): accuracies over seeds."""
    rows = []
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        for kind in CLASSIFIERS:
            have = [r for r in rs if kind in r.get("probes", {})]
            if not have:
                continue
            acc = {k: [r["probes"][kind][k] for r in have] for k in ("translated", "affine")}
            rows.append({
                "variant": variant, "classifier": kind, "seeds": len(have),
                "parameters": have[0]["parameters"]["total"],
                "translated": acc["translated"], "affine": acc["affine"],
                "steps": [r["steps"] for r in have],
                "minutes_mean": statistics.mean(r.get("wall_minutes", math.nan) for r in have),
                "command": re.sub(r"(--seed |--out \S+-s)\d+", r"\1S", have[0].get("command", "")),
                "runs": [r["name"] for r in have]})
    return rows


def markdown(rows: list[dict], supervised: list[dict]) -> str:
    names = {"sparse": "sparse unsupervised capsules", "dense": "unsupervised, no sparsening"}
    lines = ["| network | labels in training | classifier | seeds | translated test % | "
             "affine test % | steps | minutes per run |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = sorted(set(r["steps"]))
        lines.append(f"| {names[r['variant']]} | none | {r['classifier']} on codes | {r['seeds']} | "
                     f"{_pct(r['translated'])} | {_pct(r['affine'])} | "
                     f"{', '.join(map(str, steps))} | {r['minutes_mean']:.1f} |")
    for s in supervised:
        reached = "" if s.get("target_reached") else " (target not reached)"
        minutes = s.get("wall_minutes")
        lines.append(f"| {s['model']} (affNIST suite){reached} | all | its own output | 1 | "
                     f"{_pct([s['translated_test_accuracy']])} | {_pct([s['affine_accuracy']])} | "
                     f"{s.get('steps', '-')} | {'-' if minutes is None else f'{minutes:.1f}'} |")
    lines += ["", f"Paper (official affNIST): sparse unsupervised capsules with an SVM "
                  f"{100 * PAPER['sparse_svm']:.0f}%, supervised CapsNet "
                  f"{100 * PAPER['supervised_capsnet']:.0f}%. Here the affine set is regenerated "
                  "from the MNIST test digits (torchcaps.data.make_affnist_test).", ""]
    for r in rows:
        if r["classifier"] == CLASSIFIERS[0]:
            lines.append(f"- {names[r['variant']]}: `{r['command']}` (runs: {', '.join(r['runs'])})")
    for s in supervised:
        lines.append(f"- {s['model']}: `{s.get('command')}`")
    return "\n".join(lines) + "\n"


def tables(root: Path, patterns: list[str], recipe: dict) -> tuple[dict, str]:
    from torchcaps.bench import machine_info

    runs = _collect(root)
    rows, supervised = summarise(runs), _supervised(patterns)
    data = {"machine": machine_info(), "recipe": recipe, "paper": PAPER, "rows": rows,
            "supervised": supervised, "runs": runs}
    return data, markdown(rows, supervised)


# ---------------------------------------------------------------- entry point
def _cli(argv: list[str]) -> int:
    """``torchcaps`` with the ``unsupervised`` command registered (see :func:`_launcher`)."""
    import torchcaps.cli as cli

    if "unsupervised" not in cli._COMMANDS:
        cli._COMMANDS = (*cli._COMMANDS, "unsupervised")
    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:
        return _cli(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="train every missing run")
    r.add_argument("--runs", type=Path, default=Path("runs/sparsebench"), help="run directories")
    r.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--dataset", default=None, help="instead of the recipe's mnist")
    r.add_argument("--epochs", default=None, help="instead of the recipe's 70")
    r.add_argument("--max-steps", default=None, help="instead of the recipe's 30000")
    r.add_argument("--threads", default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--device", default=None, help="instead of the recipe's auto")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `torchcaps unsupervised train` flags, last on the line")
    t = sub.add_parser("table", help="collect the summaries into JSON and markdown")
    t.add_argument("--runs", type=Path, default=Path("runs/sparsebench"), help="run directories")
    t.add_argument("--suite-reports", nargs="*", default=["runs/robust/affnist-*/report.json"],
                   metavar="GLOB", help="report.json files of `torchcaps suite affnist` runs")
    t.add_argument("--results", type=Path, default=RESULTS, help="the JSON written")
    t.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.action == "run":
        recipe = dict(RECIPE)
        for flag, value in (("--dataset", args.dataset), ("--epochs", args.epochs),
                            ("--max-steps", args.max_steps), ("--threads", args.threads),
                            ("--device", args.device)):
            if value is not None:
                recipe[flag] = str(value)
        run_all(args.runs, args.variants, args.seeds, recipe, args.extra)
        return 0
    data, text = tables(args.runs, args.suite_reports, RECIPE)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(data, indent=2) + "\n")
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    print(f"wrote {args.results}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
