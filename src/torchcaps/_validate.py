"""Input checks shared by every layer, routing algorithm and loader.

Every public entry point validates its tensors with these helpers so that a bad
input raises one clear error naming the argument and the problem, instead of a
broadcasting surprise or a NaN three layers later.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NonFiniteValueError", "check_tensor", "check_finite", "check_dtype_matches",
           "check_iterations", "read_tagged_json"]


class NonFiniteValueError(ValueError):
    """A tensor holds NaN or Inf values (the trainer's ``nonfinite`` policy handles these)."""


def _fmt(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_tensor(
    x: object,
    name: str,
    shape: Sequence[int | str | None] | None = None,
    *,
    floating: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Validate ``x`` and return it unchanged.

    Args:
        x: the value to check.
        name: argument name used in the error message.
        shape: expected shape; an ``int`` entry must match exactly, a ``str`` or
            ``None`` entry matches any size (strings name the axis in messages).
        floating: require a floating-point dtype (no silent integer coercion).
        finite: reject NaN and Inf values.

    Raises:
        TypeError: ``x`` is not a tensor, or has the wrong dtype.
        ValueError: wrong number of dimensions, wrong size, or non-finite values.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype, got {x.dtype}; "
            "convert explicitly (e.g. x.float() / 255) instead of relying on coercion"
        )
    if shape is not None:
        if x.dim() != len(shape):
            raise ValueError(
                f"{name} must have {len(shape)} dimensions {_fmt(shape)}, "
                f"got {x.dim()} with shape {tuple(x.shape)}"
            )
        for axis, (want, got) in enumerate(zip(shape, x.shape)):
            if isinstance(want, int) and want != got:
                raise ValueError(
                    f"{name} must have shape {_fmt(shape)}, got {tuple(x.shape)} "
                    f"(dimension {axis} is {got}, expected {want})"
                )
    if finite:
        check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise :class:`NonFiniteValueError` (a ``ValueError``) if ``x`` holds NaN or Inf.

    Skipped while tracing/compiling.
    """
    if x.is_floating_point() and not torch.compiler.is_compiling():
        # One reduction is enough on the fast path: NaN and Inf propagate through a
        # sum. A non-finite sum can also be overflow of finite values, so only then
        # run the exact (three-pass) test.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise NonFiniteValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return x


def check_dtype_matches(x: torch.Tensor, name: str, module: torch.nn.Module) -> torch.Tensor:
    """Raise ``TypeError`` if ``x`` and ``module``'s parameters have different dtypes.

    Skipped under ``torch.autocast``, where mixed dtypes are intended.
    """
    if _autocast_enabled(x.device.type):
        return x
    param = next(module.parameters(), None)
    if param is not None and x.dtype != param.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the parameters of {type(module).__name__} are "
            f"{param.dtype}; convert the input (e.g. x.to({param.dtype})) or the module"
        )
    return x


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def check_iterations(iterations: object) -> int:
    """Routing iteration count: an integer >= 1 (bools refused); returns it."""
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    return iterations


def read_tagged_json(path, fmt: str, version: int, error: type[Exception], what: str) -> dict:
    """A JSON object whose ``format`` is ``fmt`` and ``version`` is ``version``, or ``error``.

    ``what`` names the kind of file in the messages ("checkpoint manifest", "weights record").
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable {what} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path}: not a {fmt} file (format tag missing)")
    if meta.get("version") != version:
        raise error(f"{path}: unsupported {what} version {meta.get('version')!r} "
                    f"(this torchcaps reads version {version})")
    return meta
