"""``torchcaps suite affnist|multimnist``: train a fresh model under a paper's protocol, test it.

* ``affnist``: train on MNIST digits placed at random on a 40x40 canvas until the
  translated test accuracy reaches ``--target``, then test on affinely warped digits
  (Sabour et al. 2017, Sec. 5.2).
* ``multimnist``: train on overlapping pairs of digits, report the top-2 error (Sec. 6).

Both run :mod:`torchcaps.evaluation` and write ``report.json`` into the run directory.
``--seeds 0 1 2`` runs the suite once per seed in ``OUT/seed-N/`` (finished seeds are read
back, interrupted ones resumed) and writes ``OUT/seeds.json`` with the mean and sample
standard deviation of each accuracy.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import _args

_EPOCHS = {"affnist": 50, "multimnist": 10}

#: optional settings recorded in the report's command when given, in this order
_RECORDED = ("model_kwargs", "target", "stop_on", "max_steps", "seed", "seeds", "threads",
             "precision", "force_precision", "affine_size", "train_pairs", "test_pairs", "device")


def _common(p: argparse.ArgumentParser, suite: str) -> None:
    g = p.add_argument_group("model and data")
    _args.add_model(g)
    _args.add_data(g, default="mnist", help="source images: any 1x28x28 dataset (mnist, "
                   "mnist-mini, fashion-mnist, kmnist, emnist-balanced, emnist-letters, "
                   "digits+resize28, npz:..., folder:...)")
    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=_args.positive_int, default=_EPOCHS[suite], metavar="N",
                   help="most epochs")
    g.add_argument("--max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="stop after this many steps in total (default: no limit)")
    _args.add_batch_size(g, help="training and evaluation batch size")
    seeds = g.add_mutually_exclusive_group()
    _args.add_seed(seeds)
    seeds.add_argument("--seeds", type=_args.seed, nargs="+", default=None, metavar="N",
                       help="run the suite once per seed into OUT/seed-N/ and write "
                            "OUT/seeds.json with the mean and standard deviation of every "
                            "accuracy; running it again skips finished seeds and resumes the "
                            "others")
    g = p.add_argument_group("run directory")
    _args.add_out(g, f"run directory (default: runs/{suite}-MODEL)")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the suite run in --out from its last checkpoint")
    once.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in --out (refused without it)")
    _args.add_json(g, "also write the report here (it is always written to --out as "
                      "report.json)")
    g = p.add_argument_group("runtime")
    _args.add_device(g, "auto")
    _args.add_threads(g, resumable=True)
    _args.add_precision(g)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "suite", formatter_class=_args.HelpFormatter,
        help="robustness suites: train a fresh model, then test it on affNIST or MultiMNIST",
        description="Train a fresh model under a paper's protocol and test its robustness "
                    "(Sabour et al. 2017): affnist (translated training, affine test) or "
                    "multimnist (overlapping digit pairs, top-2 error).")
    kinds = p.add_subparsers(dest="suite", required=True, metavar="{affnist,multimnist}")
    a = kinds.add_parser(
        "affnist", formatter_class=_args.HelpFormatter,
        help="train on translated 40x40 MNIST, test on translated and affine digits",
        description="Train on MNIST digits placed at random on a 40x40 canvas until the "
                    "translated test accuracy reaches --target, then test on affinely warped "
                    "digits (Sabour et al. 2017, Sec. 5.2).")
    _common(a, "affnist")
    g = a.add_argument_group("affNIST protocol")
    g.add_argument("--target", type=_args.fraction, default=0.992, metavar="ACC",
                   help="stop when the watched accuracy reaches this")
    g.add_argument("--stop-on", choices=["test", "val"], default="test",
                   help="watch the translated test set (the paper's protocol) or validation")
    g.add_argument("--affine-size", type=_args.positive_int, default=None, metavar="N",
                   help="test digits warped for the affine set (default: all)")
    m = kinds.add_parser(
        "multimnist", formatter_class=_args.HelpFormatter,
        help="train on overlapping digit pairs, report the top-2 error",
        description="Train on pairs of overlapping MNIST digits of different classes (36x36) "
                    "and report the top-2 error (Sabour et al. 2017, Sec. 6).")
    _common(m, "multimnist")
    g = m.add_argument_group("MultiMNIST protocol")
    g.add_argument("--train-pairs", type=_args.positive_int, default=60_000, metavar="N",
                   help="fresh training pairs per epoch")
    g.add_argument("--test-pairs", type=_args.positive_int, default=10_000, metavar="N",
                   help="test pairs")
    return p


def command_line(args, out: str) -> str:
    """The ``torchcaps suite`` command recorded in the report: the budget, then what was given."""
    cmd = ["torchcaps", "suite", args.suite, "--model", args.model, "--dataset", args.dataset,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--out", out]
    for name in _RECORDED:
        if name not in args.given:
            continue
        v = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(v, bool):
            cmd += [flag] if v else []
        elif isinstance(v, list):
            cmd += [flag, *map(str, v)]
        else:
            cmd += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return shlex.join(cmd)


#: the numbers of a suite report averaged over seeds
SEED_METRICS = ("translated_test_accuracy", "affine_accuracy", "val_accuracy", "error",
                "epochs", "train_minutes")


def _run_seeds(args, out: str) -> int:
    """One suite run per seed in ``OUT/seed-N/`` (finished ones read back, others resumed)."""
    from ..evaluation import format_suite_table
    from ..evaluation.suites import _write_json
    from ..train.seeds import seed_dir, seed_statistics

    if args.resume or args.overwrite:
        raise ValueError("--seeds skips finished seeds and resumes the others by itself; "
                         "--resume and --overwrite apply to single runs")
    reports = []
    for i, seed in enumerate(args.seeds):
        sub = seed_dir(out, seed)
        if (sub / "report.json").is_file():
            print(f"seed {seed}, {i + 1} of {len(args.seeds)}: finished, skipped ({sub})",
                  file=sys.stderr)
            reports.append(json.loads((sub / "report.json").read_text()))
            continue
        resume = _args.earlier_run(sub) is not None
        print(f"seed {seed}, {i + 1} of {len(args.seeds)}: "
              f"{'resuming' if resume else 'training'} ({sub})", file=sys.stderr)
        one = argparse.Namespace(**{**vars(args), "seeds": None, "seed": seed,
                                    "out": str(sub), "resume": resume, "json": None})
        _run_one(one, str(sub), command=command_line(args, out))
        reports.append(json.loads((sub / "report.json").read_text()))
    mean, std = seed_statistics(reports, SEED_METRICS)
    summary = {"suite": args.suite, "model": args.model, "seeds": args.seeds,
               "command": command_line(args, out), "mean": mean, "std": std,
               "runs": [{"seed": s, "out": str(seed_dir(out, s)), "report": r}
                        for s, r in zip(args.seeds, reports)]}
    print(format_suite_table(reports))
    shown = [k for k in ("translated_test_accuracy", "affine_accuracy", "error") if k in mean]
    for k in shown:
        sd = std[k]
        print(f"{k}: {100 * mean[k]:.2f}%" + ("" if sd is None else f" +- {100 * sd:.2f}")
              + f" over seeds {args.seeds}")
    path = Path(out) / "seeds.json"
    _write_json(path, summary)
    if args.json:
        _write_json(Path(args.json), summary)
    print(f"wrote {path}")
    return 0


def run(args) -> int:
    out = args.out or f"runs/{args.suite}-{args.model}"
    _args.check_model(args.model)
    if args.seeds:
        return _run_seeds(args, out)
    return _run_one(args, out, command_line(args, out))


def _run_one(args, out: str, command: str) -> int:
    from ..evaluation import format_suite_table, run_affnist_suite, run_multimnist_suite
    from ..runtime import configure_process

    aff = args.suite == "affnist"
    held = _args.earlier_run(Path(out))
    if held and not (args.resume or args.overwrite):
        raise FileExistsError(
            f"{out} already holds {held}; continue it with --resume, choose another --out, "
            "or pass --overwrite to replace it")
    configure_process(args.threads)
    common = dict(model_name=args.model, data=args.dataset, max_epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, out_dir=out,
                  model_kwargs=args.model_kwargs, max_steps=args.max_steps, threads=args.threads,
                  precision=args.precision, force_precision=args.force_precision,
                  data_dir=args.data_dir, device=args.device, resume=args.resume,
                  overwrite=args.overwrite, command=command)
    if aff:
        report = run_affnist_suite(target=args.target, affine_size=args.affine_size,
                                   stop_on=args.stop_on, **common)
    else:
        report = run_multimnist_suite(train_pairs=args.train_pairs, test_pairs=args.test_pairs,
                                      **common)
    print(format_suite_table([report]))
    if aff and not report["target_reached"]:
        print(f"note: the target {report['target']} was not reached within the budget",
              file=sys.stderr)
    if report.get("figure"):
        print(f"wrote {report['figure']}")
    path = Path(out) / "report.json"
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
