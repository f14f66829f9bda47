"""The argument vocabulary every ``torchcaps`` command shares.

One definition per option (``--model``, ``--dataset``, ``--device``, ``--threads``,
``--precision``, ``--seed``, ``--batch-size``, ``--json``, ``--out``, ...) and the argparse
types that check values as they are parsed, so that every command spells, bounds and
explains an option the same way.

Nothing here imports torch: ``torchcaps --help`` and argument errors stay fast. Helpers
that need the library (:func:`check_model`, :func:`check_optimizer`) import it when called.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from pathlib import Path

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DATASET_HELP",
    "LR_LIMIT",
    "MAX_SHIFT_LIMIT",
    "SEED_LIMIT",
    "HelpFormatter",
    "add_batch_size",
    "add_data",
    "add_data_dir",
    "add_device",
    "add_engine_runtime",
    "add_json",
    "add_model",
    "add_out",
    "add_precision",
    "add_run_directory",
    "add_seed",
    "add_threads",
    "check_model",
    "check_optimizer",
    "default_text",
    "earlier_run",
    "given_options",
    "json_object",
    "learning_rate",
    "nonneg_int",
    "positive_float",
    "new_task_config",
    "positive_int",
    "refuse_earlier_run",
    "resumed_task_run",
    "subcommands",
]

#: the registered datasets (``torchcaps.data.list_datasets()``; a test keeps the two equal)
DATASETS = ("mnist-mini", "mnist", "fashion-mnist", "kmnist", "emnist-balanced", "emnist-letters",
            "cifar10", "cifar100", "svhn", "smallnorb", "smallnorb-stereo", "affnist", "digits")
#: the training augmentation recipes (``torchcaps.data.recipes.AUGMENTATIONS``)
AUGMENTATIONS = ("shift", "efficient", "none", "cifar", "norb")
DATASET_HELP = (f"{', '.join(DATASETS)}; or your own data, folder:PATH (one sub-folder per "
                "class; PATH/train and PATH/test if split) or npz:TRAIN.npz[,TEST.npz]; "
                "add views with +: resizeN, cropN, norm, standardize (e.g. digits+resize28, "
                "cifar10+norm); mnist-mini is bundled, digits needs scikit-learn, the others "
                "are fetched once (`torchcaps data NAME`)")
SEED_LIMIT = 2**32  # seeds are combined with epoch and batch numbers in 64-bit integers
LR_LIMIT = 1e3  # above this every optimiser diverges at once; refuse rather than overflow
MAX_SHIFT_LIMIT = 64  # pixels; the engine also checks a shift against the image size


# ------------------------------------------------------------------ value types
def _bounded(cast, what: str, low: float, high: float = math.inf, strict: bool = False):
    """An argparse type: ``cast(text)``, finite, in ``[low, high]`` (``(low, high]`` if strict)."""

    def parse(text: str):
        try:
            v = cast(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or v < low or (strict and v == low) or v > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


positive_int = _bounded(int, "a positive integer", 0, strict=True)
nonneg_int = _bounded(int, "an integer >= 0", 0)
positive_float = _bounded(float, "a positive number", 0, strict=True)
fraction = _bounded(float, "a factor in (0, 1]", 0, 1, strict=True)
learning_rate = _bounded(float, f"a positive number <= {LR_LIMIT:g} (a learning rate)", 0, LR_LIMIT,
                         strict=True)
seed = _bounded(int, f"a seed in [0, {SEED_LIMIT - 1}]", 0, SEED_LIMIT - 1)
max_shift = _bounded(int, f"a shift in pixels in [0, {MAX_SHIFT_LIMIT}]", 0, MAX_SHIFT_LIMIT)


def json_object(text: str) -> dict:
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


# ------------------------------------------------------------------ help text
def default_text(action: argparse.Action) -> str | None:
    """How ``--help`` and the README show an option's default; ``None``: nothing to show.

    Flags (``--resume``), options whose default is unset, and options whose help already
    explains the default show none; an empty list or object shows as ``none``.
    """
    d = action.default
    if action.nargs == 0 or d is None or d is argparse.SUPPRESS or "default" in (action.help or ""):
        return None
    if isinstance(d, (list, tuple, dict)) and not d:
        return "none"
    if isinstance(d, dict):
        return json.dumps(d)
    if isinstance(d, (list, tuple)):
        return " ".join(map(str, d))
    return str(d)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (see :func:`default_text`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = default_text(action)
        if shown is not None and text is not argparse.SUPPRESS:
            text += f" (default: {shown.replace('%', '%%')})"
        return text


# ------------------------------------------------------------------ shared options
def add_model(p: argparse.ArgumentParser, default: str = "capsnet", kwargs: bool = True) -> None:
    """``--model NAME`` and (with ``kwargs``) ``--model-kwargs JSON``."""
    p.add_argument("--model", default=default, metavar="NAME",
                   help="registered model name (see `torchcaps models`)")
    if kwargs:
        p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                       help='extra model arguments as JSON, e.g. \'{"routing_iterations": 2}\'')


def add_data(p: argparse.ArgumentParser, default: str = "mnist-mini",
             choices: tuple[str, ...] | None = None, help: str | None = None) -> None:
    """``--dataset NAME`` and ``--data-dir DIR``."""
    p.add_argument("--dataset", default=default, choices=choices,
                   metavar=None if choices else "NAME", help=help or DATASET_HELP)
    add_data_dir(p)


def add_data_dir(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--data-dir DIR``: where datasets are cached."""
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=help or "data cache directory (default: $TORCHCAPS_HOME or "
                                "~/.cache/torchcaps)")


