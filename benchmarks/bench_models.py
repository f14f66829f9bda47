"""Throughput, memory and FLOPs of every registered model, one JSON for the whole sweep.

    python benchmarks/bench_models.py --precision fp32 --batch-size 128

writes ``benchmarks/results/bench_models_fp32.json`` (``--json`` to change it) and then
``python benchmarks/make_tables.py`` puts the table into ``benchmarks/README.md``.

Per model and phase (train, infer) this runs the measurement of ``torchcaps bench``
(``torchcaps.bench.measure_throughput``: warm-up steps, then the median of timed runs, FLOPs
counted with ``torch.utils.flop_counter``) in a fresh process, so each phase's peak memory is its
own. The machine's matmul rate and copy bandwidth (``measure_machine``) are measured once per
sweep, also in a child process, instead of once per model; the routing-only timing of
``torchcaps bench`` is left out. The sweeping process itself never imports torch: on Linux a
child's peak RSS (``ru_maxrss``) starts at its parent's, so a large parent would inflate every
model's peak memory. Models too large for ``--batch-size`` get a smaller batch from ``--batch-cap NAME=N``
(default: ``em_capsnet=16``, about 130 MB of activations per training image); the row says so.
The JSON is rewritten after every model, so an interrupted sweep leaves usable rows; a model
whose run fails gets a row with its ``error`` and the sweep goes on.

Before/after in one run: ``--baseline-src DIR`` measures every model also with the library in
``DIR`` (the ``src`` folder of another version, e.g. ``git archive HEAD src | tar -x -C
BASE`` then ``--baseline-src BASE/src``), alternating baseline and current phase by
phase so that both see the same machine; each row then has a ``baseline`` entry and the
ratios. ``--threads N`` sets the intra-op threads of every measuring process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# batch caps for models whose training step cannot hold --batch-size images in memory
DEFAULT_BATCH_CAPS = {"em_capsnet": 16}
CAP_REASON = {"em_capsnet": "about 130 MB of activations per training image"}


def _cap(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N >= 1, got {text!r}")
    return name, int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="registered models to measure (default: all of torchcaps.list_models())")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batch-cap", type=_cap, action="append", default=[], metavar="NAME=N",
                   help="largest batch for NAME (repeatable; default em_capsnet=16)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed run")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per model and phase (default: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each measuring process (default: torch's)")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="also measure with the library in DIR (another version's src folder)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="output (default benchmarks/results/bench_models_<precision>.json)")
    p.add_argument("--phase", choices=["setup", "train", "infer"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return p


def _threads(a: argparse.Namespace) -> None:
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)


def _child(a: argparse.Namespace) -> None:
    """One model, one phase, in this (fresh) process: print measure_throughput's JSON."""
    from torchcaps.bench import measure_throughput

    _threads(a)
    r = measure_throughput(a.model, a.phase, batch_size=a.batch_size, warmup=a.warmup,
                           repeats=a.repeats, steps=a.steps, device=a.device,
                           precision=a.precision, compile=a.compile)
    print(json.dumps(r))


