"""Which implementation of an op runs: a small registry shared by every op.

Each op (``random_mask``, ``fused_elbo_loss``) has a pure-PyTorch implementation registered as the
``"torch"`` backend; the Triton kernels (``bgpo_kernels``) and the C++/CUDA extension (``bgpo._C``)
register further backends when they import.  ``backend="auto"`` takes the first backend in the
device's preference order that is registered and available; naming a backend that cannot run on
the given tensors is an error that says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "register_backend", "resolve_backend", "registered_backend", "registered_backends",
           "available_backends", "AUTO_ORDER", "MIN_CUDA_CAPABILITY", "cuda_capability_reason"]

# Preference of backend="auto", per device type.  "cpu" is the C++ CPU path of bgpo._C.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


# The GPU backends feed bf16 operands to matrix products (tl.dot, cuBLAS bf16 GEMMs), and bgpo._C is
# built for sm_80 and sm_90 (+ compute_90 PTX, build_ext_config.DEFAULT_ARCH_LIST): nothing older runs them.
MIN_CUDA_CAPABILITY = (8, 0)


def cuda_capability_reason(device: torch.device, backend: str) -> str | None:
    """None if ``device``'s GPU is sm_80 or newer, else why ``backend`` cannot run there.

    Without a visible GPU no CUDA tensor exists but fake ones (``bgpo.memory``'s simulator of a GPU run,
    ``torch.compile``'s tracing): those are accepted, as ``backend="auto"`` would choose on a GPU."""
    if not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability >= MIN_CUDA_CAPABILITY:
        return None
    major, minor = capability
    return (f"the {backend} backend needs a GPU of compute capability 8.0 or newer (sm_80+: bf16 matrix "
            f"products), cuda:{index} ({torch.cuda.get_device_name(index)}) has {major}.{minor} (sm_{major}{minor})")


@dataclass(frozen=True)
class Backend:
    name: str
    impl: object  # op-specific: a module or namespace with the functions the op calls
    # available(device) -> None if the backend can run on that device, else the reason it cannot.
    available: Callable[[torch.device], str | None]
    # Whether backend="auto" may choose it (a backend that is correct but slower than another opts out).
    auto: bool = True


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def registered_backend(op: str, name: str) -> Backend | None:
    """The backend registered as ``name`` for ``op``, whether or not it can run here (None if none is)."""
    return _REGISTRY.get(op, {}).get(name)


def available_backends(op: str, device: torch.device | str) -> tuple[str, ...]:
    """The registered backends of ``op`` that can run on ``device`` (what tests parametrize over)."""
    device = torch.device(device)
    return tuple(name for name, b in _REGISTRY.get(op, {}).items() if b.available(device) is None)


def resolve_backend(op: str, backend: str, device: torch.device) -> Backend:
    """The backend that runs ``op`` on ``device`` for the user's ``backend`` argument."""
    table = _REGISTRY.get(op, {})
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            candidate = table.get(name)
            if candidate is not None and candidate.auto and candidate.available(device) is None:
                return candidate
        return table["torch"]
    known = ("auto", "torch", "triton", "cuda", "cpu")
    if backend not in known:
        raise ValueError(f"backend: expected one of {known}, got {backend!r}")
    candidate = table.get(backend)
    if candidate is None:
        raise ValueError(
            f"backend: {backend!r} is not available for {op} "
            f"(registered: {', '.join(table) or 'none'}); {_MISSING_HINT.get(backend, '')}".rstrip("; ")
        )
    reason = candidate.available(device)
    if reason is not None:
        raise ValueError(f"backend: {backend!r} cannot run {op} on {device.type} tensors: {reason}")
    return candidate


_MISSING_HINT = {
    "triton": "install triton (it comes with CUDA builds of torch)",
    "cuda": "build the extension with a CUDA toolkit: pip install -e . (see README, 'Building the extension')",
    "cpu": "build the extension: pip install -e . (see README, 'Building the extension')",
}
