"""``torchcaps models``: the registered models with their parameter counts, and the routings."""

from __future__ import annotations

import argparse

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", formatter_class=_args.HelpFormatter,
        help="list registered models (and routing algorithms)",
        description="List the registered models with their parameter counts at 1x28x28, "
                    "10 classes (with and without the reconstruction decoder), and the "
                    "registered routing algorithms.")
    p.add_argument("pattern", nargs="?", default=None,
                   help="glob filter, e.g. 'caps*' (default: every model)")
    return p


def run(args) -> int:
    from ..models import create_model, list_models
    from ..routing import list_routings

    print(f"{'model':<20}{'parameters':>14}{'without decoder':>18}")
    for name in list_models(args.pattern):
        named = list(create_model(name).named_parameters())
        n = sum(p.numel() for _, p in named)
        n_body = sum(p.numel() for k, p in named if not k.startswith("decoder."))
        print(f"{name:<20}{n:>14,}{n_body:>18,}")
    print("routing algorithms: " + ", ".join(list_routings()))
    return 0
