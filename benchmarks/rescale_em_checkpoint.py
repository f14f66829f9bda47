"""Give an EM-routing run checkpoint another ``beta_a_scale`` without changing what it computes.

    python benchmarks/rescale_em_checkpoint.py runs/zoo/em_capsnet runs/zoo-s50k/em_capsnet \\
        --scale 50000

Each EM layer's activation bias is ``beta_a_scale * beta_a`` (:mod:`torchcaps.routing.em`,
"Activation bias scale"). Going from scale ``s`` to ``s'`` divides every stored ``beta_a`` by
``k = s'/s`` and multiplies Adam's first moment of it by ``k`` and its second moment by ``k^2``.
The network then computes the same function, and Adam's next step moves the stored ``beta_a`` by
the same amount as before, which is ``k`` times more in the effective bias. Nothing else changes.

It rewrites ``last`` and ``best`` of a run directory into a new one (and copies
``metrics.jsonl`` and ``summary.json``), so that ``torchcaps train --resume`` or
``benchmarks/zoo.py --resume`` continues the run with ``beta_a_scale`` in its model arguments.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

import torchcaps
from torchcaps.routing.em import EMRouting
from torchcaps.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)

#: manifest fields that save_checkpoint writes itself
_WRITTEN = ("format", "version", "weights_file", "weights_sha256", "optimizer")


def rescale_checkpoint(src: str | Path, dst: str | Path, scale: float) -> dict:
    """Rewrite checkpoint ``src`` (a prefix) as ``dst`` with ``beta_a_scale=scale``.

    Returns the new model arguments. Raises ``CheckpointError`` for an unreadable checkpoint and
    ``ValueError`` for a model without EM routing or a bad scale.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    meta, tensors = load_checkpoint(src)
    old_kwargs = meta["model_kwargs"]
    new_kwargs = {**old_kwargs, "beta_a_scale": float(scale)}
    model = torchcaps.create_model(meta["model"], **new_kwargs)
    routings = {name: m for name, m in model.named_modules() if isinstance(m, EMRouting)}
    if not routings:
        raise ValueError(f"model {meta['model']} has no EM routing layer; nothing to rescale")
    old_scale = float(old_kwargs.get("beta_a_scale", 1.0))
    k = scale / old_scale
    state = model_state(tensors)
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}  # Adam's state keys
    opt_state = optimizer_state(meta, tensors) if "optimizer" in meta else None
    for name in routings:
        key = f"{name}.beta_a"
        state[key] = state[key] / k
        if opt_state is not None and index[key] in opt_state["state"]:
            moments = opt_state["state"][index[key]]
            moments["exp_avg"] = moments["exp_avg"] * k
            moments["exp_avg_sq"] = moments["exp_avg_sq"] * (k * k)
    model.load_state_dict(state)
    optimizer = None
    if opt_state is not None:
        optimizer = torch.optim.Adam(model.parameters())
        optimizer.load_state_dict(opt_state)
    manifest = {key: v for key, v in meta.items() if key not in _WRITTEN}
    manifest["model_kwargs"] = new_kwargs
    save_checkpoint(dst, model, manifest, optimizer, rng_state(tensors) or None)
    return new_kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="run directory holding last.json / best.json")
    p.add_argument("dst", type=Path, help="new run directory (must not exist)")
    p.add_argument("--scale", type=float, required=True, help="the new beta_a_scale")
    a = p.parse_args()
    if a.dst.exists():
        p.error(f"{a.dst} exists; choose a new run directory")
    found = [n for n in ("last", "best") if (a.src / f"{n}.json").exists()]
    if "last" not in found:
        p.error(f"{a.src} holds no last.json checkpoint")
    a.dst.mkdir(parents=True)
    try:
        for name in found:
            kwargs = rescale_checkpoint(a.src / name, a.dst / name, a.scale)
            print(f"wrote {a.dst / name}.json with model arguments {kwargs}")
    except (CheckpointError, ValueError) as e:
        shutil.rmtree(a.dst)
        p.error(str(e))
    for extra in ("metrics.jsonl", "summary.json"):
        if (a.src / extra).exists():
            shutil.copy2(a.src / extra, a.dst / extra)


if __name__ == "__main__":
    main()
