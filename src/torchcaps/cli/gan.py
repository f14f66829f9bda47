"""``torchcaps gan train|sample|score``: generative adversarial networks with capsules.

* ``train``: train a generative pair (``list_models(task="generation")``: dcgan,
  capsule_gan, capsule_generator_gan, capsule_both_gan) on the training engine, select the
  checkpoint on the validation Frechet distance, report FD, precision, recall and the
  confident-label share on the test images (:mod:`torchcaps.train.gan`).
* ``sample``: write a grid of generated images (of one class, or of each class in turn).
* ``score``: FD, precision, recall and confident share of a checkpoint's images.

Scores are computed in the feature space of a small classifier trained once per dataset
and cached under the data directory (:mod:`torchcaps.evaluation.generative`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _args

#: the TrainConfig fields ``gan train`` sets
FIELDS = ("model", "model_kwargs", "dataset", "data_dir", "val_size", "split_seed", "epochs",
          "batch_size", "optimizer", "optimizer_kwargs", "lr", "lr_decay", "lr_decay_steps",
          "seed", "max_steps", "patience", "checkpoint_every", "log_every", "progress", "device",
          "deterministic", "threads", "precision", "force_precision", "nonfinite")
#: the GANSettings fields ``gan train`` sets
SETTINGS = ("latent_dim", "conditional", "d_steps", "score_samples", "test_samples", "grid", "k",
            "eval_seed", "classifier_epochs", "classifier_max_steps")
#: settings a resumed run may change
RESUMABLE = ("epochs", "max_steps", "progress", "device", "checkpoint_every", "nonfinite",
             "threads", "patience", "log_every", "force_precision")
#: the DCGAN optimiser settings (Radford et al. 2016)
DCGAN_BETAS = {"betas": [0.5, 0.999]}


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    _args.add_model(g, default="capsule_gan")
    _args.add_data(g, default="mnist-mini")
    g.add_argument("--val-size", type=_args.positive_int, default=None, metavar="N",
                   help="validation images carved from training (default: the dataset's)")
    g.add_argument("--split-seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the train/validation carve")
    g = p.add_argument_group("GAN")
    g.add_argument("--latent-dim", type=_args.positive_int, default=100, metavar="N",
                   help="size of the generator's latent")
    g.add_argument("--conditional", action="store_true",
                   help="class-conditional generator and discriminator")
    g.add_argument("--d-steps", type=_args.positive_int, default=1, metavar="N",
                   help="discriminator updates per generator update")
    g.add_argument("--score-samples", type=_args.positive_int, default=1000, metavar="N",
                   help="generated and validation images scored after each epoch")
    g.add_argument("--test-samples", type=_args.positive_int, default=2000, metavar="N",
                   help="generated and test images scored at the end")
    g.add_argument("--grid", type=_args.positive_int, default=64, metavar="N",
                   help="images in the run's samples.png")
    g.add_argument("--k", type=_args.positive_int, default=3, metavar="N",
                   help="neighbours of the precision/recall manifolds")
    g.add_argument("--eval-seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the fixed latents that are scored")
    g.add_argument("--classifier-epochs", type=_args.positive_int, default=3, metavar="N",
                   help="epochs of the feature classifier, trained once per dataset and cached")
    g.add_argument("--classifier-max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="also stop the feature classifier's training after N steps "
                        "(default: no limit)")
    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=_args.positive_int, default=5, metavar="N", help="epochs")
    g.add_argument("--max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="stop after this many steps in total (default: no limit)")
    g.add_argument("--patience", type=_args.positive_int, default=None, metavar="N",
                   help="stop after N validations without a lower FD (default: off)")
    g = p.add_argument_group("optimisation")
    _args.add_batch_size(g, default=64, help="real images per step (and as many generated)")
    g.add_argument("--optimizer", default="adam", metavar="NAME",
                   help="any torch.optim class, by name in any case; one for each network")
    g.add_argument("--optimizer-kwargs", type=_args.json_object, default=DCGAN_BETAS,
                   metavar="JSON", help="extra optimizer arguments as JSON")
    g.add_argument("--lr", type=_args.learning_rate, default=2e-4, help="learning rate of both")
    g.add_argument("--lr-decay", type=_args.fraction, default=1.0, metavar="F",
                   help="factor applied per --lr-decay-steps (continuously)")
    g.add_argument("--lr-decay-steps", type=_args.positive_int, default=1000, metavar="N",
                   help="steps over which the rate decays by --lr-decay")
    _args.add_seed(g)
    _args.add_run_directory(p, "run directory (default: runs/gan-MODEL)")
    _args.add_engine_runtime(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gan", formatter_class=_args.HelpFormatter,
        help="generative adversarial networks: train, sample, score",
        description="DCGAN and capsule GANs (CapsuleGAN's capsule discriminator, a capsule "
                    "generator, both) on the training engine, scored by Frechet distance, "
                    "precision and recall in a classifier's feature space.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", formatter_class=_args.HelpFormatter,
                       help="train a generative pair; report test FD, precision, recall",
                       description="Train adversarially, select the checkpoint on the "
                                   "validation Frechet distance, score the test images and "
                                   "write samples.png and curves.png into the run directory.")
    _train_options(t)
    s = sub.add_parser("sample", formatter_class=_args.HelpFormatter,
                       help="write a grid of generated images",
                       description="Generate images with a checkpoint and write them as one "
                                   "PNG grid.")
    s.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their prefix")
    s.add_argument("--out", required=True, metavar="FILE.png", help="where to write the grid")
    s.add_argument("--num", type=_args.positive_int, default=64, metavar="N", help="images")
    s.add_argument("--label", type=_args.nonneg_int, default=None, metavar="K",
                   help="class-conditional models: only class K (default: each class in turn, "
                        "one class per column)")
    s.add_argument("--seed", type=_args.seed, default=0, metavar="N", help="seed of the latents")
    _args.add_device(s, "cpu")
    c = sub.add_parser("score", formatter_class=_args.HelpFormatter,
                       help="FD, precision, recall and confident share of a checkpoint",
                       description="Score a checkpoint's generated images against the images "
                                   "of its run's dataset, as the run's summary does.")
    c.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their prefix")
    c.add_argument("--split", choices=["test", "val"], default="test", help="which real images")
    c.add_argument("--num", type=_args.positive_int, default=None, metavar="N",
                   help="generated and real images scored (default: the run's)")
    c.add_argument("--seed", type=_args.seed, default=None, metavar="N",
                   help="seed of the scored latents (default: the run's, which reproduces "
                        "its summary)")
    _args.add_data_dir(c)
    _args.add_device(c, "cpu")
    _args.add_threads(c)
    _args.add_json(c)
    return p


# ---------------------------------------------------------------- train
def _check_generation_model(name: str) -> None:
    from ..models import gan as _registers  # noqa: F401
    from ..models import list_models

    known = list_models(task="generation")
    if name in list_models(task=None) and name not in known:
        raise ValueError(f"{name} is not a generative model; `torchcaps gan` trains: "
                         f"{', '.join(known)}")
    if name not in known:
        raise _args._unknown("generative model", name, known,
                             f"the generative models are {', '.join(known)}")


def _configs(args):
    from ..train.gan import GANSettings

    out = Path(args.out or f"runs/gan-{args.model}")
    if args.resume:
        return _resumed(args, out)
    _check_generation_model(args.model)
    cfg = _args.new_task_config(args, FIELDS, out, augment="none")
    settings = GANSettings(**{d: getattr(args, d) for d in SETTINGS if hasattr(args, d)})
    return cfg, settings, None


def _resumed(args, out: Path):
    from ..train.gan import GANSettings

    return _args.resumed_task_run(args, out, FIELDS, SETTINGS, RESUMABLE, GANSettings, ("gan",),
                                  "GAN")


def score_table(scores: dict) -> str:
    """The scores as aligned ``name value`` lines."""
    rows = [("Frechet distance", scores["fd"], ".4f"), ("precision", scores["precision"], ".4f"),
            ("recall", scores["recall"], ".4f"), ("confident share", scores["confident"], ".4f")]
    if "label_agreement" in scores:
        rows.append(("label agreement", scores["label_agreement"], ".4f"))
    return "\n".join(f"{name:<18}{format(v, fmt) if v == v else '-':>10}" for name, v, fmt in rows)


def _train(args) -> int:
    from ..runtime import configure_process
    from ..train.gan import train_gan

    cfg, settings, changes = _configs(args)
    configure_process(cfg.threads, cfg.deterministic)
    summary = train_gan(cfg, settings, resume=args.resume, changes=changes)
    params = summary["parameters"]
    print(f"{cfg.model}: {params['total']:,} parameters (generator {params['generator']:,}, "
          f"discriminator {params['discriminator']:,})")
    print(f"test scores of the checkpoint chosen on validation FD ({summary['test_samples']} "
          f"generated vs {summary['test_samples']} test images):")
    print(score_table(summary["test"]))
    print(f"-> {summary['checkpoint']}; samples {summary.get('samples_png')}, curves "
          f"{summary.get('curves_png')}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- sample / score
def _sample(args) -> int:
    import torch

    from ..evaluation.generative import save_image_grid
    from ..train.gan import load_gan

    pair, meta = load_gan(args.checkpoint, args.device)
    k = pair.num_classes
    if args.label is not None and not k:
        raise ValueError(f"{meta['model']} in {args.checkpoint} is unconditional: --label needs a "
                         "model trained with --conditional")
    if args.label is not None and args.label >= k:
        raise ValueError(f"--label {args.label}: the model has classes 0 to {k - 1}")
    labels = None
    if k:
        labels = (torch.full((args.num,), args.label) if args.label is not None
                  else torch.arange(args.num) % k)
    images = pair.sample(args.num, labels, torch.Generator().manual_seed(args.seed))
    nrow = k if k and args.label is None else 8
    path = save_image_grid(args.out, images, nrow=nrow)
    what = f"class {args.label}" if args.label is not None else (
        f"classes 0-{k - 1} by column" if k else "unconditional")
    print(f"wrote {path}: {args.num} images of {meta['model']} ({what})")
    return 0


def _score(args) -> int:
    from ..runtime import configure_process
    from ..train.gan import score_checkpoint

    configure_process(args.threads)
    res = score_checkpoint(args.checkpoint, args.split, args.num, args.seed, args.data_dir,
                           args.device, args.threads)
    print(f"{res['model']} on {res['dataset']} {res['split']}: {res['samples']} generated vs "
          f"{res['samples']} real images (latent seed {res['eval_seed']})")
    print(score_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def run(args) -> int:
    if args.action == "train":
        return _train(args)
    return _sample(args) if args.action == "sample" else _score(args)
