"""``torchcaps segment train|pretrain|evaluate|predict``: 2D and 3D segmentation.

* ``train``: train a segmentation model (``torchcaps models --task segmentation``) on
  patches of labelled volumes, select on validation Dice, report test Dice and HD95 per
  class (:mod:`torchcaps.train.segmentation`).
* ``pretrain``: self-supervised pretraining of a capsule encoder on unlabelled volumes;
  ``train --pretrained RUN/best`` fine-tunes from it.
* ``evaluate``: score a checkpoint on its run's validation or test volumes: the Dice table,
  HD95, and PNG overlays of image, truth and prediction.
* ``predict``: segment a NIfTI volume, write the label map as NIfTI (same affine) and a PNG
  overlay.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _args

#: the TrainConfig fields these commands set (same flags as ``torchcaps train``)
FIELDS = ("model", "model_kwargs", "dataset", "data_dir", "epochs", "batch_size", "optimizer",
          "optimizer_kwargs", "lr", "lr_decay", "lr_decay_steps", "seed", "split_seed",
          "max_steps", "patience", "checkpoint_every", "log_every", "progress", "device",
          "deterministic", "threads", "precision", "force_precision", "nonfinite")
#: the SegmentationSettings fields these commands set
SETTINGS = ("patch", "pool", "fraction", "samples_per_epoch", "spacing", "split", "overlap",
            "sw_batch_size", "augment", "pretrained")
#: settings a resumed run may change
RESUMABLE = ("epochs", "max_steps", "progress", "device", "checkpoint_every", "nonfinite",
             "threads", "patience", "log_every", "force_precision")
DATA_HELP = ("mni152 (the MNI152 tissue benchmark: grey matter, white matter, other; fetched "
             "once with `torchcaps data mni152`), shapes (generated volumes, no files), or "
             "nifti:DIR (your volumes: DIR/imagesTr/*.nii.gz with label maps of the same names "
             "in DIR/labelsTr, optionally DIR/imagesTs + DIR/labelsTs as the test split)")


def _training_options(p: argparse.ArgumentParser, default_model: str, pretext: bool) -> None:
    g = p.add_argument_group("model and data")
    _args.add_model(g, default=default_model)
    _args.add_data(g, default="mni152", help=DATA_HELP)
    g.add_argument("--spacing", type=int, choices=[1, 2], default=2,
                   help="mni152: voxel size in millimetres")
    g.add_argument("--split", choices=["axial", "hemisphere"], default=None,
                   help="mni152: how the volume is cut into train/val/test regions "
                        "(default: the benchmark's, see docs/segmentation.md)")
    g.add_argument("--split-seed", type=_args.seed, default=0, metavar="N",
                   help="seed of the training patch pool")
    g.add_argument("--patch", type=_args.positive_int, nargs="+", default=None, metavar="N",
                   help="training and inference window: D H W for 3D models, H W for 2D "
                        "(default: 32 32 32 or 64 64)")
    g.add_argument("--pool", type=_args.positive_int, default=512, metavar="N",
                   help="class-balanced training patches drawn once from the training volumes")
    if not pretext:
        g.add_argument("--fraction", type=_args.fraction, default=1.0, metavar="F",
                       help="train on this share of the patch pool (label efficiency)")
        g.add_argument("--pretrained", default=None, metavar="CHECKPOINT",
                       help="start from the encoder of a `segment pretrain` run (RUN/best)")
    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=_args.positive_int, default=10, metavar="N", help="epochs")
    g.add_argument("--samples-per-epoch", type=_args.positive_int, default=256, metavar="N",
                   help="training patches per epoch (one validation per epoch)")
    g.add_argument("--max-steps", type=_args.positive_int, default=None, metavar="N",
                   help="stop after this many steps in total (default: no limit)")
    g.add_argument("--patience", type=_args.positive_int, default=None, metavar="N",
                   help="stop after N validations without improvement (default: off)")
    g = p.add_argument_group("optimisation")
    _args.add_batch_size(g, default=4, help="patches per batch")
    g.add_argument("--optimizer", default="adam", metavar="NAME",
                   help="any torch.optim class, by name in any case")
    g.add_argument("--optimizer-kwargs", type=_args.json_object, default={}, metavar="JSON",
                   help='extra optimizer arguments as JSON, e.g. \'{"weight_decay": 2e-6}\'')
    g.add_argument("--lr", type=_args.learning_rate, default=2e-4, help="learning rate")
    g.add_argument("--lr-decay", type=_args.fraction, default=1.0, metavar="F",
                   help="factor applied per --lr-decay-steps (continuously)")
    g.add_argument("--lr-decay-steps", type=_args.positive_int, default=1000, metavar="N",
                   help="steps over which the rate decays by --lr-decay")
    _args.add_seed(g)
    g.add_argument("--no-augment", dest="augment", action="store_false", default=True,
                   help="no flips or intensity jitter on training patches")
    g = p.add_argument_group("inference")
    g.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, [0, 1)")
    g.add_argument("--sw-batch-size", type=_args.positive_int, default=4, metavar="N",
                   help="windows per inference batch")
    _args.add_run_directory(p, "run directory (default: runs/segment-MODEL or runs/pretrain-MODEL)")
    _args.add_engine_runtime(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment", formatter_class=_args.HelpFormatter,
        help="2D/3D segmentation: train, pretrain, evaluate, predict",
        description="Segmentation of images and volumes with capsule networks (SegCaps, "
                    "3D-UCaps) and UNet baselines, on the training engine.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", formatter_class=_args.HelpFormatter,
                       help="train a segmentation model; report test Dice",
                       description="Train on class-balanced patches, select the checkpoint on "
                                   "validation Dice (whole volumes, sliding windows), report "
                                   "Dice and HD95 per class on the test volumes.")
    _training_options(t, "segcaps", pretext=False)
    t = sub.add_parser("pretrain", formatter_class=_args.HelpFormatter,
                       help="self-supervised pretraining of a capsule encoder",
                       description="Pretrain a model's capsule encoder on unlabelled volumes "
                                   "(the pretext task of SS-3DCapsNet); fine-tune with "
                                   "`segment train --pretrained RUN/best`. The test region "
                                   "of the benchmark is never used.")
    _training_options(t, "ucaps3d", pretext=True)
    e = sub.add_parser("evaluate", formatter_class=_args.HelpFormatter,
                       help="Dice/HD95 table and overlay PNGs of a checkpoint",
                       description="Score a segmentation checkpoint on its run's volumes.")
    e.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their prefix")
    e.add_argument("--split", choices=["test", "val"], default="test", help="which volumes")
    _args.add_data_dir(e)
    _args.add_out(e, "folder for the overlays and metrics.json (default: eval-SPLIT beside "
                     "the checkpoint)")
    e.add_argument("--no-plots", action="store_true", help="no overlay PNGs")
    _args.add_json(e)
    _args.add_device(e, "cpu")
    r = sub.add_parser("predict", formatter_class=_args.HelpFormatter,
                       help="segment a NIfTI volume; write NIfTI and PNG",
                       description="Segment a volume (.nii or .nii.gz) with a checkpoint and "
                                   "write the label map as NIfTI with the input's affine, plus "
                                   "a PNG overlay. The volume must have the voxel size the "
                                   "model was trained at.")
    r.add_argument("checkpoint", help="a checkpoint: .json, .safetensors, or their prefix")
    r.add_argument("image", help="the volume to segment (.nii or .nii.gz)")
    r.add_argument("--output", required=True, metavar="FILE.nii.gz",
                   help="where to write the label map")
    r.add_argument("--png", default=None, metavar="FILE.png", help="also write an overlay here")
    _args.add_device(r, "cpu")
    return p


# ---------------------------------------------------------------- train / pretrain
def _configs(args, pretext: bool):
    from ..train import SegmentationSettings

    out = Path(args.out or f"runs/{'pretrain' if pretext else 'segment'}-{args.model}")
    if args.resume:
        return _resumed(args, out)
    _check_segmentation_model(args.model)
    cfg = _args.new_task_config(args, FIELDS, out, augment="none")
    settings = SegmentationSettings(**{d: getattr(args, d) for d in SETTINGS if hasattr(args, d)})
    return cfg, settings, None


def _check_segmentation_model(name: str) -> None:
    from ..models import list_models

    known = list_models(task="segmentation")
    if name in list_models(task="classification"):
        raise ValueError(f"{name} is a classifier; `torchcaps segment` trains the segmentation "
                         f"models: {', '.join(known)}")
    if name not in known:
        raise _args._unknown("segmentation model", name, known,
                             "`torchcaps models --task segmentation` lists them")


def _resumed(args, out: Path):
    from ..train import SegmentationSettings

    return _args.resumed_task_run(args, out, FIELDS, SETTINGS, RESUMABLE, SegmentationSettings,
                                  ("segmentation", "pretext"), "segmentation")


def _run_training(args, pretext: bool) -> int:
    from ..runtime import configure_process
    from ..train import train_segmentation
    from ..train.segmentation import pretrain_encoder

    cfg, settings, changes = _configs(args, pretext)
    configure_process(cfg.threads, cfg.deterministic)
    run = pretrain_encoder if pretext else train_segmentation
    summary = run(cfg, settings, resume=args.resume, changes=changes)
    if pretext:
        best = summary.get("best") or {}
        print(f"pretext: best validation loss {best.get('val_loss', float('nan')):.5f} at epoch "
              f"{best.get('epoch')} -> {summary.get('checkpoint')}")
        print(f"fine-tune with: torchcaps segment train --model {cfg.model} --pretrained "
              f"{cfg.out}/best")
    else:
        print(dice_table(summary["class_names"], summary["test"]))
        print(f"test mean foreground Dice {summary['test']['mean_dice']:.4f} with the checkpoint "
              f"chosen on validation -> {summary['checkpoint']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def dice_table(class_names, metrics: dict) -> str:
    """A plain-text table: class, Dice, HD95."""
    lines = [f"{'class':<16}{'Dice':>8}{'HD95':>9}"]
    for name in class_names:
        key = name.replace(" ", "_")
        dice, hd = metrics.get(f"dice_{key}"), metrics.get(f"hd95_{key}")
        lines.append(f"{name:<16}{_num(dice, '.4f'):>8}{_num(hd, '.2f'):>9}")
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


# ---------------------------------------------------------------- evaluate / predict
def _load(checkpoint: str, device: str):
    from ..models import model_task
    from ..train import build_model_from_checkpoint

    model, meta = build_model_from_checkpoint(checkpoint, device)
    if model_task(meta["model"]) != "segmentation":
        raise ValueError(f"{checkpoint} holds a {meta['model']} classifier; use `torchcaps "
                         "evaluate` for it")
    return model, meta


def _evaluate(args) -> int:
    from ..data.segmentation import load_segmentation_data
    from ..evaluation.segmentation import evaluate_segmentation, predict_volume
    from ..train import SegmentationSettings
    from ..train.segmentation import default_patch

    model, meta = _load(args.checkpoint, args.device)
    cfg = meta.get("config") or {}
    settings = SegmentationSettings(**((meta.get("task_state") or {}).get("segmentation") or {}))
    data = load_segmentation_data(cfg.get("dataset", "mni152"), args.data_dir or cfg.get("data_dir"),
                                  spacing=settings.spacing, split=settings.split)
    patch = settings.patch or default_patch(model.spatial_dims)
    items = data.split(args.split)
    res = evaluate_segmentation(model, items, data.num_classes, patch, spacing=data.spacing,
                                overlap=settings.overlap, sw_batch_size=settings.sw_batch_size)
    flat = {"mean_dice": res["mean_dice"]}
    for k, name in enumerate(data.class_names):
        flat[f"dice_{name.replace(' ', '_')}"] = res["dice"][k]
        flat[f"hd95_{name.replace(' ', '_')}"] = res["hd95"][k]
    print(dice_table(data.class_names, flat))
    print(f"{args.split}: mean foreground Dice {res['mean_dice']:.4f} over {res['voxels']:,} voxels")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "dataset": data.name,
              "class_names": list(data.class_names), **flat}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plots:
        from ..viz.overlay import save_overlay_png

        for i, item in enumerate(items):
            pred = predict_volume(model, item.image, patch, settings.overlap).argmax(0)
            path = out / f"overlay-{i}.png"
            save_overlay_png(path, item.image[0].numpy(), item.labels.numpy(), pred.numpy(),
                             class_names=data.class_names)
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _predict(args) -> int:
    import torch

    from ..data.segmentation import unit_intensity
    from ..data.volumes import read_volume, write_volume
    from ..evaluation.segmentation import predict_volume
    from ..train import SegmentationSettings
    from ..train.segmentation import default_patch

    model, meta = _load(args.checkpoint, args.device)
    settings = SegmentationSettings(**((meta.get("task_state") or {}).get("segmentation") or {}))
    vol = read_volume(args.image)
    arr = vol.array if vol.array.ndim == 4 else vol.array[None]
    if arr.shape[0] != model.in_channels:
        raise ValueError(f"{args.image} has {arr.shape[0]} channel(s) but the model takes "
                         f"{model.in_channels}")
    image = unit_intensity(torch.as_tensor(arr).float())
    patch = settings.patch or default_patch(model.spatial_dims)
    pred = predict_volume(model, image, patch, settings.overlap).argmax(0).numpy().astype("uint8")
    write_volume(args.output, pred, vol.affine)
    counts = {int(k): int((pred == k).sum()) for k in range(model.num_classes)}
    print(f"wrote {args.output}: {pred.shape} voxels, per class {counts}")
    if args.png:
        from ..viz.overlay import save_overlay_png

        save_overlay_png(args.png, image[0].numpy(), pred)  # the prediction as the overlay
        print(f"wrote {args.png}")
    return 0


def run(args) -> int:
    if args.action in ("train", "pretrain"):
        return _run_training(args, pretext=args.action == "pretrain")
    return _evaluate(args) if args.action == "evaluate" else _predict(args)
