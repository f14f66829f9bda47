"""Throughput and memory measurement shared by ``benchmarks/`` scripts.

Method: build the model, run ``warmup`` untimed steps, then time ``repeats`` runs of
``steps`` steps each and report the median images/s. Training steps are full
optimizer steps (forward, loss, backward, Adam update) on random inputs of the
model's shape; inference runs under ``torch.inference_mode`` in eval mode.
Peak memory is the process's peak resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA), measured in a fresh process per phase
by the benchmark scripts.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from .models import create_model
from .precision import PRECISIONS, autocast, check_precision  # noqa: F401 (re-exported)
from .runtime import keep_freed_memory

__all__ = ["machine_info", "measure_throughput", "measure_machine", "count_flops", "autocast",
           "contention_warnings", "run_benchmark"]


def measure_machine(device: str = "cpu", size: int = 2048, mbytes: int = 256, repeats: int = 7) -> dict:
    """This machine's float32 matrix-multiply rate (GFLOP/s) and copy bandwidth (GB/s).

    Matmul: median time of ``size x size`` float32 products (``matmul_fp32_gflops``; the
    fastest run is ``matmul_fp32_gflops_best``). Bandwidth: median time of copying a
    ``mbytes`` float32 buffer (counted as one read plus one write).
    """
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    src = torch.empty(mbytes * 2**20 // 4, device=dev).fill_(1.0)
    dst = torch.empty_like(src)

    def timed(fn) -> list[float]:
        fn()
        _sync(dev)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return times

    t_mm = timed(lambda: torch.mm(a, b))
    t_cp = timed(lambda: dst.copy_(src))
    return {"matmul_fp32_gflops": 2 * size**3 / statistics.median(t_mm) / 1e9,
            "matmul_fp32_gflops_best": 2 * size**3 / min(t_mm) / 1e9,
            "copy_bandwidth_gbs": 2 * src.numel() * 4 / statistics.median(t_cp) / 1e9,
            "matmul_size": size, "copy_mbytes": mbytes}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def contention_warnings(measured_limits: dict | None = None, *, load: float | None = None,
                        recheck_gflops: float | None = None, device: str = "cpu") -> list[str]:
    """Reasons the throughput just measured may be low because the machine is shared.

    * Load: the 1-minute load average (``load``, default :func:`os.getloadavg`) above
      ``max(1, cores / 4)`` on the cores this process may use. Take it before the
      benchmark starts, so that it counts other work only.
    * Spread: the fastest matmul run of ``measured_limits`` (:func:`measure_machine`) more
      than 1.5 times its median, i.e. the speed changed between runs.
    * Drift: a second matmul measurement (``recheck_gflops``; measured now, 3 runs, when
      ``measured_limits`` is given and it is ``None``) off the first by more than 1.5 times.

    Returns human-readable warnings, empty when nothing points at contention.
    """
    out = []
    cores = _cores()
    if torch.device(device).type == "cpu":
        load = os.getloadavg()[0] if load is None else load
        if load > max(1.0, cores / 4):
            out.append(f"load average {load:.1f} on {cores} cores: other work is sharing the "
                       "cores; throughput figures will be low")
    if measured_limits:
        median = measured_limits["matmul_fp32_gflops"]
        best = measured_limits.get("matmul_fp32_gflops_best", median)
        if best > 1.5 * median:
            out.append(f"the matmul rate varied between runs (median {median:.0f}, best "
                       f"{best:.0f} GFLOP/s): the machine's speed changed while measuring")
        if recheck_gflops is None:
            recheck_gflops = measure_machine(device, mbytes=1, repeats=3)["matmul_fp32_gflops"]
        if not 1 / 1.5 < recheck_gflops / median < 1.5:
            out.append(f"the matmul rate measured {median:.0f} GFLOP/s once and "
                       f"{recheck_gflops:.0f} GFLOP/s another time: other work is competing "
                       "for the machine; throughput figures are unreliable")
    return out


def count_flops(model, x, y, train: bool) -> int:
    """Floating-point operations of one step (forward+loss, plus backward when ``train``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            out = model(x, y)
            loss, _ = model.loss(out, x, y)
            loss.backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def save_result(path, result: dict) -> None:
    """Write a benchmark's ``result`` as indented JSON at ``path`` (folders made) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def machine_info() -> dict:
    """A short description of the machine: CPU model and capability, cores, torch build, device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - non-Linux
        pass
    from .precision import cpu_capability

    info = {"cpu": cpu, "cpu_capability": cpu_capability(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_throughput(
    model_name: str,
    mode: str = "train",
    batch_size: int = 128,
    warmup: int = 3,
    repeats: int = 5,
    steps: int = 2,
    device: str = "cpu",
    model_kwargs: dict | None = None,
    seed: int = 0,
    precision: str = "fp32",
    compile: bool = False,
) -> dict:
    """Median images/s of ``mode`` ("train" or "infer") for a registered model.

    Calls :func:`torchcaps.runtime.keep_freed_memory` first, as training does.
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    keep_freed_memory()
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(model_name, **(model_kwargs or {})).to(dev)
    x = torch.rand(batch_size, *model.in_shape, device=dev)
    y = torch.randint(0, model.num_classes, (batch_size,), device=dev)
    flops = count_flops(model, x, y, train=mode == "train")
    net = torch.compile(model) if compile else model
    if mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            with autocast(dev, precision):
                out = net(x, y)
                loss, _ = model.loss(out, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast(dev, precision):
                net(x)

    for _ in range(warmup):
        step()
    _sync(dev)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        rates.append(batch_size * steps / (time.perf_counter() - t0))
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": model_name, "mode": mode, "batch_size": batch_size, "device": str(dev),
            "images_per_s": statistics.median(rates), "runs_images_per_s": rates,
            "warmup_steps": warmup, "repeats": repeats, "steps_per_repeat": steps,
            "peak_memory_mb": round(peak_mb, 1), "precision": precision, "compiled": compile,
            "flops_per_step": flops,
            "achieved_gflops": flops * statistics.median(rates) / batch_size / 1e9,
            "parameters": sum(p.numel() for p in model.parameters())}


def measure_routing(name: str = "dynamic", shape=(128, 1152, 10, 16), iterations: int = 3,
                    repeats: int = 5, device: str = "cpu", compile: bool = False) -> dict:
    """Time of a routing algorithm alone on random votes, median of ``repeats``: the forward
    without autograd (``ms``), and for training the forward with autograd (``train_forward_ms``)
    and the backward from the poses (``backward_ms``).

    The votes ``(B, I, J, D)`` are laid out in memory parent-major, ``(B, J, I, D)``, as
    :class:`~torchcaps.layers.CapsLinear` produces them. The times include the routing's
    input validation (shape and dtype; the votes are scanned for NaN/Inf only if the output
    is not finite).
    """
    from .routing import create_routing

    dev = torch.device(device)
    b, i, j, d = shape
    votes = (torch.randn(b, j, i, d, device=dev) * 0.05).transpose(1, 2)  # (B, I, J, D) view
    r = create_routing(name, iterations=iterations).to(dev)
    fn = torch.compile(r) if compile else r
    times = []
    with torch.inference_mode():
        fn(votes)
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fn(votes)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    leaf = votes.detach().requires_grad_(True)
    grad = torch.randn(b, j, d, device=dev)
    forward, backward = [], []
    for rep in range(repeats + 1):  # the first is a warm-up
        leaf.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        poses = fn(leaf).poses
        _sync(dev)
        t1 = time.perf_counter()
        poses.backward(grad)
        _sync(dev)
        if rep:
            forward.append(t1 - t0)
            backward.append(time.perf_counter() - t1)
        del poses
    return {"routing": name, "votes_shape": list(shape), "votes_memory_layout": "(B, J, I, D)",
            "iterations": iterations, "compiled": compile,
            "ms": 1000 * statistics.median(times), "votes_mbytes": votes.numel() * 4 / 2**20,
            "train_forward_ms": 1000 * statistics.median(forward),
            "backward_ms": 1000 * statistics.median(backward)}


def run_benchmark(model: str, batch_size: int = 128, precision: str = "fp32", device: str = "cpu",
                  warmup: int = 3, repeats: int = 5, steps: int = 2, compile: bool = False) -> dict:
    """Everything `torchcaps bench` reports, as one JSON-ready dict.

    ``"warnings"`` lists what makes the figures unrepresentative: bf16 where it has no fast
    kernels (:func:`torchcaps.precision.check_precision`, forced: bench measures anyway)
    and signs of other work on the machine (:func:`contention_warnings`).
    """
    slow_bf16 = check_precision(device, precision, force=True, warn=lambda _: None)
    load = os.getloadavg()[0]  # before our own threads add to it
    first_gflops = measure_machine(device, mbytes=1, repeats=3)["matmul_fp32_gflops"]
    common = dict(batch_size=batch_size, warmup=warmup, repeats=repeats, steps=steps,
                  device=device, precision=precision, compile=compile)
    infer = measure_throughput(model, "infer", **common)  # first: its peak RSS is its own
    train = measure_throughput(model, "train", **common)
    limits = measure_machine(device)
    routing = measure_routing(device=device, compile=compile) if model == "capsnet" else None
    warnings = [slow_bf16] if slow_bf16 else []
    warnings += contention_warnings(limits, load=load, recheck_gflops=first_gflops, device=device)
    result = {
        "model": model, "batch_size": batch_size, "precision": precision, "device": device,
        "compiled": compile, "torch_version": torch.__version__, "machine": machine_info(),
        "train_images_per_s": train["images_per_s"], "infer_images_per_s": infer["images_per_s"],
        "peak_memory_mb": train["peak_memory_mb"], "train": train, "infer": infer,
        "machine_limits": limits,
        "train_fraction_of_matmul_rate": train["achieved_gflops"] / limits["matmul_fp32_gflops"],
        "infer_fraction_of_matmul_rate": infer["achieved_gflops"] / limits["matmul_fp32_gflops"],
        "warnings": warnings,
    }
    if routing is not None:
        one_pass_ms = 1000 * routing["votes_mbytes"] * 2**20 / (limits["copy_bandwidth_gbs"] * 1e9)
        routing["one_read_of_votes_ms"] = one_pass_ms
        routing["reads_equivalent"] = routing["ms"] / one_pass_ms
        # a fused implementation reads the votes once per iteration (agreement, softmax and
        # the weighted sum of the next iteration in one pass) and writes nothing of their size
        routing["minimal_reads"] = routing["iterations"]
        routing["ratio_to_minimal"] = routing["reads_equivalent"] / routing["iterations"]
        routing["backward_reads_equivalent"] = routing["backward_ms"] / one_pass_ms
        routing["backward_to_forward"] = routing["backward_ms"] / routing["ms"]
        result["routing_alone"] = routing
    return result
