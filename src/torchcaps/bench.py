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

import os
import platform
import resource
import statistics
import time

import torch

from .models import create_model

__all__ = ["machine_info", "measure_throughput"]


def machine_info() -> dict:
    """A short description of the machine: CPU model, cores, torch build, device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - non-Linux
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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
) -> dict:
    """Median images/s of ``mode`` ("train" or "infer") for a registered model."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(model_name, **(model_kwargs or {})).to(dev)
    x = torch.rand(batch_size, *model.in_shape, device=dev)
    y = torch.randint(0, model.num_classes, (batch_size,), device=dev)
    if mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            out = model(x, y)
            loss, _ = model.loss(out, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)

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
            "peak_memory_mb": round(peak_mb, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
