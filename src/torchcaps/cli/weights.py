"""``torchcaps weights``: list, fetch, check and export pretrained weights.

* ``list``: every published set of weights with its size, digest, where it comes from and
  the accuracy recorded when it was exported;
* ``get NAME``: a verified local copy (shipped, cached, downloaded, or ``--file`` checked);
* ``check [NAME ...]``: reload weights and score them on the bundled ``mnist-mini`` test
  images against the recorded figure;
* ``export RUN/best --name NAME``: write a checkpoint's weights and their record.

``torchcaps evaluate pretrained:NAME`` scores published weights like any checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "weights", formatter_class=_args.HelpFormatter,
        help="pretrained weights: list, get, check, export",
        description="Pretrained weights trained by torchcaps' own commands. Small files ship "
                    "inside the package; larger ones are downloaded once into "
                    "CACHE/weights/. Every file is checked against the SHA-256 in its record "
                    "before it is read. Load them in Python with "
                    "create_model(NAME, pretrained=True).")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", formatter_class=_args.HelpFormatter,
                   help="the published weights with their recorded accuracy")
    g = sub.add_parser("get", formatter_class=_args.HelpFormatter,
                       help="a verified local copy of a weights file (downloaded if needed)")
    g.add_argument("name", help="weights name (e.g. capsnet-mnist) or model name")
    g.add_argument("--file", default=None, metavar="FILE",
                   help="a copy you already have: it is checked against the published digest")
    g.add_argument("--mirror", default=None, metavar="URL",
                   help="download URL/FILENAME instead of the published URL (default: "
                        "$TORCHCAPS_WEIGHTS_MIRROR)")
    g.add_argument("--timeout", type=_args.positive_float, default=60.0, metavar="S",
                   help="seconds per network request")
    _args.add_data_dir(g, "cache directory; downloads go to its weights/ folder (default: "
                          "$TORCHCAPS_HOME or ~/.cache/torchcaps)")
    c = sub.add_parser("check", formatter_class=_args.HelpFormatter,
                       help="reload weights and score them on the bundled mnist-mini test images")
    c.add_argument("names", nargs="*", metavar="NAME",
                   help="weights to check (default: every shipped file)")
    c.add_argument("--tolerance", type=_args.positive_float, default=0.3, metavar="POINTS",
                   help="largest accepted difference from the recorded accuracy, in points")
    e = sub.add_parser("export", formatter_class=_args.HelpFormatter,
                       help="write a checkpoint's weights (safetensors) and their record")
    e.add_argument("checkpoint", help="a torchcaps train checkpoint, e.g. RUN/best")
    e.add_argument("--name", required=True, help="weights name, e.g. capsnet-mnist")
    e.add_argument("--command", required=True, dest="train_command", metavar="TEXT",
                   help="the command that trained the run, recorded with the weights")
    e.add_argument("--url", default=None,
                   help="where the file will be published (for files not shipped)")
    e.add_argument("--no-ship", action="store_true",
                   help="the file is published at --url instead of shipping in the package")
    e.add_argument("--notes", default="", help="a sentence recorded with the weights")
    _args.add_out(e, "folder for the weights and record (default: the package's weights folder)")
    _args.add_data_dir(e)
    return p


def _points(x: float) -> str:
    return f"{100 * x:.2f}%"


def _list() -> int:
    from ..models.pretrained import get_pretrained, list_pretrained

    print(f"{'weights':<28}{'model':<20}{'MB':>7}  {'sha256':<14}{'test':>8}{'mini':>8}  source")
    for name in list_pretrained():
        r = get_pretrained(name)
        source = "shipped" if r.shipped else r.url or "-"
        mini = r.accuracy.get("mnist-mini test")
        print(f"{name:<28}{r.model:<20}{r.bytes / 1e6:>7.2f}  {r.sha256[:12]:<14}"
              f"{_points(r.accuracy['test']):>8}{_points(mini) if mini else '-':>8}  {source}")
    return 0


def _check(names: list[str], tolerance: float) -> int:
    from ..data import load_dataset
    from ..models import create_model
    from ..models.pretrained import get_pretrained, list_pretrained
    from ..train.evaluate import evaluate

    names = names or [n for n in list_pretrained() if get_pretrained(n).shipped]
    test = load_dataset("mnist-mini").test
    failed = 0
    for name in names:
        r = get_pretrained(name)
        recorded = r.accuracy.get("mnist-mini test")
        if recorded is None:
            print(f"{name}: no mnist-mini figure recorded (not a 28x28 digit model)")
            continue
        model = create_model(r.model, pretrained=r.name).eval()
        got = evaluate(model, test, 256)["accuracy"]
        ok = abs(got - recorded) * 100 <= tolerance
        failed += not ok
        print(f"{name}: mnist-mini test {_points(got)} (recorded {_points(recorded)}) "
              f"{'ok' if ok else 'MISMATCH'}")
    return 1 if failed else 0


def run(args) -> int:
    if args.action == "list":
        return _list()
    if args.action == "check":
        return _check(args.names, args.tolerance)
    if args.action == "get":
        from ..models.pretrained import weights_path

        path = weights_path(args.name, file=args.file, cache_dir=args.data_dir,
                            mirror=args.mirror, timeout=args.timeout)
        print(path)
        return 0
    from ..models.pretrained import export_pretrained

    rec = export_pretrained(args.checkpoint, args.name, args.train_command, url=args.url,
                            ship=not args.no_ship, out_dir=args.out, data_dir=args.data_dir,
                            notes=args.notes)
    acc = ", ".join(f"{k} {_points(v)}" for k, v in rec.accuracy.items())
    print(f"wrote {rec.name}: {rec.bytes:,} bytes, sha256 {rec.sha256}; {acc}", file=sys.stderr)
    return 0
