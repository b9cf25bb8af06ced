"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    value,
    *,
    dims: int | None = None,
    dtype: torch.dtype | None = None,
    integer: bool = False,
    floating: bool = False,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {value.dtype}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor, got {value.dtype}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, bfloat16 or float16, got {value.dtype}")


def check_shape(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")


def check_device(name: str, value: torch.Tensor, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name}: expected a tensor on {reference.device}, got one on {value.device}")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> None:
    """``value`` is a Python int in ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"< {high}" if low is None else f"in [{low}, {high})"
        raise ValueError(f"{name}: expected an int {bounds}, got {value}")


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether a data-dependent check can read ``tensor``: not under torch.compile, not fake or meta."""
    return not (torch.compiler.is_compiling() or tensor.device.type == "meta" or is_fake(tensor))


def check_values(name: str, condition: torch.Tensor, expected: str) -> None:
    """Data-dependent check (one host sync); skipped where values cannot be read (see values_readable)."""
    check_all_values((name, condition, expected))


def check_all_values(*checks: tuple[str, torch.Tensor, str]) -> None:
    """Several ``(name, condition, expected)`` checks of ``check_values`` for one host sync together;
    the error names the first argument whose condition fails."""
    if not checks or not all(values_readable(condition) for _, condition, _ in checks):
        return
    passed = torch.stack([condition.all() for _, condition, _ in checks]).tolist()
    for (name, _, expected), ok in zip(checks, passed):
        if not ok:
            raise ValueError(f"{name}: expected {expected}")


def check_real(name: str, value, *, positive: bool = False, nonnegative: bool = False,
               interval: tuple[float, float] | None = None, ends: str = "[]", optional: bool = False) -> None:
    """``value`` is a finite real number (not a bool, not a string): ``> 0`` or ``>= 0`` if asked, inside
    ``interval`` if given (``ends``: which ends belong to it, ``"[]"``, ``"[)"``, ``"(]"`` or ``"()"``);
    ``optional``: None passes too."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and ((positive and not value > 0) or (nonnegative and not value >= 0)):
        ok = False
    if ok and interval is not None:
        low, high = interval
        ok = (low <= value if ends[0] == "[" else low < value) and (value <= high if ends[1] == "]" else value < high)
    if not ok:
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        if interval is not None:
            bound += f" in {ends[0]}{interval[0]:g}, {interval[1]:g}{ends[1]}"
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}a finite number{bound}, got {value!r}")


def check_bool(name: str, value) -> None:
    """``value`` is a real ``bool`` (a string such as ``"false"`` would read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_cu_seqlens(name: str, cu_seqlens, total: int, device: torch.device | None = None) -> None:
    """Packed-sequence boundaries: a 1-D integer tensor ``[0, ..., total]``, non-decreasing (sequence i is
    rows ``cu_seqlens[i]`` to ``cu_seqlens[i + 1] - 1``; an empty sequence is allowed)."""
    check_tensor(name, cu_seqlens, dims=1, integer=True)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: expected at least 2 entries [0, ..., {total}], got shape {tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {cu_seqlens.device}")
    check_values(name, (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all(),
                 f"non-decreasing offsets from 0 to {total} (the number of packed rows)")
