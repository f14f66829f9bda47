"""Checkpoints: safetensors tensors + a JSON manifest that is the commit point.

A checkpoint ``NAME`` in a run directory is, at rest, two files:

* ``NAME.safetensors``: model weights (``model.*``), optimizer tensors (``optim.*``, or
  ``optim.<name>.*`` for a dict of optimizers) and RNG states (``rng.*``). No pickle anywhere.
* ``NAME.json``: format tag and version, the model name and its kwargs, the training
  config, counters (epoch, step, position in the epoch), metrics, optimizer
  hyper-parameters, and the SHA-256 of the weights.

Save protocol. Every write goes to a temporary ``.NAME.<8 hex>.tmp``, is fsynced and renamed:

1. the weights become ``NAME.pending-<first 8 hex of their SHA-256>.safetensors``;
2. ``NAME.json`` is replaced by the new manifest: the **commit point**;
3. the pending weights are renamed over ``NAME.safetensors``;
4. temporaries and pending weights left by earlier interrupted saves of ``NAME`` are deleted.

:func:`load_checkpoint` follows the manifest: its weights are the pending file named after
its digest when that exists (a save stopped between steps 2 and 3), else ``NAME.safetensors``,
and the digest must match. A kill before step 2 leaves the old manifest, whose weights are
untouched; a kill after it leaves the new manifest, whose weights are already durable. So
whatever the moment of a crash, the newest committed checkpoint loads, and the next save
removes the debris.

:func:`build_model_from_checkpoint` treats a checkpoint as untrusted input: it checks the
manifest's model name and arguments, builds the model on the meta device and compares every
tensor's shape and dtype (and the total size) with the weights before allocating anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.overrides import TorchFunctionMode

from .._validate import read_tagged_json
from ..models import CapsuleModel, create_model, list_models

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "build_model_from_checkpoint",
    "load_model_weights",
    "model_state",
    "optimizer_state",
    "rng_state",
    "FORMAT",
    "VERSION",
]

FORMAT = "torchcaps-checkpoint"
VERSION = 1
_REQUIRED = {"format": str, "version": int, "model": str, "model_kwargs": dict,
             "weights_sha256": str, "step": int, "epoch": int}
_MAX_INT = 2**31 - 1  # bound on every integer model argument read from a manifest
_MAX_CLASSES = 100_000  # far above any capsule benchmark; more is a forged or broken manifest
_OPT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Optimizers = torch.optim.Optimizer | dict[str, torch.optim.Optimizer]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, foreign, or inconsistent."""


# ----------------------------------------------------------------------------- file steps
# Every change to the file system goes through these three functions, so that a test can
# stop a save at each of them in turn, as a kill would.


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist), write ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except Exception:  # disk full, I/O error: leave nothing behind
        path.unlink(missing_ok=True)
        raise


