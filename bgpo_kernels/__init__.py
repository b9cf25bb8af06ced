"""Triton kernels of bgpo, one op per file: ``random_mask.py`` and ``fused_elbo_loss.py``.

``register()`` (called by ``bgpo._extensions`` when triton is importable) adds the ``"triton"`` backend
of the ops ``random_mask`` and ``fused_elbo_loss`` to ``bgpo.backends``.  The kernel modules import
lazily, at the first call that runs them, so ``import bgpo`` does not pay for importing triton.

The backend runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, set before triton is imported): that is how CI and users without a GPU
check the kernels.  ``backend="auto"`` chooses it for CUDA tensors only.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

import torch

__all__ = ["register", "available", "interpreter_reason"]


def available(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else the reason they cannot."""
    device = torch.device(device)
    if device.type == "cuda":
        from bgpo.backends import cuda_capability_reason

        return cuda_capability_reason(device, "Triton")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            if _compiled_for_gpu():
                return (
                    "TRITON_INTERPRET=1 was set after the Triton kernels were loaded for the GPU; "
                    "set it before the first call that runs them (before importing triton)"
                )
            return interpreter_reason()
        return (
            "the Triton kernels need CUDA tensors; to run them on the CPU, set TRITON_INTERPRET=1 "
            "in the environment before triton is imported (Triton's interpreter, slow: for tests)"
        )
    return f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"


def interpreter_reason(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """None if Triton's interpreter can run the kernels with these releases (default: the installed ones).

    Triton 3.6's interpreter turns a one-element array into a Python int with ``int(array)`` (3.8 squeezes
    it first), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
    every kernel whose loop bounds come from a program id then fails (measured: 3.6.0 with numpy 2.4.6
    fails, with 2.3.5 passes the op tests)."""
    if triton_version is None or numpy_version is None:
        import numpy
        import triton  # only asked under TRITON_INTERPRET=1: importing triton then loads the interpreter

        triton_version, numpy_version = triton_version or triton.__version__, numpy_version or numpy.__version__
    if _release(triton_version) < (3, 8) and _release(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run under numpy {numpy_version} (it converts "
            "one-element arrays to scalars, which numpy >= 2.4 refuses): install numpy<2.4 or triton>=3.8"
        )
    return None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    major, minor = re.match(r"(\d+)(?:\.(\d+))?", version).groups()
    return int(major), int(minor or 0)


def _compiled_for_gpu() -> bool:
    """Whether a kernel module was already imported outside the interpreter (Triton decides at import)."""
    for name in ("random_mask", "fused_elbo_loss"):
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None and not module.INTERPRET:
            return True
    return False


class _LazyOp:
    """Resolves the launchers of one kernel module on first use (keeps ``import bgpo`` light)."""

    def __init__(self, module: str, **functions: str):
        self._module = module
        self._functions = functions

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._functions:
            raise AttributeError(name)
        module = importlib.import_module(self._module, __name__)
        fn = getattr(module, self._functions[name])
        setattr(self, name, fn)
        return fn


class _LazyFunction:
    def __init__(self, module: str, function: str):
        self._module = module
        self._function = function
        self._fn = None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self._module, __name__), self._function)
        return self._fn(*args, **kwargs)


def register() -> None:
    from bgpo.backends import Backend, register_backend

    register_backend(
        "random_mask",
        Backend("triton", _LazyFunction(".random_mask", "random_mask_forward"), available=available),
    )
    elbo = _LazyOp(".fused_elbo_loss", forward="fused_elbo_loss_forward", backward="fused_elbo_loss_backward",
                   workspace_bytes="workspace_bytes")
    elbo.weight_dtype_free = True  # W may have another dtype than hidden: rounded per tile (autocast)
    register_backend("fused_elbo_loss", Backend("triton", elbo, available=available))
