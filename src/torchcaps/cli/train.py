"""``torchcaps train``: train a model, or continue a recorded run with ``--resume``.

Every flag but ``--out``, ``--resume``, ``--overwrite``, ``--no-recipe`` and ``--seeds`` sets
the :class:`~torchcaps.train.TrainConfig` field of the same name. A new run takes each
setting from, in order: the flag when it is typed; the model's registered training recipe
(:func:`torchcaps.models.get_model_cfg`, unless ``--no-recipe``); the flag's default, which
is the config's own (``--epochs``: 3 for mnist-mini, 10 for mnist). One line on stderr lists
the recipe values applied.

``--seeds 0 1 2`` runs :func:`~torchcaps.train.train_seeds`: one run per seed in
``OUT/seed-N/``, skipping finished seeds and resuming interrupted ones, then ``OUT/seeds.json``
with the mean and sample standard deviation of the test metrics.

With ``--resume`` the run's recorded config is used (the recipe is not consulted again).
Flags in :data:`RESUMABLE` may be given to change it for the rest of the run (each change is
reported and recorded); any other flag whose value differs from the recorded one is refused,
since it would make the run a different experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _args

#: settings a resumed run may change (applied, reported on stderr, recorded in the manifest)
RESUMABLE = ("epochs", "max_steps", "progress", "device", "compile", "checkpoint_every",
             "nonfinite", "threads", "patience", "log_every", "force_precision")

#: the TrainConfig fields the command line sets; each flag's destination is the field's name
FIELDS = ("model", "model_kwargs", "dataset", "data_dir", "val_size", "epochs", "batch_size",
          "optimizer", "optimizer_kwargs", "lr", "lr_decay", "lr_decay_steps", "lr_milestones",
          "lr_gamma", "augment", "max_shift", "seed", "max_steps", "patience",
          "checkpoint_every", "log_every", "progress", "device", "deterministic", "threads",
          "precision", "force_precision", "compile", "nonfinite")

#: minutes per epoch of full MNIST, as the README's results table records them
_MNIST_EPOCH = {"capsnet": "about 15 minutes per epoch on 2 CPU cores"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", formatter_class=_args.HelpFormatter,
        help="train a model (default: capsnet on the bundled MNIST subset)",
        description="Train a model and report the test accuracy of the checkpoint chosen on "
                    "validation. With no arguments: capsnet, 3 epochs on the bundled MNIST "
                    "subset (about 3-4 minutes on 2 CPU cores). A model's training recipe "
                    "(`torchcaps models` shows it) sets what its paper or official code sets; "
                    "a flag you type overrides it, and the defaults below fill the rest.")

    g = p.add_argument_group("model and data")
    _args.add_model(g)
    g.add_argument("--no-recipe", dest="recipe", action="store_false", default=True,
                   help="ignore the model's training recipe: flags not typed take the "
                        "defaults shown here")
    _args.add_data(g)
    g.add_argument("--val-size", type=_args.positive_int, default=None, metavar="N",
                   help="validation images carved from training (default: the dataset's: "
                        "1000 for mnist-mini, 180 for digits, 2430 for smallnorb, 5000 for the "
                        "others; for your own data a tenth of the training images, at most 5000)")

    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=_args.positive_int, default=None, metavar="N",
                   help="epochs (default: 3 for mnist-mini, 10 for mnist)")
    g.add_argument("--max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="stop after this many steps in total (default: no limit)")
    g.add_argument("--patience", type=_args.positive_int, default=None, metavar="N",
                   help="stop early after N evaluations without a better validation "
                        "accuracy (default: off)")

    g = p.add_argument_group("optimisation")
    _args.add_batch_size(g)
    g.add_argument("--optimizer", default="adam", metavar="NAME",
                   help="any torch.optim class, by name in any case: adam, adamw, sgd, ...")
    g.add_argument("--optimizer-kwargs", type=_args.json_object, default={}, metavar="JSON",
                   help='extra optimizer arguments as JSON, e.g. \'{"momentum": 0.9}\'')
    g.add_argument("--lr", type=_args.learning_rate, default=1e-3,
                   help=f"learning rate, in (0, {_args.LR_LIMIT:g}]")
    g.add_argument("--lr-decay", type=_args.fraction, default=0.96, metavar="F",
                   help="factor applied per --lr-decay-steps (continuously)")
    g.add_argument("--lr-decay-steps", type=_args.positive_int, default=2000, metavar="N",
                   help="steps over which the rate decays by --lr-decay")
    g.add_argument("--lr-milestones", type=_args.positive_int, nargs="+", default=(),
                   metavar="STEP",
                   help="also multiply the rate by --lr-gamma at each of these step counts")
    g.add_argument("--lr-gamma", type=_args.fraction, default=0.1, metavar="F",
                   help="factor applied at each --lr-milestones step")
    seeds = g.add_mutually_exclusive_group()
    _args.add_seed(seeds)
    seeds.add_argument("--seeds", type=_args.seed, nargs="+", default=None, metavar="N",
                       help="train once per seed into OUT/seed-N/ and write OUT/seeds.json with "
                            "the mean and sample standard deviation of the test metrics; "
                            "running it again skips finished seeds and resumes the others")

    g = p.add_argument_group("augmentation")
    g.add_argument("--augment", choices=_args.AUGMENTATIONS, default="shift",
                   help="shift: random shift up to --max-shift px; efficient: the "
                        "Efficient-CapsNet rotate/shift/squish/erase pipeline; none; cifar: "
                        "4 px padding, random crop and horizontal flip; norb: random crop, "
                        "brightness and contrast (Hinton et al. 2018; with a cropN view, e.g. "
                        "--dataset smallnorb+resize48+crop32+standardize)")
    g.add_argument("--max-shift", type=_args.max_shift, default=2, metavar="PX",
                   help=f"random shift in pixels, 0 to {_args.MAX_SHIFT_LIMIT} (at most the "
                        "image size)")

    g = p.add_argument_group("run directory")
    _args.add_out(g, "run directory (default: runs/MODEL)")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its last checkpoint; only "
                           f"{', '.join(_flag(k, k != 'progress') for k in RESUMABLE)} may "
                           "change")
    once.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in --out (refused without it)")
    g.add_argument("--checkpoint-every", type=_args.nonneg_int, default=0, metavar="N",
                   help="also checkpoint every N steps (0: at epoch ends only)")
    g.add_argument("--log-every", type=_args.nonneg_int, default=0, metavar="N",
                   help="also write training metrics every N steps to steps.jsonl (0: off)")

    g = p.add_argument_group("runtime")
    _args.add_device(g, "auto")
    _args.add_threads(g, resumable=True)
    _args.add_precision(g)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward pass (pays on a GPU; the "
                        "checkpoint keeps plain weight names)")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=False,
                   help="do not compile (to stop compiling a resumed run)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (identical metrics across runs)")
    g.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="on a NaN/Inf loss or gradient: stop, or skip the batch")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")
    return p


def _flag(dest: str, value=True) -> str:
    """The command-line spelling of setting ``dest`` to ``value``."""
    name = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"--no-{name[2:]}"
    if isinstance(value, (list, tuple)):
        return f"{name} {' '.join(map(str, value))}"
    if isinstance(value, dict):
        return f"{name} '{json.dumps(value)}'"
    return f"{name} {value}"


def format_recipe(recipe: dict) -> str:
    """A recipe as one line: ``lr 0.0005, batch_size 16, lr_staircase on``."""
    return ", ".join(f"{k} {_shown(v)}" for k, v in recipe.items())


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "not set"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _same(dest: str, a, b) -> bool:
    """Whether two values of a setting are the same (JSON-normalised; names in any case)."""
    if dest == "optimizer" and isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()

    def norm(v):
        return json.loads(json.dumps(v))

    return norm(a) == norm(b)


def _resumed_config(args, out: Path):
    """The recorded config with the allowed changes applied, and those changes."""
    import dataclasses

    from ..train import TrainConfig

    manifest = out / "last.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {manifest} to resume from")
    try:
        saved = json.loads(manifest.read_text()).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{manifest}: unreadable manifest ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{manifest}: no training config recorded; cannot resume")
    try:
        recorded = TrainConfig(**{**saved, "out": str(out)})
    except TypeError as e:
        raise ValueError(f"{manifest}: training config not understood ({e})") from None

    given = [d for d in FIELDS if d in args.given]
    refused = [d for d in given if d not in RESUMABLE
               and not _same(d, getattr(args, d), getattr(recorded, d))]
    if refused:
        listed = ", ".join(f"{_flag(d, getattr(args, d))} (recorded: {_shown(getattr(recorded, d))})"
                           for d in refused)
        raise ValueError(f"--resume continues the run recorded in {out}; these flags cannot "
                         f"change mid-run: {listed}. Start a new run (another --out, or "
                         "--overwrite) to change them")
    changes = {d: [getattr(recorded, d), getattr(args, d)] for d in given
               if d in RESUMABLE and not _same(d, getattr(args, d), getattr(recorded, d))}
    for d, (old, new) in changes.items():
        print(f"resume: applying {_flag(d, new)} (was {_shown(old)})", file=sys.stderr)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    never = {"overwrite": False} if "overwrite" in fields else {}  # a resume replaces nothing
    cfg = dataclasses.replace(recorded, **{d: new for d, (_, new) in changes.items()}, **never)
    return cfg, changes


def _recipe(args) -> dict:
    """The model's recipe values that apply (those no typed flag overrides), reported on stderr."""
    from ..models import get_model_cfg

    if not args.recipe:
        return {}
    recipe = get_model_cfg(args.model).recipe_kwargs()
    applied = {k: v for k, v in recipe.items() if k not in args.given}
    typed = [_flag(k, getattr(args, k)) for k in recipe if k in args.given]
    if recipe:
        shown = format_recipe(applied) if applied else "nothing"
        print(f"recipe of {args.model}: {shown}"
              + (f" (typed instead: {', '.join(typed)})" if typed else ""), file=sys.stderr)
    return applied


