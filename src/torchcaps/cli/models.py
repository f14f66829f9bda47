"""``torchcaps models``: the registered models with their parameter counts (classifiers also
with their training recipe, the paper's figures and their pretrained weights), and the
routings."""

from __future__ import annotations

import argparse

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", formatter_class=_args.HelpFormatter,
        help="list registered models (and routing algorithms)",
        description="List the registered models with their parameter counts (classifiers at "
                    "1x28x28, 10 classes, with and without the reconstruction decoder, then "
                    "their training recipe, what their paper reports and their pretrained "
                    "weights; segmentation models for 1 channel, 2 classes; generative pairs "
                    "as generator and discriminator; unsupervised models) and the registered "
                    "routing algorithms.")
    p.add_argument("pattern", nargs="?", default=None,
                   help="glob filter, e.g. 'caps*' (default: every model)")
    p.add_argument("--task", choices=["classification", "segmentation", "generation",
                                      "unsupervised", "all"],
                   default="all",
                   help="which models to list")
    return p


def run(args) -> int:
    from ..models import create_model, get_model_cfg, list_models
    from ..models.pretrained import get_pretrained, list_pretrained
    from ..routing import list_routings
    from .train import format_recipe

    if args.task in ("classification", "all"):
        print(f"{'classifier':<20}{'parameters':>14}{'without decoder':>18}")
        for name in list_models(args.pattern):
            named = list(create_model(name).named_parameters())
            n = sum(p.numel() for _, p in named)
            n_body = sum(p.numel() for k, p in named if not k.startswith("decoder."))
            print(f"{name:<20}{n:>14,}{n_body:>18,}")
            cfg = get_model_cfg(name)
            recipe = format_recipe(cfg.recipe_kwargs()) or "none (the defaults of torchcaps train)"
            print(f"    recipe: {recipe}")
            for dataset, figure in cfg.paper.items():
                print(f"    paper ({dataset}): {figure}")
            for weights in list_pretrained(name):
                rec = get_pretrained(weights)
                print(f"    pretrained: {weights}, {100 * rec.accuracy['test']:.2f}% on "
                      f"{rec.dataset} test (create_model({name!r}, pretrained=True))")
    if args.task in ("segmentation", "all"):
        print(f"{'segmentation model':<20}{'parameters':>14}  input")
        for name in list_models(args.pattern, task="segmentation"):
            model = create_model(name, in_channels=1, num_classes=2)
            n = sum(p.numel() for p in model.parameters())
            shape = "(B, 1, " + ", ".join(["D", "H", "W"][-model.spatial_dims:]) + ")"
            print(f"{name:<20}{n:>14,}  {shape}, sizes multiples of {model.size_multiple}")
    if args.task in ("generation", "all"):
        print(f"{'generative pair':<24}{'generator':>12}{'discriminator':>15}{'total':>12}")
        for name in list_models(args.pattern, task="generation"):
            c = create_model(name).parameter_counts()
            print(f"{name:<24}{c['generator']:>12,}{c['discriminator']:>15,}{c['total']:>12,}")
    if args.task in ("unsupervised", "all"):
        print(f"{'unsupervised model':<24}{'parameters':>12}")
        for name in list_models(args.pattern, task="unsupervised"):
            n = sum(p.numel() for p in create_model(name).parameters())
            print(f"{name:<24}{n:>12,}")
    print("routing algorithms: " + ", ".join(list_routings()))
    return 0
