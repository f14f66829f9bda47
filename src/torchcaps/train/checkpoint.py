"""Checkpoints: safetensors tensors + a JSON manifest, both written atomically.

A checkpoint ``NAME`` in a run directory is two files:

* ``NAME.safetensors``: model weights (``model.*``), optimizer tensors (``optim.*``)
  and RNG states (``rng.*``). No pickle anywhere.
* ``NAME.json``: format tag and version, the model name and its kwargs, the training
  config, counters (epoch, step, position in the epoch), metrics, optimizer
  hyper-parameters, and the SHA-256 of the ``.safetensors`` file.

Each file is written to a temporary name, flushed, fsynced and renamed, weights
first and manifest last: a crash leaves either the old pair or the new pair, and a
manifest never points at a partially written weight file (the digest would not match).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "FORMAT", "VERSION"]

FORMAT = "torchcaps-checkpoint"
VERSION = 1
_REQUIRED = {"format": str, "version": int, "model": str, "model_kwargs": dict,
             "weights_sha256": str, "step": int, "epoch": int}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, foreign, or inconsistent."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(prefix)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    prefix: str | os.PathLike,
    model: torch.nn.Module,
    manifest: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``prefix.safetensors`` and ``prefix.json``; returns the JSON path.

    ``manifest`` must hold at least ``model``, ``model_kwargs``, ``step`` and ``epoch``.
    """
    st_path, js_path = _paths(prefix)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(manifest)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_split(optimizer)
        tensors.update(opt_tensors)
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v.contiguous()
    blob = st_save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
    meta.update(format=FORMAT, version=VERSION, weights_file=st_path.name,
                weights_sha256=hashlib.sha256(blob).hexdigest())
    _atomic_write(st_path, blob)
    _atomic_write(js_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return js_path


def load_checkpoint(prefix: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a checkpoint; returns ``(manifest, tensors)``.

    ``prefix`` may name the ``.json``, the ``.safetensors`` or the common prefix.

    Raises:
        CheckpointError: a file is missing, truncated, not JSON/safetensors, from
            another program or version, or the weights do not match the manifest digest.
    """
    st_path, js_path = _paths(prefix)
    for p in (js_path, st_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        meta = json.loads(js_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js_path}: not a valid JSON manifest ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{js_path}: not a torchcaps checkpoint (format tag missing)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{js_path}: unsupported checkpoint version {meta.get('version')!r} "
                              f"(this torchcaps reads version {VERSION})")
    for key, typ in _REQUIRED.items():
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(f"{js_path}: field {key!r} missing or not a {typ.__name__}")
    blob = st_path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta["weights_sha256"]:
        raise CheckpointError(
            f"{st_path}: SHA-256 {digest} does not match the manifest "
            f"({meta['weights_sha256']}); the weights are truncated, corrupt or from another run"
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{st_path}: not a readable safetensors file ({e})") from None
    return meta, tensors


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    if "optimizer" not in meta:
        raise CheckpointError("checkpoint holds no optimizer state; cannot resume from it")
    return _optimizer_join(opt, meta["optimizer"])


def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
