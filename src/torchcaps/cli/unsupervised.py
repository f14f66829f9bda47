"""``torchcaps unsupervised train|codes``: sparse unsupervised capsules.

* ``train``: train :class:`~torchcaps.models.sparse_capsnet.SparseCapsNet` (Rawlinson,
  Ahmed, Kowadlo 2018) by reconstruction alone on MNIST digits placed at random on a 40x40
  canvas, select the checkpoint on a validation probe (a classifier fitted on the codes of
  fixed training digits), report probe accuracies on the translated and the regenerated
  affine test sets (:mod:`torchcaps.train.unsupervised`).
* ``codes``: encode a set with a checkpoint and write codes and labels to an ``.npz`` file
  for any downstream classifier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _args

#: the TrainConfig fields ``unsupervised train`` sets
FIELDS = ("model_kwargs", "dataset", "data_dir", "val_size", "split_seed", "epochs", "batch_size",
          "optimizer", "optimizer_kwargs", "lr", "lr_decay", "lr_decay_steps", "lr_min", "seed",
          "max_steps", "patience", "checkpoint_every", "log_every", "progress", "device",
          "deterministic", "threads", "precision", "force_precision", "nonfinite")
#: the SparseCapsuleSettings fields ``unsupervised train`` sets
SETTINGS = ("probe", "probe_train", "probe_val", "summary_train", "summary_probes",
            "probe_placement", "affine_size", "affine_copies", "test_seed")
#: model switches folded into model_kwargs
SWITCHES = ("sparsening", "boosting")
#: settings a resumed run may change
RESUMABLE = ("epochs", "max_steps", "progress", "device", "checkpoint_every", "nonfinite",
             "threads", "patience", "log_every", "force_precision")
PROBES = ("logistic", "linear_svm", "svm")  # torchcaps.train.unsupervised.PROBES


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model-kwargs", type=_args.json_object, default={}, metavar="JSON",
                   help='extra SparseCapsNet arguments as JSON, e.g. \'{"latent_caps": 24}\'')
    g.add_argument("--no-sparsening", dest="sparsening", action="store_false", default=True,
                   help="decode every latent capsule unmasked (the ablation)")
    g.add_argument("--no-boosting", dest="boosting", action="store_false", default=True,
                   help="rank mask without the boosting of starved capsules")
    _args.add_data(g, default="mnist", help="MNIST-like 28x28 digits, placed on a 40x40 canvas: "
                                             "mnist or the bundled mnist-mini")
    g.add_argument("--val-size", type=_args.positive_int, default=None, metavar="N",
                   help="validation images carved from training (default: the dataset's)")
    g.add_argument("--split-seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the train/validation carve")
    g = p.add_argument_group("probes and test sets")
    g.add_argument("--probe", choices=PROBES, default="logistic",
                   help="classifier of the validation probe that selects the checkpoint")
    g.add_argument("--probe-train", type=_args.positive_int, default=1000, metavar="N",
                   help="training digits the validation probe is fitted on")
    g.add_argument("--probe-val", type=_args.positive_int, default=None, metavar="N",
                   help="validation digits the probe is scored on (default: all)")
    g.add_argument("--summary-train", type=_args.positive_int, default=10000, metavar="N",
                   help="training digits the summary's classifiers are fitted on")
    g.add_argument("--summary-probes", nargs="+", choices=PROBES, default=["logistic", "svm"],
                   metavar="NAME", help=f"classifiers the summary scores ({', '.join(PROBES)})")
    g.add_argument("--probe-placement", choices=["random", "centre"], default="random",
                   help="probe training digits placed at random once, or centred (the release)")
    g.add_argument("--affine-size", type=_args.positive_int, default=None, metavar="N",
                   help="test digits warped into the affine test set (default: all)")
    g.add_argument("--affine-copies", type=_args.positive_int, default=1, metavar="N",
                   help="random warps per affine-test digit")
    g.add_argument("--test-seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the test placements (affine +1, validation +2, probe +3/+4)")
    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=_args.positive_int, default=10, metavar="N",
                   help="epochs (the release: 30,000 steps of 128, about 70 MNIST epochs)")
    g.add_argument("--max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="stop after this many steps in total (default: no limit)")
    g.add_argument("--patience", type=_args.positive_int, default=None, metavar="N",
                   help="stop after N validations without a better probe (default: off)")
    g = p.add_argument_group("optimisation")
    _args.add_batch_size(g, default=128)
    g.add_argument("--optimizer", default="adam", metavar="NAME",
                   help="any torch.optim class, by name in any case")
    g.add_argument("--optimizer-kwargs", type=_args.json_object, default={}, metavar="JSON",
                   help="extra optimizer arguments as JSON")
    g.add_argument("--lr", type=_args.learning_rate, default=1e-3, help="learning rate")
    g.add_argument("--lr-decay", type=_args.fraction, default=0.96, metavar="F",
                   help="factor applied per --lr-decay-steps (continuously)")
    g.add_argument("--lr-decay-steps", type=_args.positive_int, default=2000, metavar="N",
                   help="steps over which the rate decays by --lr-decay")
    g.add_argument("--lr-min", type=float, default=1e-6, metavar="LR",
                   help="floor of the learning rate")
    _args.add_seed(g)
    _args.add_run_directory(p, "run directory (default: runs/unsupervised-sparse, or -dense with "
                     "--no-sparsening)")
    _args.add_engine_runtime(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "unsupervised", formatter_class=_args.HelpFormatter,
        help="sparse unsupervised capsules: train, export codes",
        description="Sparse unsupervised capsules (Rawlinson, Ahmed, Kowadlo 2018): a CapsNet "
                    "trained by reconstruction alone with a rank mask and boosting, its codes "
                    "scored by classifiers on translated and affine digits.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", formatter_class=_args.HelpFormatter,
                       help="train on translated digits; report probe accuracies",
                       description="Train by reconstruction on digits placed at random on a "
                                   "40x40 canvas, select the checkpoint on a validation probe, "
                                   "score classifiers of its codes on the translated and the "
                                   "regenerated affine test sets.")
    _train_options(t)
    c = sub.add_parser("codes", formatter_class=_args.HelpFormatter,
                       help="write a set's codes and labels to an .npz file",
                       description="Encode a set with a checkpoint: arrays 'codes' (N, J*D) "
                                   "float32 and 'labels' (N,) int64, and 'info' (JSON text).")
    c.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their prefix")
    c.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the codes")
    c.add_argument("--dataset", default=None, metavar="NAME",
                   help="dataset (default: the run's); 28x28 digits are placed on the canvas")
    c.add_argument("--split", choices=["train", "val", "test", "affine"], default="test",
                   help="which set: test and affine are the run's translated and affine sets")
    c.add_argument("--placement", choices=["random", "centre"], default="random",
                   help="training digits only: placed at random or centred")
    c.add_argument("--seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the training digits' placement")
    c.add_argument("--limit", type=_args.positive_int, default=None, metavar="N",
                   help="encode only the first N images (default: all)")
    _args.add_batch_size(c, default=256)
    _args.add_data_dir(c)
    _args.add_device(c, "cpu")
    _args.add_threads(c)
    return p


# ---------------------------------------------------------------- train
def _model_kwargs(args, base: dict) -> dict:
    kwargs = dict(base)
    for switch in SWITCHES:
        if not getattr(args, switch, True):
            kwargs[switch] = False
    return kwargs


def _configs(args):
    from ..train.unsupervised import SparseCapsuleSettings, sparse_capsule_config

    out = Path(args.out or f"runs/unsupervised-{'sparse' if args.sparsening else 'dense'}")
    if args.resume:
        return _resumed(args, out)
    _args.refuse_earlier_run(out, args.overwrite)
    _args.check_optimizer(args.optimizer)
    fields = {d: getattr(args, d) for d in FIELDS if hasattr(args, d)}
    fields["model_kwargs"] = _model_kwargs(args, args.model_kwargs)
    cfg = sparse_capsule_config(**fields, out=str(out), overwrite=args.overwrite)
    settings = SparseCapsuleSettings(**{d: getattr(args, d) for d in SETTINGS if hasattr(args, d)})
    return cfg, settings, None


def _resumed(args, out: Path):
    import dataclasses

    from ..train import TrainConfig
    from ..train.unsupervised import SparseCapsuleSettings

    manifest = out / "last.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {manifest} to resume from")
    try:
        meta = json.loads(manifest.read_text())
        cfg = TrainConfig(**{**meta["config"], "out": str(out), "overwrite": False})
        settings = SparseCapsuleSettings(**(meta.get("task_state") or {})["sparse_capsules"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest}: not a sparse-capsule run manifest ({e})") from None
    given = [d for d in FIELDS + SETTINGS if d in args.given and hasattr(args, d)]
    saved = {d: getattr(cfg, d) if hasattr(cfg, d) else getattr(settings, d) for d in given}
    if "model_kwargs" in saved or any(s in args.given for s in SWITCHES):
        saved["model_kwargs"] = cfg.model_kwargs
        if "model_kwargs" not in given:
            given.append("model_kwargs")
    mine = {d: _model_kwargs(args, args.model_kwargs if "model_kwargs" in args.given
                             else cfg.model_kwargs) if d == "model_kwargs" else getattr(args, d)
            for d in given}
    refused = [d for d in given if d not in RESUMABLE
               and json.dumps(mine[d], sort_keys=True) != json.dumps(saved[d], sort_keys=True)]
    if refused:
        typed = {"model_kwargs": [f for f, d in (("--model-kwargs", "model_kwargs"),
                                                  ("--no-sparsening", "sparsening"),
                                                  ("--no-boosting", "boosting"))
                                  if d in args.given]}
        flags = ", ".join(", ".join(typed.get(d) or ["--" + d.replace("_", "-")])
                          for d in refused)
        raise ValueError(f"--resume continues the run recorded in {out}; these flags cannot "
                         f"change mid-run: {flags}")
    changes = {d: [saved[d], mine[d]] for d in given if d in RESUMABLE and saved[d] != mine[d]}
    for d, (old, new) in changes.items():
        print(f"resume: applying --{d.replace('_', '-')} {new} (was {old})", file=sys.stderr)
    cfg = dataclasses.replace(cfg, **{d: new for d, (_, new) in changes.items()})
    return cfg, settings, changes


def probe_table(summary: dict) -> str:
    """Probe accuracies as aligned lines: classifier, translated test, affine test."""
    rows = [f"{'classifier':<12}{'translated':>12}{'affine':>10}"]
    for kind, acc in summary["probes"].items():
        rows.append(f"{kind:<12}{100 * acc['translated']:>11.2f}%{100 * acc['affine']:>9.2f}%")
    return "\n".join(rows)


def _train(args) -> int:
    from ..runtime import configure_process
    from ..train.unsupervised import train_sparse_capsules

    cfg, settings, changes = _configs(args)
    configure_process(cfg.threads, cfg.deterministic)
    summary = train_sparse_capsules(cfg, settings, resume=args.resume, changes=changes)
    params = summary["parameters"]
    mode = "rank-mask sparsening" if summary["sparsening"] else "no sparsening (ablation)"
    print(f"sparse_capsnet ({mode}): {params['total']:,} parameters (encoder "
          f"{params['encoder']:,}, decoder {params['decoder']:,})")
    sizes = summary["sizes"]
    print(f"probe accuracies of the checkpoint chosen on validation (fitted on "
          f"{sizes['summary_train']} training digits; {sizes['translated_test']} translated, "
          f"{sizes['affine_test']} affine test digits):")
    print(probe_table(summary))
    print(f"-> {summary['checkpoint']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- codes
def _codes(args) -> int:
    import numpy as np

    from ..runtime import configure_process
    from ..train.unsupervised import export_codes

    configure_process(args.threads)
    res = export_codes(args.checkpoint, args.split, args.dataset, args.placement, args.seed,
                       args.limit, args.data_dir, args.batch_size, args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # exactly the name given (np.savez would append .npz)
        np.savez(f, codes=res["codes"], labels=res["labels"],
                 info=np.array(json.dumps(res["info"])))
    info = res["info"]
    print(f"wrote {out}: {info['count']} codes of {info['code_shape'][0]} x "
          f"{info['code_shape'][1]} ({info['dataset']} {info['split']}, {info['images']})")
    return 0


def run(args) -> int:
    return _train(args) if args.action == "train" else _codes(args)