def _new_config(args, out: Path):
    from ..train import TrainConfig

    _args.check_model(args.model)
    _args.check_optimizer(args.optimizer)
    settings = {d: getattr(args, d) for d in FIELDS if getattr(args, d) is not None}
    settings.update(_recipe(args))
    settings["lr_milestones"] = tuple(settings.get("lr_milestones", ()))
    return TrainConfig(**settings, out=str(out), overwrite=args.overwrite)


def _report(cfg, summary: dict) -> None:
    best = summary.get("best") or {}
    if "val_accuracy" in best:
        print(f"best checkpoint: epoch {best.get('epoch')} step {best.get('step')} "
              f"(validation accuracy {100 * best['val_accuracy']:.2f}%) -> {summary['checkpoint']}")
    by_steps = cfg.max_steps is not None or cfg.patience is not None  # may end before --epochs
    span = f"{summary['steps']} steps" if by_steps else f"{cfg.epochs} epochs"
    if cfg.dataset == "mnist-mini":
        where = f"the bundled {summary['test_total']:,}-image MNIST test subset"
    else:
        where = f"the {cfg.dataset} test set"
    print(f"test accuracy: {100 * summary['test_accuracy']:.2f}% "
          f"({summary['test_correct']}/{summary['test_total']}) on {where} after {span}")
    if cfg.dataset == "mnist-mini":
        pace = _MNIST_EPOCH.get(cfg.model)
        print("the full result (99%+) needs `torchcaps data mnist` and `--dataset mnist`"
              + (f" ({cfg.model}: {pace})" if pace else ""))


