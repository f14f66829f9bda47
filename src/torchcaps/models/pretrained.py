"""Pretrained weights: records, verified loading, download with a cache, and export.

Every set of weights is described by a record, ``weights/NAME.json`` beside this module,
written by :func:`export_pretrained` from a checkpoint of ``torchcaps train``:

* the model and the arguments it was built with, the dataset;
* the weights file's name, size and SHA-256, and where to get it: shipped inside the
  package (``weights/NAME.safetensors``) or published at ``url``;
* the accuracy measured when the record was written: on the dataset's test and validation
  splits and on the bundled ``mnist-mini`` test images (the figure a test re-checks);
* how the weights were made: the command, seed, epochs, training minutes, machine.

Weights files hold the model's ``state_dict`` only (safetensors: no pickle), with the model
name and arguments in the file's metadata. Every load checks the file's SHA-256 against its
record before reading a tensor, then every tensor's name, dtype and shape against the model.

Weights that are not shipped are downloaded into ``CACHE/weights/`` (``$TORCHCAPS_HOME`` or
``~/.cache/torchcaps``), written to ``NAME.part`` and renamed only once the digest matched;
a cached copy is re-checked on every load. ``mirror`` (or ``$TORCHCAPS_WEIGHTS_MIRROR``)
replaces the published base URL, and a local file the user names is accepted when it is the
published file, byte for byte.

Example::

    model = torchcaps.create_model("efficient_capsnet", pretrained=True)
    list_pretrained()                       # ['capsnet-mnist', 'efficient_capsnet-mnist', ...]
    get_pretrained("capsnet").url           # where capsnet's weights are published
    create_model("capsnet", pretrained="capsnet-mnist.safetensors")  # a copy already at hand
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .._validate import read_tagged_json
from ._registry import create_model, list_models

__all__ = ["PretrainedWeights", "list_pretrained", "get_pretrained", "weights_path",
           "load_pretrained", "load_pretrained_state", "export_pretrained", "WEIGHTS_DIR",
           "FORMAT", "PretrainedError"]

#: where shipped weights files and every record live
WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "torchcaps-pretrained"
VERSION = 1
_MIRROR_ENV = "TORCHCAPS_WEIGHTS_MIRROR"


class PretrainedError(ValueError):
    """A weights record or file that cannot be used (unknown name, bad record, wrong model)."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One set of published weights (the contents of ``weights/NAME.json``)."""

    name: str  # e.g. "efficient_capsnet-mnist"
    model: str  # registered model name
    model_kwargs: dict  # the builder arguments the weights fit
    dataset: str  # what the model was trained on (torchcaps.data name)
    file: str  # weights file name (shipped in weights/ or published at url)
    sha256: str  # of the weights file
    bytes: int  # size of the weights file
    accuracy: dict  # split -> accuracy in [0, 1]: "test", "val", "mnist-mini test"
    training: dict  # command, seed, epochs, best_epoch, steps, minutes, machine, torch
    url: str | None = None  # where the file is published when it is not shipped
    notes: str = ""
    format: str = field(default=FORMAT)
    version: int = field(default=VERSION)

    @property
    def shipped(self) -> bool:
        """Whether the weights file is inside the installed package."""
        return (WEIGHTS_DIR / self.file).is_file()

    @classmethod
    def from_json(cls, path: Path) -> PretrainedWeights:
        meta = read_tagged_json(path, FORMAT, VERSION, PretrainedError, "weights record")
        extra = sorted(set(meta) - set(cls.__dataclass_fields__))
        if extra:
            raise PretrainedError(f"{path}: unknown record fields {extra}")
        try:
            return cls(**meta)
        except TypeError as e:  # a required field is missing
            raise PretrainedError(f"{path}: incomplete record ({e})") from None


def _records() -> dict[str, PretrainedWeights]:
    return {p.stem: PretrainedWeights.from_json(p) for p in sorted(WEIGHTS_DIR.glob("*.json"))}


def list_pretrained(model: str | None = None) -> list[str]:
    """Names of the published weights, all of them or those of one model."""
    return [n for n, r in _records().items() if model is None or r.model == model]