def _run_phase(a: argparse.Namespace, model: str, batch: int, phase: str,
               src: str | None = None) -> dict:
    """One phase in a fresh process; with ``src``, importing the library from there."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", model, "--phase", phase,
           "--batch-size", str(batch), "--precision", a.precision, "--device", a.device,
           "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--steps", str(a.steps)]
    if a.compile:
        cmd.append("--compile")
    if a.threads is not None:
        cmd += ["--threads", str(a.threads)]
    env = None
    if src is not None:
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{phase}: no result within --timeout {a.timeout:g} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        raise RuntimeError(f"{phase}: exit status {proc.returncode}: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(model: str, batch: int, note: str, train: dict, infer: dict, limits: dict) -> dict:
    rate = limits["matmul_fp32_gflops"]
    return {
        "model": model, "parameters": train["parameters"], "batch_size": batch, "note": note,
        "train_images_per_s": train["images_per_s"], "infer_images_per_s": infer["images_per_s"],
        "train_peak_memory_mb": train["peak_memory_mb"],
        "infer_peak_memory_mb": infer["peak_memory_mb"],
        "train_peak_memory_mb_per_image": train["peak_memory_mb"] / batch,
        "infer_peak_memory_mb_per_image": infer["peak_memory_mb"] / batch,
        "train_flops_per_image": train["flops_per_step"] / batch,
        "infer_flops_per_image": infer["flops_per_step"] / batch,
        "train_fraction_of_matmul_rate": train["achieved_gflops"] / rate,
        "infer_fraction_of_matmul_rate": infer["achieved_gflops"] / rate,
        "train": train, "infer": infer,
    }


def _setup(a: argparse.Namespace) -> None:
    """Child process: check names, resolve the device, describe and measure the machine."""
    import torch

    from torchcaps import list_models
    from torchcaps.bench import machine_info, measure_machine
    from torchcaps.models._registry import _MODELS
    from torchcaps.train import resolve_device

    _threads(a)
    models = a.models or list_models()
    for m in models:
        _MODELS.get(m)  # unknown names fail before anything is measured, with suggestions
    device = str(resolve_device(a.device))
    print(json.dumps({"models": models, "device": device, "machine": machine_info(),
                      "torch_version": torch.__version__,
                      "machine_limits": measure_machine(device)}))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("batch_size", "warmup", "repeats", "steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.phase == "setup":
        _setup(a)
        return 0
    if a.phase:
        _child(a)
        return 0

    # no torch in this process (see the module docstring): setup runs in a child too
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", "setup", "--device", a.device]
    if a.threads is not None:
        cmd += ["--threads", str(a.threads)]
    if a.models:
        cmd += ["--models", *a.models]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                         else f"setup failed with exit status {proc.returncode}")
    setup = json.loads(proc.stdout.strip().splitlines()[-1])
    a.device = setup["device"]
    caps = {**DEFAULT_BATCH_CAPS, **dict(a.batch_cap)}
    out = Path(a.json or ROOT / "benchmarks" / "results" / f"bench_models_{a.precision}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = argv if argv is not None else sys.argv[1:]
    result = {
        "precision": a.precision, "device": a.device, "compiled": a.compile,
        "batch_size": a.batch_size, "batch_caps": caps,
        "warmup_steps": a.warmup, "repeats": a.repeats, "steps_per_repeat": a.steps,
        "command": shlex.join(["python", "benchmarks/bench_models.py", *shown]),
        "machine": setup["machine"], "torch_version": setup["torch_version"],
        "machine_limits": setup["machine_limits"], "rows": [],
    }
    if a.baseline_src:
        result["baseline_src"] = str(Path(a.baseline_src).resolve())
    lim = result["machine_limits"]
    print(f"machine: matmul {lim['matmul_fp32_gflops']:.0f} GFLOP/s fp32, "
          f"copy {lim['copy_bandwidth_gbs']:.1f} GB/s")
    for model in setup["models"]:
        batch = min(a.batch_size, caps.get(model, a.batch_size))
        note = ""
        if batch < a.batch_size:
            note = f"batch {batch}, not {a.batch_size}"
            if model in CAP_REASON:
                note += f": {CAP_REASON[model]}"
        try:
            current, baseline = {}, {}
            for phase in ("infer", "train"):  # baseline and current alternate
                if a.baseline_src:
                    baseline[phase] = _run_phase(a, model, batch, phase, a.baseline_src)
                current[phase] = _run_phase(a, model, batch, phase)
        except RuntimeError as e:
            result["rows"].append({"model": model, "batch_size": batch, "note": note,
                                   "error": str(e)})
            print(f"{model}: FAILED ({e})")
        else:
            row = _row(model, batch, note, current["train"], current["infer"], lim)
            result["rows"].append(row)
            print(f"{model} batch {batch}: train {row['train_images_per_s']:.1f} images/s, "
                  f"infer {row['infer_images_per_s']:.1f} images/s, peak memory "
                  f"{row['train_peak_memory_mb']:.0f} / {row['infer_peak_memory_mb']:.0f} MB")
            if baseline:
                base = row["baseline"] = _row(model, batch, note, baseline["train"],
                                              baseline["infer"], lim)
                for key in ("train_images_per_s", "infer_images_per_s",
                            "train_peak_memory_mb", "infer_peak_memory_mb"):
                    row[f"{key}_ratio_to_baseline"] = row[key] / base[key]
                print(f"  baseline: train {base['train_images_per_s']:.1f} images/s, infer "
                      f"{base['infer_images_per_s']:.1f} images/s, peak memory "
                      f"{base['train_peak_memory_mb']:.0f} / {base['infer_peak_memory_mb']:.0f} MB")
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every model
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
