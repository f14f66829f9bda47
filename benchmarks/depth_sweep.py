"""Depth sweep of residual capsule stacks, with and without skips.

Gugglberger, Peer, Rodriguez-Sanchez 2021, "Training deep capsule networks with residual
connections" (arXiv 2104.07393). The claim tested: a plain deep stack of fully-connected
capsule layers degrades as it gets deeper, a residual one does not.

    python benchmarks/depth_sweep.py --depths 1 3 5 9 15 --dataset mnist --max-steps 3000 \
        --batch-size 128 --routing dynamic --json benchmarks/results/depth_sweep.json \
        --png benchmarks/results/depth_sweep.png
    python benchmarks/depth_sweep.py --from-json benchmarks/results/depth_sweep.json \
        --png benchmarks/results/depth_sweep.png          # only redraw the figure

Method.

* Model: the registered ``res_capsnet`` (conv, primary capsules, ``depth`` hidden capsule
  layers of 32 x 8D, class capsules 10 x 16D; see :mod:`torchcaps.layers.residual`).
  "plain" is ``skip=0``; "residual" is ``skip=--skip`` (2, the authors' default) with the
  authors' shortcut (``--shortcut output``: ``x_l = o_l + o_{l-s}`` at ``l % s == 0``).
  Shortcuts carry no parameters, so at each depth the two networks have the same parameters
  and, from the same seed, the same initial weights: skips are the only difference.
* When no shortcut fits the stack (with ``skip=2``: depth 1 and 2, because the layer two
  back has another shape, or the stack is too short), the residual network IS the plain
  network. It is not trained twice: its row copies the plain row and says so
  (``same_as_plain: true``, ``shortcuts: []``), and the figure draws it hollow.
* Budget: the same number of optimisation steps (``--max-steps``) and batch size, seed,
  learning rate (Adam 1e-4, the authors' rate, with the trainer's x0.96 / 2000-step decay),
  data order and augmentation for every run. The trainer validates at each epoch end and at
  the last step; ``--epochs`` defaults to just enough epochs for the step budget.
* Selection: the test accuracy is that of the checkpoint with the best validation accuracy
  (the trainer's selection; the test set is never used to choose).
* Training loss: ``final_train_loss`` is the model's own loss (margin loss) of the FINAL
  weights (after the last step, not the selected checkpoint), in eval mode and without
  augmentation, on a fixed subset of ``--train-eval-size`` training images (the same images
  for every run). This measures how well each depth can fit the training data, the quantity
  behind the degradation claim, without the noise of a running mean over changing weights.
  ``train_loss_last_epoch`` (the trainer's mean training-mode loss over the last, possibly
  partial, epoch with augmentation) is recorded too, and is used when
  ``--train-eval-size 0``.
* A run that stops on a NaN/Inf loss (the trainer's ``nonfinite="stop"``) is recorded with
  ``diverged`` set and no accuracies; the sweep goes on.
* The JSON is rewritten after every run, so a partial sweep is usable; ``--resume`` keeps
  the rows already in the JSON when its settings match (an interrupted run restarts from
  step 0). Results are single-seed.
* Rows: ``shortcuts`` lists the pairs ``[l - s, l]`` as built (stack layers counted from 0,
  the first hidden layer; layer ``depth`` is the class layer); ``seconds_per_step`` is the
  trainer's training time over steps (first step included, evaluation excluded).
* On a CPU shared with other jobs, ``--threads 1`` is much faster than oversubscribing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODEL = "res_capsnet"
#: Settings that must match for ``--resume`` to reuse rows.
_SETTING_KEYS = ("dataset", "max_steps", "epochs", "batch_size", "lr", "seed", "routing",
                 "routing_iterations", "skip", "shortcut", "model_kwargs", "train_eval_size",
                 "val_size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 3, 5, 9, 15],
                   help="hidden capsule layers per stack")
    p.add_argument("--dataset", default="mnist", help='"mnist" (full) or "mnist-mini"')
    p.add_argument("--max-steps", type=int, default=None, help="optimisation steps per run")
    p.add_argument("--epochs", type=int, default=None,
                   help="epoch cap (default: enough epochs for --max-steps)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam rate (Gugglberger et al.: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing", default="dynamic", help="routing of every capsule layer")
    p.add_argument("--routing-iterations", type=int, default=2)
    p.add_argument("--skip", type=int, default=2, help="skip distance of the residual runs")
    p.add_argument("--shortcut", default="output", choices=("output", "stream"))
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='extra res_capsnet arguments as JSON, e.g. \'{"conv_channels": 256}\'')
    p.add_argument("--train-eval-size", type=int, default=5000,
                   help="training images for the final training loss (0: last-epoch mean)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (dataset default)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/depth_sweep", help="run directories")
    p.add_argument("--json", default=str(RESULTS / "depth_sweep.json"))
    p.add_argument("--png", default=None, help="figure (default: the JSON path with .png)")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="do not train: redraw the figure and print the table from this JSON")
    p.add_argument("--resume", action="store_true",
                   help="keep rows already in --json (its settings must match)")
    a = p.parse_args(argv)
    a.command = "python benchmarks/depth_sweep.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    if a.from_json is None:
        if a.max_steps is None and a.epochs is None:
            p.error("give --max-steps (the per-run step budget) and/or --epochs")
        bad = [d for d in a.depths if d < 0]
        if bad:
            p.error(f"depths must be >= 0, got {bad}")
        if a.skip < 1:
            p.error(f"--skip must be >= 1 (the plain runs use skip 0), got {a.skip}")
        if a.train_eval_size < 0:
            p.error("--train-eval-size must be >= 0")
    return a


# ----------------------------------------------------------------------------- training


def _write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def _train_subset(data, size: int, seed: int):
    """A fixed subset of the training split (the same images for every run)."""
    import torch

    from torchcaps.data import Split

    n = min(size, len(data.train))
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    idx, _ = torch.sort(idx)
    return Split(data.train.images[idx], data.train.labels[idx])


def _shortcuts(depth: int, skip: int, model_kwargs: dict) -> list[list[int]]:
    """Shortcut pairs ``(l - s, l)`` the residual stack of ``depth`` gets; ``[]`` if none fit."""
    from torchcaps.layers.residual import residual_pairs

    hidden = (model_kwargs.get("hidden_caps", 32), model_kwargs.get("hidden_dim", 8))
    out = (model_kwargs.get("num_classes", 10), model_kwargs.get("class_dim", 16))
    try:
        return [list(p) for p in residual_pairs([hidden] * depth + [out], skip)]
    except ValueError:  # skip too long for the stack, or no two layers of equal shape
        return []


def run_one(a: argparse.Namespace, data, depth: int, skip: int, train_subset) -> dict:
    """Train one network and return its row."""
    from torchcaps.runtime import configure_process
    from torchcaps.train import ClassificationTask, NonFiniteError, TrainConfig, Trainer, evaluate

    kind = "residual" if skip else "plain"
    kwargs = {**a.model_kwargs, "depth": depth, "skip": skip, "routing": a.routing,
              "routing_iterations": a.routing_iterations, "shortcut": a.shortcut}
    per_epoch = math.ceil(len(data.train) / a.batch_size)
    epochs = a.epochs or math.ceil(a.max_steps / per_epoch)
    cfg = TrainConfig(model=MODEL, model_kwargs=kwargs, dataset=a.dataset, val_size=a.val_size,
                      epochs=epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                      seed=a.seed, out=f"{a.out}/depth{depth}-{kind}", progress=False,
                      threads=a.threads, device=a.device)
    row = {"depth": depth, "skips": bool(skip), "skip": skip, "shortcut": a.shortcut,
           "same_as_plain": False}
    t0 = time.perf_counter()
    configure_process(a.threads)
    trainer = Trainer(ClassificationTask(data), cfg)
    row["parameters"] = sum(q.numel() for q in trainer.module.parameters())
    row["shortcuts"] = [list(pair) for pair in trainer.module.caps.pairs]  # as built
    try:
        summary = trainer.fit()
    except NonFiniteError as e:
        row.update(diverged=str(e), steps=trainer.step, test_accuracy=None, val_accuracy=None,
                   final_train_loss=None, final_train_accuracy=None, train_loss_last_epoch=None,
                   train_minutes=round(sum(h["train_seconds"] for h in trainer.history) / 60, 3),
                   wall_minutes=round((time.perf_counter() - t0) / 60, 3))
        return row
    last = trainer.history[-1]
    if train_subset is not None:
        fit = evaluate(trainer.module, train_subset, cfg.eval_batch_size)  # final weights
        final_loss, final_acc = fit["loss"], fit["accuracy"]
    else:
        final_loss, final_acc = last["train_loss"], last["train_accuracy"]
    row.update(
        diverged=None, steps=summary["steps"], epochs=epochs,
        test_accuracy=summary["test_accuracy"], val_accuracy=summary["best"]["val_accuracy"],
        best_epoch=summary["best"]["epoch"], best_step=summary["best"]["step"],
        final_train_loss=final_loss, final_train_accuracy=final_acc,
        train_loss_last_epoch=last["train_loss"],
        train_minutes=round(summary["train_seconds"] / 60, 3),
        wall_minutes=round((time.perf_counter() - t0) / 60, 3),
        seconds_per_step=round(summary["train_seconds"] / max(summary["steps"], 1), 4),
        history=[{k: h[k] for k in ("epoch", "step", "train_loss", "val_accuracy")}
                 for h in trainer.history],
    )
    return row


def sweep(a: argparse.Namespace) -> dict:
    from torchcaps.bench import machine_info
    from torchcaps.data import load_dataset

    json_path = Path(a.json)
    settings = {k: getattr(a, k) for k in _SETTING_KEYS}
    result = {"benchmark": "depth_sweep", "model": MODEL, "dataset": a.dataset,
              "command": a.command, "machine": machine_info(),
              "settings": settings, "single_seed": True,
              "train_loss_measure": (f"final weights, eval mode, {a.train_eval_size} "
                                     "fixed training images")
              if a.train_eval_size else "mean over the last epoch, training mode",
              "rows": []}
    done: dict[tuple[int, bool], dict] = {}
    if a.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"--resume: {json_path} was written with other settings "
                             f"({old.get('settings')}); use another --json")
        done = {(r["depth"], r["skips"]): r for r in old["rows"]}
    data = load_dataset(a.dataset, val_size=a.val_size)
    subset = _train_subset(data, a.train_eval_size, a.seed) if a.train_eval_size else None
    rows = result["rows"]
    for depth in a.depths:
        plain = done.get((depth, False))
        for skip in (0, a.skip):
            key = (depth, bool(skip))
            if key in done:
                row = done[key]
            elif skip and not _shortcuts(depth, skip, a.model_kwargs):
                # no shortcut fits: the residual network is the plain one (same seed, same init)
                row = {**plain, "skips": True, "skip": skip, "shortcuts": [],
                       "same_as_plain": True,
                       "note": f"no shortcut fits depth {depth} with skip {skip}: "
                               "identical to the plain network, not trained again"}
            else:
                row = run_one(a, data, depth, skip, subset)
            if not skip:
                plain = row
            rows.append(row)
            _write_json(json_path, result)  # after every run: a partial sweep is usable
            print(_row_line(row), flush=True)
    return result


# ----------------------------------------------------------------------------- output


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v if scale == 1.0 else v * scale, spec)


def _row_line(r: dict) -> str:
    kind = "residual" if r["skips"] else "plain"
    extra = " (= plain: no shortcut fits)" if r.get("same_as_plain") else ""
    if r.get("diverged"):
        return f"depth {r['depth']:>2} {kind:<8}: diverged at step {r['steps']}"
    return (f"depth {r['depth']:>2} {kind:<8}: test {100 * r['test_accuracy']:.2f}% "
            f"val {100 * r['val_accuracy']:.2f}% train loss {r['final_train_loss']:.4f} "
            f"{r['train_minutes']:.1f} min{extra}")


def table(result: dict) -> str:
    """A plain-text table: one line per depth, plain next to residual."""
    by = {(r["depth"], r["skips"]): r for r in result["rows"]}
    depths = sorted({r["depth"] for r in result["rows"]})
    head = (f"{'depth':>5} {'params':>10} | {'test acc % plain':>16} {'residual':>8} | "
            f"{'train loss plain':>16} {'residual':>8} | {'minutes plain':>13} {'residual':>8}")
    lines = [head, "-" * len(head)]
    for d in depths:
        p, r = by.get((d, False), {}), by.get((d, True), {})
        same = "=" if r.get("same_as_plain") else " "
        lines.append(
            f"{d:>5} {_fmt(p.get('parameters') or r.get('parameters'), ',d'):>10} | "
            f"{_fmt(p.get('test_accuracy'), '.2f', 100):>16} "
            f"{same}{_fmt(r.get('test_accuracy'), '.2f', 100):>7} | "
            f"{_fmt(p.get('final_train_loss'), '.4f'):>16} "
            f"{same}{_fmt(r.get('final_train_loss'), '.4f'):>7} | "
            f"{_fmt(p.get('train_minutes'), '.1f'):>13} {_fmt(r.get('train_minutes'), '.1f'):>8}")
    lines.append("'=': no shortcut fits this depth, the residual network is the plain one; "
                 "'-': not run or diverged")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Two panels against depth: test accuracy, and final training loss; plain vs residual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.get("settings", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("test_accuracy", 100.0, "test accuracy (%)",
               "Test accuracy (checkpoint chosen on validation)"),
              ("final_train_loss", 1.0, "training loss (margin loss)",
               "Final training loss\n(" + result.get("train_loss_measure", "") + ")"))
    styles = ((False, "plain (no skips)", "tab:red", "o"),
              (True, f"residual (skip {s.get('skip', 2)})", "tab:blue", "s"))
    depths = sorted({r["depth"] for r in result["rows"]})
    for ax, (key, scale, ylabel, title) in zip(axes, panels):
        for skips, label, color, marker in styles:
            rows = sorted((r for r in result["rows"] if r["skips"] == skips
                           and r.get(key) is not None), key=lambda r: r["depth"])
            xs = [r["depth"] for r in rows]
            ys = [r[key] * scale for r in rows]
            filled = [i for i, r in enumerate(rows) if not r.get("same_as_plain")]
            ax.plot(xs, ys, color=color, marker=marker, markevery=filled, label=label,
                    linewidth=1.5)
            same = [(x, y) for r, x, y in zip(rows, xs, ys) if r.get("same_as_plain")]
            if same:  # hollow: no shortcut fits, identical to plain
                ax.plot(*zip(*same), linestyle="none", marker=marker, markersize=9,
                        markerfacecolor="none", color=color,
                        label="residual = plain (no shortcut fits)" if key == panels[0][0]
                        else None)
        ax.set_xlabel("hidden capsule layers (depth)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.set_xticks(depths)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    diverged = [f"depth {r['depth']} {'residual' if r['skips'] else 'plain'}"
                for r in result["rows"] if r.get("diverged")]
    sup = (f"{result.get('model', MODEL)} on {result.get('dataset')}: "
           f"{s.get('max_steps')} steps, batch {s.get('batch_size')}, {s.get('routing')} routing, "
           f"seed {s.get('seed')} (single seed)")
    if diverged:
        sup += f"; diverged: {', '.join(diverged)}"
    fig.suptitle(sup, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        png = a.png or str(Path(a.from_json).with_suffix(".png"))
    else:
        result = sweep(a)
        png = a.png or str(Path(a.json).with_suffix(".png"))
        print(f"wrote {a.json}")
    print(table(result))
    print(f"wrote {plot(result, png)}")
    return result


if __name__ == "__main__":
    main()
