"""``torchcaps bench``: training and inference throughput, memory, and the machine's limits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", formatter_class=_args.HelpFormatter,
        help="training/inference throughput, memory, and machine limits",
        description="Measure a model's training and inference throughput and peak memory "
                    "(median of --repeats timed runs after --warmup steps), the machine's "
                    "matmul rate and copy bandwidth, and for capsnet dynamic routing alone. "
                    "See benchmarks/README.md for the method.")
    _args.add_model(p, kwargs=False)
    _args.add_batch_size(p)
    _args.add_precision(p, force=False)
    _args.add_device(p, "cpu")
    _args.add_threads(p)
    p.add_argument("--warmup", type=_args.positive_int, default=3, metavar="N",
                   help="untimed steps first")
    p.add_argument("--repeats", type=_args.positive_int, default=5, metavar="N",
                   help="timed runs (the median is reported)")
    p.add_argument("--steps", type=_args.positive_int, default=2, metavar="N",
                   help="steps per timed run")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    _args.add_json(p, "write the results as JSON")
    return p


def run(args) -> int:
    from ..bench import run_benchmark
    from ..runtime import configure_process
    from ..train import resolve_device

    _args.check_model(args.model)
    configure_process(args.threads)
    dev = str(resolve_device(args.device))
    r = run_benchmark(args.model, args.batch_size, args.precision, dev, args.warmup,
                      args.repeats, args.steps, args.compile)
    lim = r["machine_limits"]
    print(f"{args.model} batch {args.batch_size} {args.precision} on {dev}: "
          f"train {r['train_images_per_s']:.1f} images/s, infer {r['infer_images_per_s']:.1f} "
          f"images/s, peak memory {r['peak_memory_mb']:.0f} MB")
    print(f"machine: matmul {lim['matmul_fp32_gflops']:.0f} GFLOP/s fp32, copy bandwidth "
          f"{lim['copy_bandwidth_gbs']:.1f} GB/s; train reaches "
          f"{100 * r['train_fraction_of_matmul_rate']:.0f}% and inference "
          f"{100 * r['infer_fraction_of_matmul_rate']:.0f}% of the matmul rate")
    if "routing_alone" in r:
        ra = r["routing_alone"]
        print(f"dynamic routing alone, votes {tuple(ra['votes_shape'])}: {ra['ms']:.1f} ms "
              f"= {ra['reads_equivalent']:.1f} reads of the vote tensor at the copy bandwidth "
              f"({ra['ratio_to_minimal']:.1f}x the minimal {ra['minimal_reads']}); backward "
              f"{ra['backward_ms']:.1f} ms = {ra['backward_reads_equivalent']:.1f} reads, "
              f"{ra['backward_to_forward']:.1f}x the forward")
    for w in r.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
