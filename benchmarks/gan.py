"""Capsule GANs against DCGAN on MNIST: four generative pairs x three seeds, one budget.

    python benchmarks/gan.py run --runs runs/ganbench                  # every run (long)
    python benchmarks/gan.py run --runs runs/ganbench --seeds 0        # a part of it
    python benchmarks/gan.py table --runs runs/ganbench --markdown docs/results-gan.md

Every run is ``torchcaps gan train`` with the same recipe (``RECIPE``: full MNIST, 5 epochs
of 64 real and 64 generated images per step, Adam 2e-4 with betas (0.5, 0.999) for both
networks, checkpoint chosen on the validation Frechet distance of 1,000 samples) and the
model's default size; only ``--model`` and ``--seed`` differ. Scores are those of each
run's summary: 2,000 generated images against the first 2,000 test images in the feature
space of the cached MNIST feature classifier (trained once, on first use, by the first
run; its command is in every summary).

Each run keeps its own directory under ``--runs`` with the engine's ``summary.json``; a run
whose summary exists is not repeated, so the script can be stopped and started again (a run
interrupted mid-way is resumed from its last checkpoint). ``table`` collects the summaries
into ``--results`` (default ``benchmarks/results/gan.json``) and a markdown table: model,
parameters, FD mean ± std over seeds, precision, recall, confident share (means), minutes
per run (wall clock, training and scoring), and the command.

Cost: two-step runs on one thread of a busy 2-core machine trained 145 real images/s
(dcgan), 100 (capsule_generator_gan) and 65 (the two pairs with the capsule
discriminator), so a run of the recipe (275,000 real images) takes roughly 30 to 70 minutes
plus scoring, and the twelve about ten hours. These rates come from very short runs; the
minutes the table reports are measured.

``--dataset``, ``--epochs``, ``--max-steps`` and ``--extra`` change the recipe for a quick
check (then keep its results away from the real ones with ``--runs`` and ``--results``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gan.json"
MODELS = ("dcgan", "capsule_gan", "capsule_generator_gan", "capsule_both_gan")
SEEDS = (0, 1, 2)
#: the budget and optimisation every run shares
RECIPE = {"--dataset": "mnist", "--epochs": "5", "--batch-size": "64", "--lr": "2e-4",
          "--optimizer-kwargs": json.dumps({"betas": [0.5, 0.999]}), "--score-samples": "1000",
          "--test-samples": "2000", "--threads": "2"}


def _launcher() -> list[str]:
    """``python -m torchcaps``, or this script standing in for it while ``gan`` is not yet a
    command of the installed ``torchcaps``."""
    import torchcaps.cli as cli

    if "gan" in cli._COMMANDS:
        return [sys.executable, "-m", "torchcaps"]
    return [sys.executable, str(Path(__file__).resolve()), "cli"]


def _command(model: str, seed: int, out: Path, recipe: dict, extra: list[str]) -> list[str]:
    cmd = [*_launcher(), "gan", "train", "--model", model, "--seed", str(seed), "--out", str(out),
           "--no-progress"]
    for flag, value in recipe.items():
        if value is not None:
            cmd += [flag, value]
    return cmd + extra


def _shown(cmd: list[str], root: Path) -> str:
    """The command as a user types it: ``torchcaps gan train ...``, run directory as RUNS."""
    at = cmd.index("gan")
    words = ["torchcaps", *cmd[at:]]
    return " ".join(f"'{w}'" if "{" in w else w for w in words).replace(f"{root}/", "RUNS/")


def run_all(root: Path, models, seeds, recipe: dict, extra: list[str]) -> None:
    for seed in seeds:
        for model in models:
            out = root / f"{model}-s{seed}"
            if (out / "summary.json").is_file():
                continue
            cmd = _command(model, seed, out, recipe, extra)
            if (out / "last.json").is_file():
                cmd.append("--resume")
            print("$", _shown(cmd, root), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "summary.json").read_text())
            summary["wall_minutes"] = round(wall / 60 + summary.get("wall_minutes", 0.0), 2)
            summary["command"] = _shown([c for c in cmd if c != "--resume"], root)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------- tables
def _collect(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.glob("*-s*/summary.json")):
        s = json.loads(path.read_text())
        s["name"] = path.parent.name
        runs.append(s)
    return runs


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean_std(values, fmt: str = ".3f") -> str:
    v = _finite(values)
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(statistics.mean(v), fmt)} ± {format(statistics.stdev(v), fmt)}"


def _mean(values, fmt: str = ".3f") -> str:
    v = _finite(values)
    return format(statistics.mean(v), fmt) if v else "-"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per model: means (and the FD's standard deviation) over its seeds."""
    rows = []
    for model in MODELS:
        rs = [r for r in runs if r.get("model") == model]
        if not rs:
            continue
        t = [r["test"] for r in rs]
        fd = _finite(x["fd"] for x in t)
        rows.append({
            "model": model, "parameters": rs[0]["parameters"], "seeds": len(rs),
            "fd_mean": statistics.mean(fd) if fd else None,
            "fd_std": statistics.stdev(fd) if len(fd) > 1 else None,
            **{f"{k}_mean": statistics.mean(_finite(x[k] for x in t)) if _finite(x[k] for x in t)
               else None for k in ("precision", "recall", "confident")},
            "minutes_mean": statistics.mean(r.get("wall_minutes", math.nan) for r in rs),
            "command": re.sub(r"(--seed |--out \S+-s)\d+", r"\1S", rs[0].get("command", "")),
            "runs": [r["name"] for r in rs]})
    return rows


