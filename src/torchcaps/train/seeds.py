"""One training job over several seeds: :func:`train_seeds`, with the mean and standard deviation.

Each seed is an ordinary :func:`~torchcaps.train.train` run in its own directory,
``OUT/seed-N/`` (resumable and evaluable like any other run). A seed whose ``summary.json``
exists is finished and is read back rather than trained again; a seed with a checkpoint but
no summary is resumed exactly; so calling :func:`train_seeds` again with the same config
continues an interrupted sweep. ``OUT/seeds.json`` records every seed's summary and the mean
and sample standard deviation of each numeric test metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from .classification import train
from .config import TrainConfig

__all__ = ["SEEDS_FILE", "seed_dir", "seed_statistics", "train_seeds"]

#: the report :func:`train_seeds` writes into ``config.out``
SEEDS_FILE = "seeds.json"

#: settings that change how a run executes, not what it computes: a re-run may differ in them
#: from a seed's recorded config (the others must agree, or the seeds are not one experiment)
_RUNTIME = frozenset({"out", "overwrite", "data_dir", "progress", "device", "threads", "compile",
                      "checkpoint_every", "log_every", "nonfinite", "force_precision",
                      "eval_batch_size"})


def seed_dir(out: str | Path, seed: int) -> Path:
    """The run directory of one seed: ``OUT/seed-N``."""
    return Path(out) / f"seed-{seed}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def seed_statistics(
    summaries: Sequence[dict], metrics: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Mean and sample standard deviation of every numeric ``test_*`` metric of ``summaries``
    (or of the named ``metrics``).

    Only metrics every summary reports as a finite number are included. The standard deviation is the sample
    one (``statistics.stdev``, n - 1 in the denominator); ``None`` for a single seed.

    Returns:
        ``(mean, std)``, two dicts keyed by metric name (``"test_accuracy"``, ...).
    """
    if not summaries:
        raise ValueError("no summaries to average")
    names = [k for k in (metrics if metrics is not None else summaries[0])
             if (metrics is not None or k.startswith("test_"))
             and all(_number(s.get(k)) for s in summaries)]
    mean, std = {}, {}
    for name in names:
        values = [float(s[name]) for s in summaries]
        mean[name] = statistics.fmean(values)
        std[name] = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def _recorded_config(out: Path) -> TrainConfig | None:
    """The config a seed's run recorded in its manifest (``None`` when there is none)."""
    for name in ("last", "best"):
        manifest = out / f"{name}.json"
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text()).get("config")
                return TrainConfig(**{**saved, "out": str(out)})
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{manifest}: training config not readable ({e})") from None
    return None


def _differences(recorded: TrainConfig, wanted: TrainConfig, runtime: bool) -> dict[str, list]:
    """Fields (runtime ones, or the others) whose values differ, as ``{field: [old, new]}``."""
    def norm(v):
        return json.loads(json.dumps(v))

    old, new = dataclasses.asdict(recorded), dataclasses.asdict(wanted)
    return {k: [old[k], new[k]] for k in new
            if (k in _RUNTIME) == runtime and k not in ("out", "overwrite")
            and norm(old[k]) != norm(new[k])}


def train_seeds(config: TrainConfig, seeds: Sequence[int]) -> dict:
    """Train ``config`` once per seed and report each run and the mean and spread.

    Every seed is a :func:`~torchcaps.train.train` run of ``config`` with that ``seed`` in
    ``config.out/seed-N`` (with ``config.out=None`` nothing is written and nothing is
    skipped). A seed whose run directory holds a ``summary.json`` is skipped (its summary is
    read back); one with a checkpoint but no summary is resumed. A recorded run must have
    been trained with the same settings as ``config`` (runtime settings such as ``device``
    or ``threads`` aside), or a ``ValueError`` says which differ. ``config.overwrite``
    retrains every seed from scratch.

    Returns:
        The report written to ``config.out/seeds.json``: ``seeds``, ``config`` (without
        ``seed``), ``runs`` (per seed: ``seed``, ``out``, ``status`` of ``"trained"``,
        ``"resumed"`` or ``"skipped"``, and the run's ``summary``), and ``mean`` and ``std``
        (sample standard deviation; ``None`` for one seed) of every numeric test metric.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("train_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed may appear once, got {seeds}")
    configs = [dataclasses.replace(config, seed=s, out=None if config.out is None
                                   else str(seed_dir(config.out, s))) for s in seeds]

    plan = []  # check every recorded seed before training any
    for cfg in configs:
        out = None if cfg.out is None else Path(cfg.out)
        recorded = None if out is None or cfg.overwrite else _recorded_config(out)
        if recorded is not None:
            differ = _differences(recorded, cfg, runtime=False)
            if differ:
                listed = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in differ.items())
                raise ValueError(
                    f"{out} holds a run of other settings: {listed}; re-run with the settings it "
                    "recorded, choose another output directory, or overwrite the seeds")
        if out is not None and not cfg.overwrite and (out / "summary.json").is_file():
            plan.append((cfg, "skipped", None))
        elif recorded is not None:
            plan.append((cfg, "resumed", _differences(recorded, cfg, runtime=True)))
        else:
            plan.append((cfg, "trained", None))

    runs = []
    for i, (cfg, status, changes) in enumerate(plan):
        doing = {"trained": "training", "resumed": "resuming", "skipped": "finished, skipped"}
        where = f" ({cfg.out})" if cfg.out else ""
        print(f"seed {cfg.seed}, {i + 1} of {len(plan)}: {doing[status]}{where}", file=sys.stderr)
        if status == "skipped":
            summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        else:
            summary = train(cfg, resume=status == "resumed", changes=changes or None)
        runs.append({"seed": cfg.seed, "out": cfg.out, "status": status, "summary": summary})

    mean, std = seed_statistics([r["summary"] for r in runs])
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("seed", "overwrite")}
    report = {"seeds": seeds, "config": shared, "runs": runs, "mean": mean, "std": std}
    if config.out is not None:
        path = Path(config.out) / SEEDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    return report