def _rename(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` over ``dst`` and make the rename durable."""
    os.replace(src, dst)
    try:
        dfd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems (and Windows) refuse directory fsync
        pass


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes, name: str) -> None:
    tmp = path.parent / f".{name}.{secrets.token_hex(4)}.tmp"
    _write_file(tmp, data)
    _rename(tmp, path)


# ----------------------------------------------------------------------------- names


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``NAME``, ``NAME.json`` or ``NAME.safetensors`` -> (weights path, manifest path)."""
    p = Path(prefix)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.parent / f"{p.name}.safetensors", p.parent / f"{p.name}.json"


def _pending(weights: Path, digest: str) -> Path:
    return weights.with_name(f"{weights.name[:-len('.safetensors')]}.pending-{digest[:8]}.safetensors")


def _is_leftover(filename: str, name: str) -> bool:
    n = re.escape(name)
    return re.fullmatch(rf"\.{n}\.[0-9a-f]{{8}}\.tmp|{n}\.pending-[0-9a-f]{{8}}\.safetensors",
                        filename) is not None


# ----------------------------------------------------------------------------- optimizers


def _optimizer_split(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}{idx}.{key}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            if idx.isdigit():  # skips optim.<name>.* of named optimizers when prefix is optim.
                state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    prefix: str | os.PathLike,
    model: torch.nn.Module,
    manifest: dict[str, Any],
    optimizer: Optimizers | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``prefix`` (see the module docstring); returns the manifest path.

    Args:
        prefix: ``NAME``, ``NAME.json`` or ``NAME.safetensors``.
        model: its ``state_dict`` is stored under ``model.*``.
        manifest: at least ``model``, ``model_kwargs``, ``step`` and ``epoch``; JSON values.
        optimizer: one optimizer, or a dict ``{name: optimizer}`` (e.g. generator and
            discriminator); read back with :func:`optimizer_state`.
        rng: generator states, stored under ``rng.*``.
    """
    weights, js = _paths(prefix)
    name = js.name[:-len(".json")]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: v for k, v in manifest.items() if k not in ("optimizer", "optimizers")}
    if isinstance(optimizer, dict):
        meta["optimizers"] = {}
        for key, opt in optimizer.items():
            if not (isinstance(key, str) and _OPT_NAME.fullmatch(key)):
                raise ValueError(f"optimizer names must be identifiers, got {key!r}")
            opt_tensors, meta["optimizers"][key] = _optimizer_split(opt, f"optim.{key}.")
            tensors.update(opt_tensors)
    elif optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_split(optimizer, "optim.")
        tensors.update(opt_tensors)
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v.contiguous()
    blob = st_save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
    digest = hashlib.sha256(blob).hexdigest()
    meta.update(format=FORMAT, version=VERSION, weights_file=weights.name, weights_sha256=digest)
    text = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()

    js.parent.mkdir(parents=True, exist_ok=True)
    pending = _pending(weights, digest)
    _atomic_write(pending, blob, name)  # 1. durable, but no manifest names it yet
    _atomic_write(js, text, name)  # 2. commit
    _rename(pending, weights)  # 3. the weights reach their resting name
    for f in sorted(js.parent.iterdir()):  # 4. debris of interrupted saves
        if _is_leftover(f.name, name):
            _unlink(f)
    return js


def _read_manifest(js: Path) -> dict:
    meta = read_tagged_json(js, FORMAT, VERSION, CheckpointError, "checkpoint")
    for key, typ in _REQUIRED.items():
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(f"{js}: field {key!r} missing or not a {typ.__name__}")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"]):
        raise CheckpointError(f"{js}: field 'weights_sha256' is not a SHA-256 hex digest")
    return meta


def load_checkpoint(prefix: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify the newest committed checkpoint; returns ``(manifest, tensors)``.

    ``prefix`` may name the ``.json``, the ``.safetensors`` or the common prefix.

    Raises:
        CheckpointError: a file is missing, truncated, not JSON/safetensors, from
            another program or version, or the weights do not match the manifest digest.
    """
    weights, js = _paths(prefix)
    meta = _read_manifest(js)
    expected = meta["weights_sha256"]
    candidates = [p for p in (_pending(weights, expected), weights) if p.is_file()]
    if not candidates:
        raise CheckpointError(f"checkpoint file not found: {weights}")
    for path in candidates:  # the pending file exists only if a save stopped after its commit
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest == expected:
            break
    else:
        raise CheckpointError(
            f"{path}: SHA-256 {digest} does not match the manifest "
            f"({expected}); the weights are truncated, corrupt or from another run"
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return meta, tensors


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from checkpoint tensors."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state(meta: dict, tensors: dict[str, torch.Tensor], name: str | None = None) -> dict:
    """The ``state_dict`` of the optimizer saved alone (``name=None``) or under ``name``."""
    named = meta.get("optimizers") or {}
    if name is None:
        if "optimizer" not in meta:
            hint = f" (it holds optimizers {sorted(named)}: pass name=)" if named else ""
            raise CheckpointError(f"checkpoint holds no optimizer state{hint}; cannot resume from it")
        return _optimizer_join(tensors, "optim.", meta["optimizer"])
    if name not in named:
        raise CheckpointError(f"checkpoint holds no optimizer named {name!r} "
                              f"(it has {sorted(named) or 'none by name'})")
    return _optimizer_join(tensors, f"optim.{name}.", named[name])


def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The RNG states (``rng.*``) from checkpoint tensors."""
    return {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}


# ----------------------------------------------------------------------------- models


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], what: str) -> None:
    """Raise if ``found`` lacks a tensor of ``expected``, has an extra one, or differs in dtype/shape."""
    problems = [f"tensor {k!r} is missing (expected {_describe(v)})"
                for k, v in expected.items() if k not in found]
    problems += [f"unexpected tensor {k!r} ({_describe(v)})"
                 for k, v in found.items() if k not in expected]
    problems += [f"tensor {k!r}: expected {_describe(v)}, found {_describe(found[k])}"
                 for k, v in expected.items()
                 if k in found and (found[k].dtype, found[k].shape) != (v.dtype, v.shape)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{what}: {problems[0]}{more}")


def load_model_weights(
    model: torch.nn.Module, tensors_or_state: dict[str, torch.Tensor], source: str
) -> None:
    """Load weights into ``model`` after checking every tensor's presence, dtype and shape.

    ``load_state_dict`` alone copies an int32 tensor into a float32 parameter without a
    word; here any difference is a :class:`CheckpointError` naming the tensor, the expected
    and the found dtype and shape.

    Args:
        tensors_or_state: checkpoint tensors (``model.*`` keys) or a plain ``state_dict``.
        source: where the weights come from, for the error message.
    """
    expected = model.state_dict()
    state, stripped = tensors_or_state, model_state(tensors_or_state)
    if len(expected.keys() & stripped.keys()) > len(expected.keys() & state.keys()):
        state = stripped  # checkpoint tensors: the reading that names more of the model wins
    _check_fits(expected, state, f"{source}: weights do not fit model {type(model).__name__}")
    model.load_state_dict(state)


def _check_json(value: Any, where: str) -> None:
    """Model arguments must be plain JSON: finite numbers, bounded integers, strings, lists, dicts."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_INT:
            raise CheckpointError(f"{where} = {value} is out of range (|value| <= {_MAX_INT})")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where} = {value} is not finite")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, f"{where}[{k!r}]")
    else:
        raise CheckpointError(f"{where} has unsupported type {type(value).__name__}")


def _check_model_spec(meta: dict, source: str) -> tuple[str, dict]:
    name, kwargs = meta["model"], meta["model_kwargs"]
    if name not in list_models(task=None):
        raise CheckpointError(f"{source}: unknown model {name!r} "
                              f"(registered: {', '.join(list_models(task=None))})")
    _check_json(kwargs, f"{source}: model_kwargs")
    n = kwargs.get("num_classes")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool)
                              and 1 <= n <= _MAX_CLASSES):
        raise CheckpointError(f"{source}: num_classes must be an integer in [1, {_MAX_CLASSES}], "
                              f"got {n!r}")
    return name, kwargs


class _DataTensorsOnCpu(TorchFunctionMode):
    """Inside ``torch.device("meta")``, keep tensors made from Python data on the CPU.

    Builders may read values back from such tensors (``int(torch.tensor(shape).prod())``),
    which meta tensors cannot do; they are no larger than data already in memory.
    """

    _FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FROM_DATA and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def build_model_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CapsuleModel, dict]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode).

    Nothing is allocated for the model until the manifest has been checked (registered model
    name, plain-JSON arguments with bounded integers) and a meta-device build of it agrees
    with the weights file in total size and in every tensor's shape and dtype.

    Returns:
        ``(model, manifest)``.
    """
    meta, tensors = load_checkpoint(path)
    name, kwargs = _check_model_spec(meta, str(path))
    what = f"{path}: weights do not fit model {name!r} with {kwargs}"
    try:
        with torch.device("meta"), _DataTensorsOnCpu():
            skeleton = create_model(name, **kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__  # no C++ stack frames
        raise CheckpointError(f"{path}: cannot build model {name!r} with {kwargs}: {first}") from None
    expected, state = skeleton.state_dict(), model_state(tensors)
    need = sum(t.numel() * t.element_size() for t in expected.values())
    have = sum(t.numel() * t.element_size() for t in state.values())
    if need != have:
        raise CheckpointError(f"{what}: the model needs {need:,} bytes of tensors but the "
                              f"checkpoint holds {have:,}")
    _check_fits(expected, state, what)
    model = create_model(name, **kwargs)
    load_model_weights(model, state, str(path))
    model.to(device).eval()
    return model, meta