def get_pretrained(name: str) -> PretrainedWeights:
    """The record of a weights name (``"capsnet-mnist"``) or a model's default weights
    (``"capsnet"``: its only, or first, record)."""
    records = _records()
    if name in records:
        return records[name]
    of_model = [r for r in records.values() if r.model == name]
    if of_model:
        return of_model[0]
    if name in list_models(task=None):
        raise PretrainedError(f"no pretrained weights are published for {name!r}; those with "
                              f"weights: {', '.join(sorted({r.model for r in records.values()}))}")
    raise PretrainedError(f"unknown weights {name!r} (published: {', '.join(records)})")


def _sha256(path: Path) -> str:
    from ..data.datasets import sha256_file

    return sha256_file(path)


def weights_path(record: PretrainedWeights | str, file: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, mirror: str | None = None,
                 timeout: float = 60.0) -> Path:
    """A verified local copy of a record's weights file.

    Args:
        record: a :class:`PretrainedWeights` or a name :func:`get_pretrained` accepts.
        file: a copy the user already has; it must be the published file (same SHA-256).
        cache_dir: the cache root (default ``$TORCHCAPS_HOME`` or ``~/.cache/torchcaps``);
            downloads go to its ``weights/`` folder.
        mirror: a base URL replacing the published one (``mirror/FILE``); default
            ``$TORCHCAPS_WEIGHTS_MIRROR``.

    Raises:
        ChecksumError: the shipped, named, cached or downloaded file is not the published one.
        ConnectionError: the file had to be downloaded and no URL could be reached.
    """
    from ..data.datasets import cache_dir as _cache
    from ..data.errors import ChecksumError
    from ..data.fetch import fetch_file
    from ..data.sources import RemoteFile

    rec = get_pretrained(record) if isinstance(record, str) else record
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weights file")
        found = _sha256(path)
        if found != rec.sha256:
            raise ChecksumError(f"{path} is not the published {rec.name} weights: SHA-256 "
                                f"{found}, expected {rec.sha256}")
        return path
    if rec.shipped:
        path = WEIGHTS_DIR / rec.file
        found = _sha256(path)
        if found != rec.sha256:
            raise ChecksumError(f"{path}: the shipped {rec.name} weights are damaged (SHA-256 "
                                f"{found}, expected {rec.sha256}); reinstall torchcaps")
        return path
    mirror = mirror or os.environ.get(_MIRROR_ENV) or None
    if rec.url is None and mirror is None:
        raise PretrainedError(f"{rec.name}: the weights are neither shipped nor published at a "
                              "URL; name a local copy (file=...) or a mirror")
    remote = RemoteFile(rec.file, urls=(rec.url,) if rec.url else (), sha256=rec.sha256)
    return fetch_file(remote, _cache(cache_dir) / "weights", timeout=timeout, mirror=mirror)


def load_pretrained_state(record: PretrainedWeights | str, **where) -> dict[str, torch.Tensor]:
    """The verified ``state_dict`` of a record's weights (``where``: see :func:`weights_path`)."""
    rec = get_pretrained(record) if isinstance(record, str) else record
    path = weights_path(rec, **where)
    try:
        return st_load(path.read_bytes())
    except SafetensorError as e:  # a record whose digest names a broken file
        raise PretrainedError(f"{path}: not a readable safetensors file ({e})") from None


def load_pretrained(model_name: str, pretrained: bool | str | os.PathLike = True,
                    map_location: str | torch.device = "cpu", **model_kwargs):
    """Build ``model_name`` and load published weights into it.

    As with torchvision's weights, the model is returned in training mode on
    ``map_location``: call ``.eval()`` before inference.

    ``pretrained`` is ``True`` (the model's default weights), a weights name
    (``"capsnet-mnist"``) or the path of a local copy of the model's published weights file.
    ``model_kwargs`` may repeat the record's arguments or add ones that do not change the
    weights (e.g. ``routing_iterations``); any that change a tensor's shape are refused.
    ``cache_dir``, ``mirror`` and ``timeout`` are passed to :func:`weights_path`.
    """
    from ..train.checkpoint import CheckpointError, load_model_weights

    where = {k: model_kwargs.pop(k) for k in ("cache_dir", "mirror", "timeout")
             if k in model_kwargs}
    as_path = isinstance(pretrained, os.PathLike) or (
        isinstance(pretrained, str) and (pretrained.endswith(".safetensors") or os.sep in pretrained))
    if pretrained is True or as_path:
        rec = get_pretrained(model_name)
        if as_path:
            where["file"] = pretrained
    elif isinstance(pretrained, str):
        rec = get_pretrained(pretrained)
    else:
        raise TypeError(f"pretrained must be True, a weights name or a file path, got {pretrained!r}")
    if rec.model != model_name:
        raise PretrainedError(f"weights {rec.name!r} are for model {rec.model!r}, not {model_name!r}")
    kwargs = {**rec.model_kwargs, **model_kwargs}
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
    state = load_pretrained_state(rec, **where)
    model = create_model(model_name, **kwargs)
    try:
        load_model_weights(model, state, rec.name)
    except CheckpointError as e:
        changed = sorted(k for k in model_kwargs if rec.model_kwargs.get(k) != model_kwargs[k])
        raise PretrainedError(f"{e} (arguments changed from the record: {changed})") from None
    return model.to(map_location)


