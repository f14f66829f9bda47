"""Process-level settings that make CPU training faster without changing any result.

Capsule layers allocate and free very large tensors every step (CapsNet's votes at batch
128 are 94 MB; a convolutional capsule layer's can be close to 1 GB). glibc serves every
allocation above ``M_MMAP_THRESHOLD`` (at most 32 MB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so each step the kernel zero-fills those pages again on first
touch: for CapsNet that page-fault work costs as much as a large part of the arithmetic.
PyTorch's CPU allocator does not cache, so the fix is one level down: ask glibc to serve
large blocks from its heap and to keep freed memory for reuse (``mallopt(M_MMAP_MAX, 0)``
and a high ``M_TRIM_THRESHOLD``). The same effect is available without code through the
environment variable ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=N``.

The cost: the process keeps its peak heap size (its resident memory does not shrink after a
large step), which is what a training process wants anyway. Outputs are bit-for-bit the
same; only where the memory comes from changes. Other C libraries (musl, macOS, Windows)
are left alone and :func:`keep_freed_memory` returns ``False``.

``torchcaps train``, ``evaluate`` and ``bench`` (and :func:`torchcaps.train.train`,
:func:`torchcaps.bench.measure_throughput`) apply it; set ``TORCHCAPS_KEEP_MEMORY=0`` in the
environment to switch it off.

Measured on the 2-core machine of ``benchmarks/results`` (CapsNet, batch 128, float32,
before the parent-major vote layout): training 102 -> 130 images/s, inference 347 -> 422.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["configure_process", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed heap (mallopt takes a C int)
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse; idempotent.

    Returns ``True`` when the setting took effect (Linux with glibc), ``False`` otherwise,
    including when ``TORCHCAPS_KEEP_MEMORY=0`` is set. Call it early in a process that
    trains or benchmarks.
    """
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if os.environ.get("TORCHCAPS_KEEP_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            # glibc's mallopt returns 1 on success, 0 on error
            ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    _state["ok"] = ok
    return ok


def configure_process(threads: int | None = None, deterministic: bool = False,
                      keep_memory: bool = True) -> None:
    """Apply process-wide settings for a training or benchmark run.

    The library itself never changes global state when it is imported or when a model,
    task or trainer is constructed; the ``torchcaps`` command and the job functions
    (:func:`torchcaps.train.train`, the suites) call this explicitly.

    Args:
        threads: torch intra-op threads (``None``: leave torch's choice). Bitwise-identical
            resumes need the same count.
        deterministic: ``torch.use_deterministic_algorithms(True)``; CUDA also needs
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before the process starts.
        keep_memory: :func:`keep_freed_memory` (same results, faster large allocations).
    """
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        import torch

        torch.set_num_threads(threads)
    if deterministic:
        import torch

        torch.use_deterministic_algorithms(True)
    if keep_memory:
        keep_freed_memory()
