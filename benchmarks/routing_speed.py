"""A routing algorithm alone: forward, training forward and backward, in reads of the votes.

    python benchmarks/routing_speed.py --json benchmarks/results/routing_dynamic_1thread.json
    python benchmarks/routing_speed.py --baseline-src BASE/src \
        --json benchmarks/results/routing_dynamic_1thread.json

Times dynamic routing (3 iterations, the registered module) on random votes of capsnet's
size, ``(128, 1152, 10, 16)`` laid out parent-major as ``CapsLinear`` makes them: the forward
without autograd, the forward with autograd and the backward from the poses (median of
``--repeats`` after a warm-up). Each time is also given in *reads of the vote tensor*: the
time divided by that of reading the votes once at the copy bandwidth measured in the same
process (half the time of copying them), as ``torchcaps bench`` reports it. The bytes that the
forward keeps for the backward are counted with ``torch.autograd.graph.saved_tensors_hooks``
(each storage once), and the growth of the process's peak memory over the training
passes (forward and backward: what routing needs beyond the votes and their gradient's
first allocation).

``--baseline-src DIR`` also times the library in ``DIR`` (the ``src`` folder of another
version, e.g. ``git archive HEAD src | tar -x -C BASE``), each measurement in a fresh process,
baseline and current alternating ``--rounds`` times, so that both see the same machine;
the JSON then has both and their ratios (the medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def measure(shape, iterations: int, repeats: int) -> dict:
    """One process's measurement (the library is whichever ``torchcaps`` imports)."""
    import resource
    import time

    import torch

    import torchcaps
    from torchcaps.routing import create_routing

    b, i, j, d = shape
    votes = (torch.randn(b, j, i, d) * 0.05).transpose(1, 2)
    routing = create_routing("dynamic", iterations=iterations)
    src, dst = torch.randn(votes.numel()), torch.empty(votes.numel())

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    one_read = timed(lambda: dst.copy_(src)) / 2
    leaf = votes.detach().requires_grad_(True)
    grad = torch.randn(b, j, d)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    forward, backward = [], []
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for rep in range(repeats + 1):
        leaf.grad = None
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            t0 = time.perf_counter()
            poses = routing(leaf).poses
            t1 = time.perf_counter()
        poses.backward(grad)
        if rep:
            forward.append(t1 - t0)
            backward.append(time.perf_counter() - t1)
        del poses
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # KiB on Linux
    with torch.inference_mode():
        infer = timed(lambda: routing(votes))
    fwd, bwd = 1000 * statistics.median(forward), 1000 * statistics.median(backward)
    saved.pop(leaf.untyped_storage().data_ptr(), None)  # the votes themselves
    return {"version": torchcaps.__version__, "votes_shape": list(shape),
            "iterations": iterations, "threads": torch.get_num_threads(),
            "one_read_ms": one_read, "infer_ms": infer, "train_forward_ms": fwd,
            "backward_ms": bwd, "infer_reads": infer / one_read,
            "train_forward_reads": fwd / one_read, "backward_reads": bwd / one_read,
            "backward_to_forward": bwd / infer,
            "saved_mbytes_besides_votes": sum(saved.values()) / 2**20,
            "training_peak_mbytes_besides_votes": peak,
            "votes_mbytes": votes.numel() * votes.element_size() / 2**20}


def _child(src: Path, a) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, __file__, "--child", "--repeats", str(a.repeats),
           "--iterations", str(a.iterations), "--threads", str(a.threads),
           "--shape", *map(str, a.shape)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median_of(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys},
            "rounds": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[128, 1152, 10, 16],
                   metavar=("B", "I", "J", "D"))
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per library")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-src", type=Path, default=None, metavar="DIR")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(measure(a.shape, a.iterations, a.repeats)))
        return 0
    from torchcaps.bench import machine_info, save_result

    runs = {"current": [], "baseline": []}
    for _ in range(a.rounds):
        if a.baseline_src:
            runs["baseline"].append(_child(a.baseline_src.resolve(), a))
        runs["current"].append(_child(SRC, a))
    result = {"command": "python benchmarks/routing_speed.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "machine": {**machine_info(), "torch_threads": a.threads},
              "current": _median_of(runs["current"])}
    if a.baseline_src:
        base = result["baseline"] = _median_of(runs["baseline"])
        result["ratios"] = {k: base[k] / result["current"][k] for k in
                            ("infer_ms", "train_forward_ms", "backward_ms",
                             "saved_mbytes_besides_votes", "training_peak_mbytes_besides_votes")
                            if result["current"][k]}
    for name in ("baseline", "current"):
        if name in result:
            r = result[name]
            print(f"{name}: forward {r['infer_ms']:.1f} ms = {r['infer_reads']:.1f} reads; "
                  f"training forward {r['train_forward_ms']:.1f} ms, backward "
                  f"{r['backward_ms']:.1f} ms = {r['backward_reads']:.1f} reads "
                  f"({r['backward_to_forward']:.1f}x the forward); kept for backward "
                  f"{r['saved_mbytes_besides_votes']:.1f} MB besides the votes "
                  f"({r['votes_mbytes']:.1f} MB), peak growth in training "
                  f"{r['training_peak_mbytes_besides_votes']:.0f} MB")
    if a.json:
        save_result(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