def _accuracy(model, dataset: str, split: str, data_dir=None, batch_size: int = 256) -> float:
    from ..data import load_dataset
    from ..train.evaluate import evaluate

    data = load_dataset(dataset, data_dir)
    return evaluate(model, getattr(data, split), batch_size)["accuracy"]


def export_pretrained(checkpoint: str | os.PathLike, name: str, command: str,
                      url: str | None = None, ship: bool = True, out_dir: str | os.PathLike | None = None,
                      data_dir: str | os.PathLike | None = None, notes: str = "",
                      machine: str | None = None) -> PretrainedWeights:
    """Write the weights of a ``torchcaps train`` checkpoint and their record.

    The weights file (``OUT/NAME.safetensors``) holds the model's tensors only; the record
    (``OUT/NAME.json``) adds the digest, the accuracy measured now on the run's dataset
    (test and validation) and on the bundled ``mnist-mini`` test images when the model takes
    28x28 digits, and the training facts read from the run (seed, epochs, best epoch,
    steps, minutes). ``ship=False`` is for files published at ``url`` instead.
    """
    from ..bench import machine_info
    from ..train.checkpoint import build_model_from_checkpoint, load_checkpoint

    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"weights name must be letters, digits, '-', '_' or '.', got {name!r}")
    if not ship and not url:
        raise ValueError("weights that are not shipped need the url they are published at")
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    model, meta = build_model_from_checkpoint(checkpoint)
    if meta.get("task") not in (None, "ClassificationTask"):
        raise PretrainedError(f"{checkpoint}: only classifiers can be exported (task {meta['task']})")
    cfg = meta.get("config", {})
    dataset = cfg.get("dataset", "mnist-mini")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = st_save(state, metadata={"format": FORMAT, "model": meta["model"],
                                    "model_kwargs": json.dumps(meta["model_kwargs"])})
    weights = out / f"{name}.safetensors"
    tmp = weights.with_suffix(".safetensors.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, weights)
    accuracy = {"test": _accuracy(model, dataset, "test", data_dir or cfg.get("data_dir")),
                "val": _accuracy(model, dataset, "val", data_dir or cfg.get("data_dir"))}
    if tuple(model.in_shape) == (1, 28, 28) and model.num_classes == 10:  # digits
        accuracy["mnist-mini test"] = (accuracy["test"] if dataset == "mnist-mini"
                                       else _accuracy(model, "mnist-mini", "test"))
    best = meta.get("best") or {}
    run = meta  # the run's last checkpoint knows every epoch, the best one stops at its own
    last = Path(checkpoint).parent / "last.json"
    if last.is_file():
        run = load_checkpoint(last)[0]
    history = run.get("history") or [{}]
    seconds = sum(h.get("train_seconds", 0.0) for h in history)
    info = machine_info()
    record = PretrainedWeights(
        name=name, model=meta["model"], model_kwargs=meta["model_kwargs"], dataset=dataset,
        file=weights.name, sha256=_sha256(weights), bytes=weights.stat().st_size,
        accuracy={k: round(v, 6) for k, v in accuracy.items()},
        training={"command": command, "seed": cfg.get("seed"), "epochs": history[-1].get("epoch"),
                  "best_epoch": best.get("epoch"), "steps": best.get("step"),
                  "minutes": round(seconds / 60, 1),
                  "machine": machine or f"{info['cpu']}, {info['cores']} cores, "
                                        f"{info['cpu_capability']}",
                  "torch": meta.get("torch_version")},
        url=url, notes=notes)
    (out / f"{name}.json").write_text(json.dumps(asdict(record), indent=2) + "\n")
    if not ship:
        print(f"publish {weights} at {url}; it is not part of the package")
    return record
