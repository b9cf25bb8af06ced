"""Helpers shared by the kernels: interpreter detection and the CUDA device guard."""
from __future__ import annotations

import contextlib
import os

import torch


def is_interpreter() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
