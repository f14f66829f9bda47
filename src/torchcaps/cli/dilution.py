"""``torchcaps dilution``: how much of the class capsules' input comes from non-informative
primary capsules (see :mod:`torchcaps.evaluation.dilution` for the measures).

Loads a checkpoint and the split of the dataset its run recorded, measures on the first
``--n`` images, prints the summary, and writes a PNG figure (``dilution.png`` in ``--out``,
by default a ``dilution-<split>`` folder beside the checkpoint) and, with ``--json``, the
summary as JSON. A model trained on a larger canvas than the dataset's digits (the affNIST
suite's 40x40 models) is measured with ``--translate``: each digit is placed at a random
position (seed 0) on the model's canvas.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import _args


def _number(low: float, high: float, what: str):
    """An argparse type: a finite float in ``[low, high)``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and low <= v < high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


_length = _number(0.0, math.inf, "a capsule length >= 0")
_ink_fraction = _number(0.0, 1.0, "a fraction in [0, 1)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dilution", formatter_class=_args.HelpFormatter,
        help="measure how much non-informative primary capsules dilute the class capsules",
        description="For a capsnet-like checkpoint (primary capsules routed by one "
                    "CapsLinear): the share of each class capsule's coupling-weighted vote "
                    "mass that comes from primary capsules at background positions (empty "
                    "receptive field) or with short length, and how much the class lengths "
                    "change when those capsules are zeroed before routing.")
    p.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their common prefix")
    _args.add_data_dir(p, "data cache directory (default: the one the run recorded, else "
                          "$TORCHCAPS_HOME or ~/.cache/torchcaps)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="which split of the run's dataset to measure on")
    p.add_argument("--n", type=_args.positive_int, default=500, metavar="N",
                   help="images measured (the first N of the split)")
    p.add_argument("--threshold", type=_length, default=0.1, metavar="L",
                   help="primary capsules shorter than this count as 'short'")
    p.add_argument("--background-ink", type=_ink_fraction, default=0.0, metavar="F",
                   help="positions whose receptive field is at most this fraction ink count "
                        "as background (0: an empty receptive field)")
    p.add_argument("--translate", action="store_true",
                   help="place the digits at random (seed 0) on the model's larger canvas")
    _args.add_out(p, "figure folder (default: dilution-SPLIT beside the checkpoint)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figure")
    _args.add_json(p, "also write the summary as JSON")
    _args.add_batch_size(p, help="images per forward pass")
    _args.add_device(p, "cpu")
    return p


def _images(model, split, n: int, translate: bool):
    """The first ``n`` images of ``split`` as the model takes them, and their labels."""
    import torch

    from ..data import make_translated_mnist

    x, y = split.batch(slice(0, n))
    want = tuple(model.in_shape)
    if tuple(x.shape[1:]) == want:
        if translate:
            raise ValueError("--translate: the images already have the model's size "
                             f"{want}; drop the option")
        return x, y
    c, h, w = want
    if not translate:
        raise ValueError(f"the model takes {want} images but the dataset has "
                         f"{tuple(x.shape[1:])}; use --translate to place the digits on the "
                         "model's canvas")
    if c != 1 or x.shape[1] != 1 or h != w or h < x.shape[2] or w < x.shape[3]:
        raise ValueError(f"--translate needs grey digits and a larger square canvas; the model "
                         f"takes {want}, the dataset has {tuple(x.shape[1:])}")
    raw = (x[:, 0] * 255).round().to(torch.uint8)  # (N, H, W), back to the stored pixels
    placed, labels = make_translated_mnist(raw, y, seed=0, canvas=h)
    return placed[:, None].float().div_(255.0), labels


def _print_summary(s: dict) -> None:
    t, gh, gw = s["grid"]
    print(f"{s['images']} images, primary grid {t} types x {gh}x{gw}, "
          f"mean primary length {s['mean_primary_length']:.3f}"
          + (f", accuracy {100 * s['accuracy']:.2f}%" if "accuracy" in s else ""))
    what = {"background": ("background" if s["background_ink"] == 0
                           else f"background (<= {s['background_ink']:.0%} ink)"),
            "short": f"short (|u| < {s['threshold']:g})"}
    print(f"{'set':<26}{'capsules':>10}{'vote share':>12}{'length change':>15}"
          f"{'relative':>10}{'flips':>8}")
    for name in ("background", "short"):
        r = s[name]
        print(f"{what[name]:<26}{100 * r['fraction']:>9.1f}%{100 * r['share_predicted']:>11.1f}%"
              f"{r['length_change_predicted']:>+15.4f}"
              f"{100 * r['relative_length_change_predicted']:>9.1f}%"
              f"{100 * r['prediction_changed']:>7.1f}%")
    print("vote share and length change at the predicted class; flips: predictions that "
          "change when the set is zeroed before routing")


def run(args) -> int:
    from ..data import load_dataset
    from ..evaluation.dilution import analyze_dilution, check_dilution_model, dilution_figure
    from ..train import build_model_from_checkpoint, resolve_device

    model, meta = build_model_from_checkpoint(args.checkpoint, resolve_device(args.device))
    check_dilution_model(model, meta.get("model"))
    cfg = meta.get("config") or {}
    data = load_dataset(cfg.get("dataset", "mnist-mini"), args.data_dir or cfg.get("data_dir"),
                        cfg.get("val_size"), cfg.get("split_seed", 0))
    x, y = _images(model, getattr(data, args.split), args.n, args.translate)
    result = analyze_dilution(model, x, y, threshold=args.threshold,
                              background_ink=args.background_ink, batch_size=args.batch_size,
                              name=meta.get("model"))
    summary = result.summary()
    _print_summary(summary)
    figure = None
    if not args.no_plots:
        out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"dilution-{args.split}"
        # the image (of the first 50) with the most background positions, for a telling map
        index = int(result.background[:50].flatten(1).sum(1).argmax())
        figure = dilution_figure(result, x, out / "dilution.png", index=index)
        print(f"wrote {figure}")
    if args.json:
        summary.update(checkpoint=str(args.checkpoint), model=meta.get("model"),
                       split=args.split, translated=bool(args.translate),
                       figure=None if figure is None else str(figure))
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