def add_device(p: argparse.ArgumentParser, default: str) -> None:
    """``--device``: cpu, cuda, cuda:N, or auto (CUDA when present)."""
    p.add_argument("--device", default=default,
                   help="cpu, cuda, cuda:N, or auto (CUDA when present)")


def add_threads(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    """``--threads N``: torch's intra-op CPU threads."""
    note = "; an exact resume needs the same count" if resumable else ""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch CPU threads{note} (default: torch's choice)")


def add_precision(p: argparse.ArgumentParser, force: bool = True) -> None:
    """``--precision fp32|bf16`` and (with ``force``) ``--force-precision``."""
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: bfloat16 autocast for forward and loss")
    if force:
        p.add_argument("--force-precision", action="store_true",
                       help="run bf16 even where the hardware has no native bfloat16 "
                            "(refused otherwise: there it is many times slower)")


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed N``: model initialisation, data order and augmentation."""
    p.add_argument("--seed", type=seed, default=0, metavar="N",
                   help=f"seed of model initialisation, data order and augmentation "
                        f"(0 to {SEED_LIMIT - 1})")


def add_batch_size(p: argparse.ArgumentParser, default: int = 128,
                   help: str = "batch size") -> None:
    """``--batch-size N``."""
    p.add_argument("--batch-size", type=positive_int, default=default, metavar="N", help=help)


def add_json(p: argparse.ArgumentParser, help: str = "also write the results as JSON") -> None:
    """``--json PATH``."""
    p.add_argument("--json", default=None, metavar="PATH", help=help)


def add_out(p: argparse.ArgumentParser, help: str) -> None:
    """``--out DIR``."""
    p.add_argument("--out", default=None, metavar="DIR", help=help)


def add_run_directory(p: argparse.ArgumentParser, out_help: str) -> None:
    """The run-directory group of a task's train command: ``--out``, ``--resume`` (or
    ``--overwrite``), ``--checkpoint-every``, ``--log-every``."""
    g = p.add_argument_group("run directory")
    add_out(g, out_help)
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its last checkpoint; only "
                           "--epochs, --max-steps, --patience, --device, --threads and logging "
                           "flags may change")
    once.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in --out (refused without it)")
    g.add_argument("--checkpoint-every", type=nonneg_int, default=0, metavar="N",
                   help="also checkpoint every N steps (0: at epoch ends only)")
    g.add_argument("--log-every", type=nonneg_int, default=0, metavar="N",
                   help="also write training metrics every N steps to steps.jsonl (0: off)")


def add_engine_runtime(p: argparse.ArgumentParser) -> None:
    """The runtime group of a task's train command: device, threads, precision, determinism,
    the non-finite policy, progress and ``--json``."""
    g = p.add_argument_group("runtime")
    add_device(g, "auto")
    add_threads(g, resumable=True)
    add_precision(g)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms")
    g.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="on a NaN/Inf loss or gradient: stop, or skip the batch")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")
    add_json(g, "also write the summary here")


# ------------------------------------------------------------------ parser introspection
def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` by name (empty when it has none).

    argparse keeps them in its private action list; this is the one place that reads it.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    for sub in subcommands(parser).values():
        _suppress_defaults(sub)


def given_options(fresh: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """The destinations ``argv`` sets on the command line rather than leaving at default.

    ``fresh`` is a parser built for this call only (its defaults are switched off): parsing
    ``argv`` again then leaves out everything the user did not type.
    """
    _suppress_defaults(fresh)
    ns = fresh.parse_args(argv)
    return frozenset(k for k, v in vars(ns).items() if v is not argparse.SUPPRESS)


# ------------------------------------------------------------------ checks needing the library
def _unknown(kind: str, name: str, known: list[str], see: str) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} ({see})")


def check_model(name: str) -> None:
    """Raise ``ValueError`` with the closest registered names unless ``name`` is a model."""
    from torchcaps.models import list_models

    known = list_models()
    if name not in known:
        raise _unknown("model", name, known, "`torchcaps models` lists them")


def check_optimizer(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a ``torch.optim`` optimiser (any case)."""
    import torch

    known = sorted(n.lower() for n, c in vars(torch.optim).items()
                   if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                   and c is not torch.optim.Optimizer)
    if name.lower() not in known:
        raise _unknown("optimizer", name, known, f"torch.optim has {', '.join(known)}")


# ------------------------------------------------------------------ run directories
def resumed_task_run(args, out: Path, fields: tuple[str, ...], settings_fields: tuple[str, ...],
                     resumable: tuple[str, ...], settings_cls, state_keys: tuple[str, ...],
                     kind: str):
    """The recorded ``TrainConfig`` and task settings of the run in ``out``, with the allowed
    changes (flags in ``resumable`` typed with a new value) applied and reported.

    Any other typed flag whose value differs from the recorded one is refused: it would make
    the run a different experiment. Returns ``(config, settings, changes)`` with ``changes``
    mapping each changed setting to ``[old, new]``.
    """
    import dataclasses
    import sys

    from torchcaps.train import TrainConfig

    manifest = out / "last.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {manifest} to resume from")
    try:
        meta = json.loads(manifest.read_text())
        cfg = TrainConfig(**{**meta["config"], "out": str(out), "overwrite": False})
        state = meta.get("task_state") or {}
        recorded = next(state[k] for k in state_keys if state.get(k) is not None)
        settings = settings_cls(**recorded)
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise ValueError(f"{manifest}: not a {kind} run manifest ({e})") from None
    given = [d for d in fields + settings_fields if d in args.given and hasattr(args, d)]

    def saved(d):
        return getattr(cfg, d) if hasattr(cfg, d) else getattr(settings, d, None)

    refused = [d for d in given if d not in resumable
               and json.dumps(getattr(args, d)) != json.dumps(saved(d))]
    if refused:
        raise ValueError(f"--resume continues the run recorded in {out}; these flags cannot "
                         f"change mid-run: {', '.join('--' + d.replace('_', '-') for d in refused)}")
    changes = {d: [getattr(cfg, d), getattr(args, d)] for d in given if d in resumable
               and getattr(cfg, d) != getattr(args, d)}
    for d, (old, new) in changes.items():
        print(f"resume: applying --{d.replace('_', '-')} {new} (was {old})", file=sys.stderr)
    cfg = dataclasses.replace(cfg, **{d: new for d, (_, new) in changes.items()})
    return cfg, settings, changes


