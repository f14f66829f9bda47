"""The ``torchcaps`` command: train, evaluate, segment, gan, unsupervised, suite, bench, models,
data.

One module per command (``train.py``, ``evaluate.py``, ...), each with
``add_parser(subparsers)`` and ``run(args) -> int``; the options they share are defined
once in ``_args.py``. :func:`main` parses the whole command line first (no torch import:
``--help`` and argument errors are immediate), then runs the command, turning library errors
into one line on stderr (exit code 2) instead of a traceback; ``TORCHCAPS_DEBUG=1`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from . import _args

__all__ = ["main", "build_parser"]

#: command modules in the order ``torchcaps --help`` lists them; an optional one whose file
#: is absent is skipped
_COMMANDS = ("train", "evaluate", "segment", "gan", "unsupervised", "suite", "bench", "models",
             "weights", "data", "dilution")
_OPTIONAL = ("dilution",)


def _modules() -> dict[str, ModuleType]:
    found = {}
    for name in _COMMANDS:
        if name in _OPTIONAL and importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        found[name] = importlib.import_module(f"{__name__}.{name}")
    return found


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (cheap: imports no torch)."""
    p = argparse.ArgumentParser(prog="torchcaps", formatter_class=_args.HelpFormatter,
                                description="Capsule networks for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _modules().values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = _args.given_options(build_parser(), argv)
    command = _modules()[args.command]
    try:
        return command.run(args)
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