def markdown(rows: list[dict], runs: list[dict]) -> str:
    lines = ["| model | parameters (G + D) | seeds | FD (lower is better) | precision | recall "
             "| confident share | minutes per run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_model = {m: [r for r in runs if r.get("model") == m] for m in MODELS}
    for row in rows:
        p = row["parameters"]
        t = [r["test"] for r in by_model[row["model"]]]
        lines.append(
            f"| {row['model']} | {p['total']:,} ({p['generator']:,} + {p['discriminator']:,}) | "
            f"{row['seeds']} | {_mean_std([x['fd'] for x in t])} | "
            f"{_mean([x['precision'] for x in t])} | {_mean([x['recall'] for x in t])} | "
            f"{_mean([x['confident'] for x in t])} | {_mean([row['minutes_mean']], '.1f')} |")
    lines.append("")
    for row in rows:
        lines.append(f"- {row['model']}: `{row['command']}` (seeds: {', '.join(row['runs'])})")
    if runs:
        c = runs[0].get("classifier") or {}
        lines += ["", f"Feature classifier: `{c.get('command', '?')}` (test accuracy "
                      f"{100 * c.get('test_accuracy', math.nan):.2f}%)."]
    return "\n".join(lines) + "\n"


def tables(root: Path) -> tuple[dict, str]:
    from torchcaps.bench import machine_info

    runs = _collect(root)
    rows = summarise(runs)
    return {"machine": machine_info(), "recipe": RECIPE, "models": rows, "runs": runs}, \
        markdown(rows, runs)


# ---------------------------------------------------------------- entry point
def _cli(argv: list[str]) -> int:
    """``torchcaps`` with the ``gan`` command registered (see :func:`_launcher`)."""
    import torchcaps.cli as cli

    if "gan" not in cli._COMMANDS:
        cli._COMMANDS = (*cli._COMMANDS, "gan")
    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:
        return _cli(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="train every missing run")
    r.add_argument("--runs", type=Path, default=Path("runs/ganbench"), help="run directories")
    r.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--dataset", default=None, help="instead of the recipe's mnist")
    r.add_argument("--epochs", default=None, help="instead of the recipe's 5")
    r.add_argument("--max-steps", default=None, help="also stop every run after N steps")
    r.add_argument("--threads", default=None, help="instead of the recipe's 2")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `torchcaps gan train` flags, last on the line")
    t = sub.add_parser("table", help="collect the summaries into JSON and markdown")
    t.add_argument("--runs", type=Path, default=Path("runs/ganbench"), help="run directories")
    t.add_argument("--results", type=Path, default=RESULTS, help="the JSON written")
    t.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.action == "run":
        recipe = dict(RECIPE)
        for flag, value in (("--dataset", args.dataset), ("--epochs", args.epochs),
                            ("--max-steps", args.max_steps), ("--threads", args.threads)):
            if value is not None:
                recipe[flag] = str(value)
        run_all(args.runs, args.models, args.seeds, recipe, args.extra)
        return 0
    data, text = tables(args.runs)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(data, indent=2) + "\n")
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    print(f"wrote {args.results}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
