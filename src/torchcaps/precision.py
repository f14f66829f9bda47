"""Numeric precision: the one place ``"fp32"`` and ``"bf16"`` are defined and checked.

``"bf16"`` runs the forward pass and loss under ``torch.autocast`` with bfloat16. It pays
only where the hardware computes in bfloat16 natively: CUDA GPUs from Ampere on, and CPUs
with AVX512_BF16 or AMX. On a CPU without them (e.g. capability ``"AVX2"``) PyTorch falls
back to a plain loop for bfloat16 matrix products, which runs some 50-100 times slower
than float32. :func:`check_precision` refuses that trap unless forced.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_capability", "bf16_is_slow", "bf16_slowdown",
           "check_precision"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# capabilities on which PyTorch's CPU bfloat16 matmul has no fast kernel
_SLOW_BF16_CPU = ("AVX2", "NO AVX")
_NATIVE_BF16_CPU = ("AVX512_BF16", "AMX_BF16")


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` ("fp32": disabled, "bf16": bfloat16 autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def cpu_capability() -> str:
    """The CPU's vector capability as PyTorch dispatches on it, refined for bfloat16.

    ``"AMX_BF16"`` or ``"AVX512_BF16"`` when the CPU computes in bfloat16 natively, else
    :func:`torch.backends.cpu.get_cpu_capability` (``"AVX2"``, ``"AVX512"``, ``"SVE256"``, ...).
    """
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX_BF16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512_BF16"
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def bf16_slowdown(device_type: str = "cpu", size: int = 256) -> float:
    """Time of a ``size x size`` bfloat16 matmul over the float32 one (cached per process).

    Best of 3 bfloat16 and of 10 float32 runs, on one CPU thread so that a busy machine
    stalls neither; about 0.1 s on a CPU without native bfloat16, where the ratio is 50-100.
    """
    def best(dtype, runs: int) -> float:
        a = torch.randn(size, size, device=device_type, dtype=dtype)
        torch.mm(a, a)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            torch.mm(a, a)
            if device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(torch.bfloat16, 3) / best(torch.float32, 10)
    finally:
        torch.set_num_threads(threads)


def bf16_is_slow(device: str | torch.device) -> bool:
    """Whether bfloat16 autocast runs much slower than float32 on ``device``.

    CPU: slow on capability ``"AVX2"`` or ``"NO AVX"``, fast with native bfloat16
    (``"AVX512_BF16"``, ``"AMX_BF16"``); for other capabilities a small matmul is timed
    once per process (:func:`bf16_slowdown`) and bf16 counts as slow above 3 times fp32.
    CUDA: slow where :func:`torch.cuda.is_bf16_supported` says there is no native support.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return not torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument
            return not torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    cap = cpu_capability()
    if cap in _SLOW_BF16_CPU:
        return True
    if cap in _NATIVE_BF16_CPU:
        return False
    return bf16_slowdown("cpu") > 3.0


def _slow_bf16_reason(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"bf16 on {torch.cuda.get_device_name(dev)} (no native bf16) runs slower than fp32"
    ratio = bf16_slowdown("cpu")
    speed = f"about {ratio:.0f} times slower" if ratio >= 2 else "much slower"
    return (f"bf16 on this CPU (capability {cpu_capability()}, no native bf16) runs {speed} "
            "than fp32")


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def check_precision(device: str | torch.device, precision: str, force: bool = False,
                    warn: Callable[[str], None] = _stderr) -> str | None:
    """Refuse a precision that would run far slower than fp32 on ``device``.

    Args:
        device: where the model runs.
        precision: ``"fp32"`` or ``"bf16"``.
        force: run anyway: pass the reason to ``warn`` instead of raising.
        warn: called with the warning text when ``force`` (default: print to stderr).

    Returns:
        The warning text when one was issued, else ``None``.

    Raises:
        ValueError: for an unknown precision, or bf16 where it is slow and not ``force``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision != "bf16" or not bf16_is_slow(dev):
        return None
    reason = _slow_bf16_reason(dev)
    if not force:
        raise ValueError(f"{reason}; use --precision fp32, or pass --force-precision to run anyway")
    msg = f"{reason}; running anyway"
    warn(msg)
    return msg
