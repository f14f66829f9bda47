"""Train every registered classifier with the same data pipeline and validation-based
selection, and write one comparison table (JSON) with parameters, test accuracy, epochs,
minutes, and training / inference images/s.

    python benchmarks/zoo.py --dataset mnist --epochs 1
    python benchmarks/zoo.py --models capsnet efficient_capsnet --dataset mnist-mini --max-steps 20
    python benchmarks/zoo.py --models em_capsnet --recipe '{"lr_milestones": [6876]}'

Each model trains with the recipe registered with it (``get_model_cfg(name).recipe``, shown
by ``torchcaps models``: each paper's or official code's settings where it gives them, with
the source beside each value in the model's module); ``--recipe`` sets TrainConfig fields
over it (each key replaces the recipe's value, ``model_kwargs`` as a whole). Every row
records the recipe it ran with and the paper's MNIST figure. Everything else (data, split,
shifts, seed, selection on validation) is shared. Results are single-seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torchcaps
from torchcaps.bench import machine_info, measure_throughput
from torchcaps.cli._args import json_object
from torchcaps.models import get_model_cfg
from torchcaps.train import TrainConfig, resolve_device, train

RESULTS = Path(__file__).parent / "results"

#: TrainConfig fields that ``--recipe`` may not set (the command line sets them for every model)
_NOT_RECIPE = {"model", "dataset", "epochs", "max_steps", "seed", "out", "progress", "threads",
               "checkpoint_every"}


def _recipe(text: str) -> dict:
    """``--recipe``: a JSON object of TrainConfig settings, checked against the field names."""
    value = json_object(text)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - _NOT_RECIPE
    unknown = sorted(set(value) - fields)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"cannot set {', '.join(unknown)} (recipe settings: {', '.join(sorted(fields))})")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--out", default="runs/zoo")
    p.add_argument("--json", default=str(RESULTS / "zoo.json"))
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps, so --resume can continue mid-epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue a model's run from OUT/MODEL/last.safetensors when it exists "
                        "(exact resume: same result as one uninterrupted run of --epochs)")
    p.add_argument("--recipe", type=_recipe, default={}, metavar="JSON",
                   help="TrainConfig settings over each model's recipe (a key replaces the "
                        "recipe's value), e.g. '{\"lr\": 1e-3, \"lr_milestones\": [6876]}'")
    p.add_argument("--note", default=None,
                   help="recorded beside the machine, e.g. where earlier epochs of a resumed run ran")
    a = p.parse_args()
    rows = []
    out = {"dataset": a.dataset, "command": "python " + shlex.join(sys.argv),
           "machine": machine_info(), "single_seed": True, "rows": rows}
    if a.note:
        out["note"] = a.note
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    for name in a.models or torchcaps.list_models():
        model_cfg = get_model_cfg(name)
        recipe = {**model_cfg.recipe_kwargs(), **a.recipe}
        cfg = TrainConfig(model=name, dataset=a.dataset, epochs=a.epochs, max_steps=a.max_steps,
                          seed=a.seed, out=f"{a.out}/{name}", progress=False, threads=a.threads,
                          checkpoint_every=a.checkpoint_every,
                          **recipe)
        resumed = a.resume and (Path(cfg.out) / "last.safetensors").exists()
        t0 = time.perf_counter()
        summary = train(cfg, resume=resumed)
        minutes = (time.perf_counter() - t0) / 60
        model = torchcaps.create_model(name, **cfg.model_kwargs)
        device = str(resolve_device(cfg.device))  # measured where it trained
        speed = {m: measure_throughput(name, m, batch_size=cfg.batch_size, warmup=2, repeats=3,
                                       steps=1, model_kwargs=cfg.model_kwargs,
                                       device=device)["images_per_s"]
                 for m in ("train", "infer")}
        row = {"model": name, "parameters": sum(q.numel() for q in model.parameters()),
               "test_accuracy": summary["test_accuracy"], "best": summary["best"],
               "steps": summary["steps"], "epochs": a.epochs, "max_steps": a.max_steps,
               "wall_minutes": round(minutes, 2), "resumed": resumed,
               "train_minutes": round(summary["train_seconds"] / 60, 2),
               "train_images_per_s": speed["train"], "infer_images_per_s": speed["infer"],
               "device": device, "recipe": recipe, "seeds": [a.seed],
               "paper_mnist": model_cfg.paper.get("mnist", "")}
        rows.append(row)
        print(f"{name}: test accuracy {100 * row['test_accuracy']:.2f}% "
              f"({row['train_minutes']:.1f} training minutes)", flush=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")  # after every model
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