def refuse_earlier_run(out: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``out`` holds a run and ``--overwrite`` was not given."""
    held = earlier_run(out)
    if held and not overwrite:
        raise FileExistsError(f"{out} already holds {held}; continue it with --resume, choose "
                              "another --out, or pass --overwrite to replace it")


def new_task_config(args, fields: tuple[str, ...], out: Path, **fixed):
    """A ``TrainConfig`` for a new run from the parsed flags named in ``fields``, after
    refusing to replace an earlier run and checking the optimiser name."""
    from torchcaps.train import TrainConfig

    refuse_earlier_run(out, args.overwrite)
    check_optimizer(args.optimizer)
    return TrainConfig(**{d: getattr(args, d) for d in fields if hasattr(args, d)}, **fixed,
                       out=str(out), overwrite=args.overwrite)


def earlier_run(out: Path) -> str | None:
    """Describe the run whose checkpoints ``out`` holds, or ``None`` when it holds none.

    Reads the manifest only (plain JSON), so the check costs nothing before training.
    """
    found = [f"{n}.json" for n in ("last", "best") if (out / f"{n}.json").is_file()]
    if not found:
        return None
    try:
        meta = json.loads((out / found[0]).read_text())
        what = f"a {meta['model']} run at step {meta['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        what = "an earlier run (its manifest is unreadable)"
    return f"{what} ({', '.join(found)})"
