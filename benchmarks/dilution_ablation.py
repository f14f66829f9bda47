"""Restraining primary capsules: does it reduce dilution, and does that help accuracy?

For each restraint of :class:`torchcaps.layers.PrimaryCaps` (none, ``power``, ``topk``,
``gate``; this project's interpretation of Yang & Wang 2019, arXiv 1903.10588) and each
seed, with the same budget and recipe:

1. ``train(TrainConfig(model="capsnet", dataset="mnist-mini", ...))``: MNIST test accuracy
   of the validation-selected checkpoint, and the dilution measures of
   :mod:`torchcaps.evaluation.dilution` on the first ``--n`` test digits (28x28).
2. ``run_affnist_suite("capsnet", data="mnist-mini", ...)``: the robustness suite (train on
   digits shifted on a 40x40 canvas, test on translated and on affine-warped digits), and the
   dilution measures of its model on ``--n`` test digits placed at random on 40x40
   (``torchcaps.data.make_translated_mnist``, seed 0): there, unlike at 28x28, many primary
   positions look at empty background.

The capsnet is CPU-sized (``--base-kwargs``: 64 conv channels, 8 primary types) and every
run uses one thread. Results go to ``benchmarks/results/dilution_ablation.json`` (rows, the
command, the machine, per-variant means); ``--write-doc`` turns that JSON into the table in
``docs/results-dilution.md`` (between marker comments, the prose around it is kept).

    python benchmarks/dilution_ablation.py                       # everything (resumable)
    python benchmarks/dilution_ablation.py --variants none power --seeds 0
    python benchmarks/dilution_ablation.py --write-doc           # JSON -> markdown table

Rows already in the JSON with the same settings are skipped, so an interrupted run is
continued by running the same command again.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from torchcaps.bench import machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_JSON = RESULTS / "dilution_ablation.json"
DEFAULT_DOC = HERE.parent / "docs" / "results-dilution.md"
BEGIN, END = "<!-- dilution-ablation:begin -->", "<!-- dilution-ablation:end -->"

#: The restraints compared, as capsnet keyword arguments.
VARIANTS = {
    "none": {},
    "power": {"primary_restraint": "power", "primary_restraint_kwargs": {"p": 2.0}},
    "topk": {"primary_restraint": "topk", "primary_restraint_kwargs": {"k": 2, "group": "position"}},
    "gate": {"primary_restraint": "gate",
             "primary_restraint_kwargs": {"threshold": 0.25, "temperature": 0.1}},
}
BASE_KWARGS = {"conv_channels": 64, "primary_types": 8}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mnist-steps", type=int, default=200, help="training steps at 28x28")
    p.add_argument("--affnist-steps", type=int, default=100, help="training steps at 40x40")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--affine-size", type=int, default=1000, help="affine-test digits")
    p.add_argument("--n", type=int, default=500, help="test digits for the dilution measures")
    p.add_argument("--threshold", type=float, default=0.1, help="'short' primary capsule length")
    p.add_argument("--base-kwargs", type=json.loads, default=BASE_KWARGS,
                   help="capsnet arguments shared by every variant (JSON)")
    p.add_argument("--out-dir", default="runs/dilution_ablation", help="run directories")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip benchmarks/results/dilution_translated_<variant>.png (first seed)")
    p.add_argument("--write-doc", nargs="?", const=DEFAULT_DOC, default=None, type=Path,
                   metavar="MD", help="only write the markdown table from --json into MD")
    return p


def _settings(a: argparse.Namespace) -> dict:
    return {"mnist_steps": a.mnist_steps, "affnist_steps": a.affnist_steps,
            "batch_size": a.batch_size, "affine_size": a.affine_size, "n": a.n,
            "threshold": a.threshold, "base_kwargs": a.base_kwargs, "dataset": "mnist-mini",
            "threads": 1}


def _translated_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from torchcaps.data import load_dataset, make_translated_mnist

    test = load_dataset("mnist-mini").test
    placed, labels = make_translated_mnist(test.images[:n, 0], test.labels[:n], seed=seed, canvas=40)
    return placed[:, None].float().div_(255.0), labels  # (n, 1, 40, 40)


def run_row(variant: str, seed: int, a: argparse.Namespace) -> dict:
    """Train and measure one (variant, seed); returns the JSON row."""
    from torchcaps.data import load_dataset
    from torchcaps.evaluation import run_affnist_suite
    from torchcaps.evaluation.dilution import analyze_dilution, dilution_figure
    from torchcaps.train import TrainConfig, build_model_from_checkpoint, train

    kwargs = {**a.base_kwargs, **VARIANTS[variant]}
    run = Path(a.out_dir) / f"{variant}-seed{seed}"
    if run.exists():  # a row that did not finish: start it again from scratch
        shutil.rmtree(run)
    t0 = time.perf_counter()
    # budgets are set by max_steps; the epoch count only has to be large enough
    epochs = math.ceil(a.mnist_steps * a.batch_size / 7000) + 1
    s = train(TrainConfig(model="capsnet", model_kwargs=kwargs, dataset="mnist-mini",
                          epochs=epochs, max_steps=a.mnist_steps, batch_size=a.batch_size,
                          seed=seed, out=str(run / "mnist"), threads=1, progress=False))
    t_mnist = time.perf_counter() - t0
    model, _ = build_model_from_checkpoint(s["checkpoint"])
    x, y = load_dataset("mnist-mini").test.batch(slice(0, a.n))
    d28 = analyze_dilution(model, x, y, threshold=a.threshold).summary()

    t1 = time.perf_counter()
    rep = run_affnist_suite("capsnet", data="mnist-mini", target=1.0,
                            max_epochs=math.ceil(a.affnist_steps * a.batch_size / 7000) + 1,
                            max_steps=a.affnist_steps, batch_size=a.batch_size, seed=seed,
                            out_dir=run / "affnist", model_kwargs=kwargs, threads=1,
                            affine_size=a.affine_size)
    t_aff = time.perf_counter() - t1
    model40, _ = build_model_from_checkpoint(rep["checkpoint"])
    x40, y40 = _translated_digits(a.n)
    r40 = analyze_dilution(model40, x40, y40, threshold=a.threshold)
    d40 = r40.summary()
    figure = None
    if a.figures and seed == a.seeds[0]:
        # the digit (of the first 50) with the most empty positions, so the map shows some
        index = int(r40.background[:50].flatten(1).sum(1).argmax())
        figure = dilution_figure(r40, x40, RESULTS / f"dilution_translated_{variant}.png", index)
        figure = str(figure.relative_to(HERE.parent))
    return {"variant": variant, "seed": seed, "model_kwargs": kwargs,
            "mnist_test_accuracy": s["test_accuracy"], "mnist_steps": s["steps"],
            "translated_test_accuracy": rep["translated_test_accuracy"],
            "affine_accuracy": rep["affine_accuracy"], "affnist_steps": rep["steps"],
            "dilution_mnist28": d28, "dilution_translated40": d40,
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "minutes_mnist": round(t_mnist / 60, 2), "minutes_affnist": round(t_aff / 60, 2),
            "figure": figure}


# ----------------------------------------------------------------------- summary


def _metrics(row: dict) -> dict[str, float]:
    """The numbers of one row that the table compares."""
    d40, d28 = row["dilution_translated40"], row["dilution_mnist28"]
    bg = d40["background"]
    return {
        "mnist_test_accuracy": row["mnist_test_accuracy"],
        "translated_test_accuracy": row["translated_test_accuracy"],
        "affine_accuracy": row["affine_accuracy"],
        "bg_fraction40": bg["fraction"],
        "bg_share40": bg["share_predicted"],
        "bg_share_over_fraction40": bg["share_predicted"] / bg["fraction"] if bg["fraction"] else
        float("nan"),
        "bg_rel_change40": bg["relative_length_change_predicted"],
        "bg_flip40": bg["prediction_changed"],
        "short_share40": d40["short"]["share_predicted"],
        "mean_length_bg40": d40["mean_primary_length_background"],
        "mean_length_fg40": d40["mean_primary_length_foreground"],
        "short_fraction28": d28["short"]["fraction"],
        "short_share28": d28["short"]["share_predicted"],
        "mean_length28": d28["mean_primary_length"],
        "minutes": row["minutes"],
    }


def summarize(rows: list[dict]) -> dict:
    """Per variant: mean and (population) standard deviation over seeds of every metric."""
    out: dict = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        ms = [_metrics(r) for r in rows if r["variant"] == v]
        out[v] = {"seeds": [r["seed"] for r in rows if r["variant"] == v],
                  "minutes_total": round(sum(m["minutes"] for m in ms), 2)}
        for k in ms[0]:
            vals = [m[k] for m in ms if m[k] is not None and not math.isnan(m[k])]
            out[v][k] = {"mean": statistics.fmean(vals) if vals else None,
                         "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
    return out


def _pm(cell: dict, pct: bool = False, digits: int = 3) -> str:
    if cell["mean"] is None:
        return "n/a"
    if pct:
        return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def format_table(summary: dict) -> str:
    """Markdown table: one row per variant, mean ± std over seeds."""
    head = ("| restraint | seeds | MNIST test % | translated % | affine % | "
            "bg share / bg fraction (40x40) | bg removed: rel. length change (40x40) | "
            "short share (40x40) | mean length bg / fg (40x40) | mean length (28x28) | minutes (all seeds) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, s in summary.items():
        lines.append(
            f"| {v} | {len(s['seeds'])} | {_pm(s['mnist_test_accuracy'], True)} | "
            f"{_pm(s['translated_test_accuracy'], True)} | {_pm(s['affine_accuracy'], True)} | "
            f"{_pm(s['bg_share40'])} / {_pm(s['bg_fraction40'])} | "
            f"{_pm(s['bg_rel_change40'])} | {_pm(s['short_share40'])} | "
            f"{_pm(s['mean_length_bg40'], digits=2)} / {_pm(s['mean_length_fg40'], digits=2)} | "
            f"{_pm(s['mean_length28'], digits=2)} | {s['minutes_total']:.1f} |")
    return "\n".join(lines)


def write_doc(data: dict, path: Path) -> Path:
    """Put the table, command, machine and settings between the markers of ``path``."""
    m = data["machine"]
    st = data["settings"]
    block = "\n".join([
        BEGIN,
        "",
        format_table(data["summary"]),
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, one torch thread per run, torch "
        f"{m.get('torch_version')}, Python {m.get('python')}. Minutes: wall time of all seeds "
        "of a row (training, evaluation and the dilution measures).",
        "",
        f"Settings: capsnet {json.dumps(st['base_kwargs'])}, batch {st['batch_size']}, "
        f"{st['mnist_steps']} steps at 28x28 and {st['affnist_steps']} steps at 40x40 on "
        f"{st['dataset']}, affine test on the first {st['affine_size']} test digits, dilution "
        f"measures on the first {st['n']} test digits, short = |u| < {st['threshold']}.",
        "",
        END,
    ])
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.write_doc is not None:
        data = json.loads(a.json.read_text())
        print(f"wrote {write_doc(data, a.write_doc)}")
        return 0
    torch.set_num_threads(1)
    settings = _settings(a)
    data = json.loads(a.json.read_text()) if a.json.exists() else {}
    if data.get("settings") != settings:
        data = {"settings": settings, "rows": []}
    data["benchmark"] = "dilution_ablation"
    data["command"] = "python benchmarks/dilution_ablation.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    data["command"] = data["command"].rstrip()
    data["machine"] = machine_info()
    done = {(r["variant"], r["seed"]) for r in data["rows"]}
    for v in a.variants:
        for seed in a.seeds:
            if (v, seed) in done:
                print(f"{v} seed {seed}: already in {a.json}, skipped", flush=True)
                continue
            row = run_row(v, seed, a)
            data["rows"].append(row)
            data["summary"] = summarize(data["rows"])
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(data, indent=2) + "\n")
            print(f"{v} seed {seed}: MNIST {row['mnist_test_accuracy']:.4f} translated "
                  f"{row['translated_test_accuracy']:.4f} affine {row['affine_accuracy']:.4f} "
                  f"bg share {row['dilution_translated40']['background']['share_predicted']:.4f}"
                  f" ({row['minutes']:.1f} min)", flush=True)
    data["summary"] = summarize(data["rows"])
    a.json.write_text(json.dumps(data, indent=2) + "\n")
    print(format_table(data["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
