"""Argument checks shared by the public ops.

Every public op validates its arguments here before any kernel runs, so bad input is a Python
exception that names the op and the argument: TypeError for a wrong type or dtype, ValueError
for a wrong shape, device or value. The checks read metadata only (they also run on fake
tensors under torch.compile); the few that read data are skipped while compiling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def result_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype of every op's floating results: float32, or float64 for float64 inputs (the
    gradcheck path). Kept here so that the fake kernels and the C++ kernels agree."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(op: str, message: str, error: type[Exception] = ValueError) -> None:
    raise error(f"rlengine.{op}: {message}")


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    return value


def float_tensor(op: str, name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    t = tensor(op, name, value)
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}", TypeError)
    if ndim is not None and t.dim() != ndim:
        _fail(op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def index_tensor(op: str, name: str, value: object) -> torch.Tensor:
    t = tensor(op, name, value)
    if t.dtype not in INDEX_DTYPES:
        _fail(op, f"{name} must be int64 or int32, got {t.dtype}", TypeError)
    return t


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        described = f" ({what})" if what else ""
        _fail(op, f"{name} must have shape {tuple(expected)}{described}, got {tuple(t.shape)}")


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            _fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}")


def mask(op: str, name: str, value: object, expected_shape: Sequence[int], *,
         broadcast: bool = False, what: str = "") -> torch.Tensor:
    """A boolean mask of the given shape; numeric masks count nonzero entries as True. With
    broadcast, a mask whose shape broadcasts to expected_shape is accepted and expanded to it."""
    t = tensor(op, name, value)
    if t.dtype.is_complex:
        _fail(op, f"{name} must be a bool or real tensor, got {t.dtype}", TypeError)
    if broadcast and t.shape != tuple(expected_shape):
        try:
            broadcast_shape = torch.broadcast_shapes(t.shape, expected_shape)
        except RuntimeError:
            broadcast_shape = None
        if broadcast_shape != tuple(expected_shape):
            described = f" ({what})" if what else ""
            _fail(op, f"{name} must have shape {tuple(expected_shape)}{described} or broadcast to "
                      f"it, got {tuple(t.shape)}")
        t = t.expand(expected_shape)
    shape(op, name, t, expected_shape, what)
    return t if t.dtype == torch.bool else t != 0


def number(op: str, name: str, value: object, *, low: float | None = None,
           low_inclusive: bool = True, high: float | None = None) -> float:
    """A finite real number within the given bounds, returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a real number, got {type(value).__name__}", TypeError)
    v = float(value)
    if not math.isfinite(v):
        _fail(op, f"{name} must be finite, got {v}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        _fail(op, f"{name} must be {bound} {low}, got {v}")
    if high is not None and v > high:
        _fail(op, f"{name} must be <= {high}, got {v}")
    return v


def choice(op: str, name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        _fail(op, f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return str(value)


def data_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read tensor data run: always for CPU tensors in eager mode; on other
    devices (where reading means a host synchronization) only with RLENGINE_CHECK_INPUTS=1."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("RLENGINE_CHECK_INPUTS", "0") == "1"


def first_bad_index(bad: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first True element of a boolean tensor, or None if there is none."""
    if not bool(bad.any()):
        return None
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))
