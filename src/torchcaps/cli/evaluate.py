"""``torchcaps evaluate``: score a checkpoint (accuracy, confusion matrix, figures).

Figures go to a folder named after what was evaluated, beside the checkpoint:
``eval-test/``, ``eval-val/``, or ``eval-NAME/`` for ``--data NAME.npz`` (``eval-NAME-pad/``
and ``eval-NAME-resize/`` when the images were fitted), so that no evaluation overwrites
another's. ``--out`` names the folder instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _args

SUITE_MOVED = ("the robustness suites are their own command now: torchcaps suite "
               "affnist|multimnist [options], with the options `evaluate --suite` took "
               "(see `torchcaps suite affnist --help`)")


PRETRAINED = "pretrained:"


def _load(checkpoint: str, device):
    """``(model, run config)`` of a checkpoint or of published weights (``pretrained:NAME``)."""
    from ..train import build_model_from_checkpoint

    if checkpoint.startswith(PRETRAINED):
        from ..models import create_model
        from ..models.pretrained import get_pretrained

        rec = get_pretrained(checkpoint[len(PRETRAINED):])
        model = create_model(rec.model, pretrained=rec.name).to(device).eval()
        return model, {"dataset": rec.dataset}
    model, meta = build_model_from_checkpoint(checkpoint, device)
    return model, meta.get("config", {})


class _SuiteMoved(argparse.Action):
    """``evaluate --suite``: fail at once, pointing to ``torchcaps suite``."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(SUITE_MOVED)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", formatter_class=_args.HelpFormatter,
        help="score a checkpoint: accuracy, confusion matrix and figures",
        description="Score a checkpoint on its test (or validation) split or on a labelled "
                    ".npz file: accuracy, confusion matrix, and PNG figures (reconstructions, "
                    "capsule-dimension perturbations, capsule lengths, routing map).")
    p.add_argument("checkpoint",
                   help="a checkpoint (.json, .safetensors, or their common prefix), or "
                        "pretrained:NAME for published weights (see `torchcaps weights list`)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="which split of the run's dataset to score")
    other = p.add_mutually_exclusive_group()
    other.add_argument("--dataset", default=None, metavar="NAME",
                       help="score this dataset's split instead of the run's (same image shape, "
                            "at most the model's classes), e.g. digits+resize28 for a model "
                            "trained on mnist")
    other.add_argument("--data", default=None, metavar="FILE.npz",
                       help="score a labelled file instead: images (N, H, W) uint8 and labels "
                            "(N,) int64")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--resize", action="store_true",
                     help="with --data: resize images of another size (bilinear) to the model's")
    fit.add_argument("--pad", action="store_true",
                     help="with --data: zero-pad smaller images, centred, to the model's size")
    _args.add_data_dir(p, "data cache directory (default: the one the run recorded, else "
                          "$TORCHCAPS_HOME or ~/.cache/torchcaps)")
    _args.add_out(p, "figure folder (default: eval-test, eval-val or eval-NAME beside the "
                     "checkpoint)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    _args.add_json(p)
    _args.add_device(p, "cpu")
    _args.add_batch_size(p, help="evaluation batch size")
    p.add_argument("--suite", nargs="?", action=_SuiteMoved, help=argparse.SUPPRESS)
    return p


def figure_dir(args) -> Path:
    """Where this evaluation's figures go (see the module docstring)."""
    if args.out:
        return Path(args.out)
    if args.data:
        name = Path(args.data).stem
        name += "-resize" if args.resize else "-pad" if args.pad else ""
    else:
        name = f"{args.dataset}-{args.split}" if args.dataset else args.split
    name = name.replace(':', '-').replace('/', '-')
    if args.checkpoint.startswith(PRETRAINED):
        return Path(f"eval-{args.checkpoint[len(PRETRAINED):]}-{name}")
    return Path(args.checkpoint).parent / f"eval-{name}"


def _figures(model, split, out_dir: Path) -> list[Path]:
    import torch

    from ..viz import perturbation_figure, reconstruction_figure
    from ..viz.explain import capsule_length_figure, routing_map_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = split.batch(slice(0, 10))
    model.cpu()
    written = []
    if getattr(model, "decoder", None) is not None:
        written.append(reconstruction_figure(model, x, out_dir / "reconstructions.png"))
        written.append(perturbation_figure(model, x[:1], out_dir / "perturbation.png"))
    else:
        print("model has no decoder: no reconstruction figures", file=sys.stderr)
    with torch.inference_mode():
        probe = model.eval()(x[:1])
    if probe.poses is not None:
        written.append(capsule_length_figure(model, x[:6], out_dir / "capsule_lengths.png", y[:6]))
    if probe.couplings is not None:
        try:
            written.append(routing_map_figure(model, x[:1], out_dir / "routing_map.png"))
        except ValueError as e:
            print(f"no routing map for this model: {e}", file=sys.stderr)
    return written


def run(args) -> int:
    from ..data import Split, fit_images, load_dataset, load_labelled_npz
    from ..train import evaluate, format_confusion, resolve_device

    if (args.resize or args.pad) and not args.data:
        raise ValueError("--resize and --pad apply only with --data")
    model, cfg = _load(args.checkpoint, resolve_device(args.device))
    if args.data:
        images, labels = load_labelled_npz(args.data, num_classes=model.num_classes)
        if model.in_shape[0] != 1:
            raise ValueError(f"--data holds grey images but the model expects "
                             f"{model.in_shape[0]} channels")
        mode = "resize" if args.resize else "pad" if args.pad else "error"
        split = Split(fit_images(images, tuple(model.in_shape[1:]), mode), labels)
        name = Path(args.data).name
    else:
        if args.dataset:
            data = load_dataset(args.dataset, args.data_dir or cfg.get("data_dir"))
            if data.in_shape != model.in_shape or data.num_classes > model.num_classes:
                raise ValueError(
                    f"{args.dataset} has images {data.in_shape} and {data.num_classes} classes; "
                    f"the model takes {model.in_shape} and {model.num_classes} classes")
        else:
            data = load_dataset(cfg.get("dataset", "mnist-mini"),
                                args.data_dir or cfg.get("data_dir"), cfg.get("val_size"),
                                cfg.get("split_seed", 0))
        split = getattr(data, args.split)
        name = f"{args.dataset} {args.split}" if args.dataset else args.split
    res = evaluate(model, split, args.batch_size)
    print(f"{name} accuracy: {100 * res['accuracy']:.2f}% ({res['correct']}/{res['total']})")
    print(format_confusion(res["confusion"]))
    figures = [] if args.no_plots else _figures(model, split, figure_dir(args))
    for f in figures:
        print(f"wrote {f}")
        for note in getattr(f, "notes", ()):
            print(f"note: {note}", file=sys.stderr)
    if args.json:
        res.update(checkpoint=str(args.checkpoint), split=name, figures=[str(f) for f in figures])
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