def _run_seeds(args, out: Path) -> int:
    from ..runtime import configure_process
    from ..train import train_seeds
    from ..train.seeds import SEEDS_FILE

    if args.resume:
        raise ValueError("--seeds resumes unfinished seeds by itself (and skips finished ones): "
                         "run the same command again, without --resume")
    cfg = _new_config(args, out)
    configure_process(cfg.threads, cfg.deterministic)
    report = train_seeds(cfg, args.seeds)
    for r in report["runs"]:
        s = r["summary"]
        print(f"seed {r['seed']}: test accuracy {100 * s['test_accuracy']:.2f}% "
              f"({s['test_correct']}/{s['test_total']}), {r['status']} -> {r['out']}")
    n, mean, std = len(report["runs"]), report["mean"]["test_accuracy"], report["std"]["test_accuracy"]
    spread = "" if std is None else f" ± {100 * std:.2f}"
    print(f"test accuracy: {100 * mean:.2f}{spread}% over {n} seed{'s' if n > 1 else ''}")
    print(f"wrote {out / SEEDS_FILE}")
    return 0


def run(args) -> int:
    from ..runtime import configure_process
    from ..train import train

    out = Path(args.out or f"runs/{args.model}")
    if args.seeds is not None:
        return _run_seeds(args, out)
    if args.resume:
        cfg, changes = _resumed_config(args, out)
    else:
        _args.refuse_earlier_run(out, args.overwrite)
        cfg, changes = _new_config(args, out), None
    configure_process(cfg.threads, cfg.deterministic)
    summary = train(cfg, resume=args.resume, changes=changes)
    _report(cfg, summary)
    return 0
