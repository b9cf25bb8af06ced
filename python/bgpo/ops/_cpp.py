"""The C++/CUDA extension ``bgpo._C``: load it and register its kernels as bgpo backends.

``bgpo._C`` registers the operators ``torch.ops.bgpo_C.{random_mask, fused_elbo_loss_fwd,
fused_elbo_loss_bwd, philox_randint, philox_rand}`` with CPU kernels (C++, OpenMP) and, when it was
built with a CUDA toolkit, CUDA kernels.  Here they become the backends ``"cpu"`` (CPU tensors) and
``"cuda"`` (CUDA tensors) of ``bgpo.random_mask`` and ``bgpo.fused_elbo_loss``, with the contracts of
those modules.  When the extension is absent, bgpo runs on its PyTorch/Triton paths and says so once.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import SimpleNamespace

import torch

from ..backends import Backend, cuda_capability_reason, register_backend

__all__ = ["load", "available", "has_cuda_kernels", "import_error", "ExtensionNotBuiltWarning", "CPU_AUTO"]

_LIB = "bgpo_C"
_OPS = ("random_mask", "fused_elbo_loss_fwd", "fused_elbo_loss_bwd", "philox_randint", "philox_rand")

# Whether backend="auto" picks the C++ CPU kernels on CPU tensors, per op, as measured with
# benchmarks/cpp_vs_torch_cpu.py (README, "Building the extension"; 2-core CPU, torch 2.14.1):
# random_mask is 1.5-190x faster than the torch backend, so auto uses it; fused_elbo_loss is faster only
# at toy sizes (1.8x) and 0.4-0.9x at LM-head sizes (its exp is scalar where torch's is SIMD, and bf16
# runs as fp32 GEMMs for accuracy), so auto keeps the torch backend and "cpu" is opt-in.
CPU_AUTO = {"random_mask": True, "fused_elbo_loss": False}

_state: dict[str, object] = {"loaded": False, "error": None, "warned": False}


class ExtensionNotBuiltWarning(UserWarning):
    """bgpo._C is missing or failed to load; bgpo runs on its PyTorch (and Triton) paths."""


def _import() -> bool:
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    try:
        # loading the library registers torch.ops.bgpo_C.*; import_module (not `from .. import _C`, which
        # bgpo's own partly initialised __init__ turns into a plain ImportError) says ModuleNotFoundError
        # when the extension was not built
        importlib.import_module("bgpo._C")
    except (ImportError, OSError) as error:  # not built, or built against another torch (undefined symbol)
        _state["error"] = error
        return False
    _state["loaded"] = True
    return True


def available() -> bool:
    """Whether bgpo._C is importable (it is imported on the first call)."""
    return _import()


def import_error() -> BaseException | None:
    """Why bgpo._C could not be imported, or None."""
    _import()
    return _state["error"]  # type: ignore[return-value]


def has_cuda_kernels() -> bool:
    """Whether bgpo._C was built with its CUDA kernels (asks the dispatcher, needs no GPU)."""
    return _import() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIB}::{op}", "CUDA") for op in _OPS
    )


def _op(name: str):
    return getattr(getattr(torch.ops, _LIB), name)


def _cpu_available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f'the "cpu" backend (C++ kernels of bgpo._C) runs on CPU tensors, got {device.type} tensors'
    return None


def _cuda_available(device: torch.device) -> str | None:
    if not has_cuda_kernels():
        return "bgpo._C was built without CUDA (rebuild it with a CUDA toolkit; README, 'Building the extension')"
    if device.type != "cuda":
        return f'the "cuda" backend runs on CUDA tensors, got {device.type} tensors'
    return cuda_capability_reason(device, '"cuda"')


def _random_mask_impl(input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples, scheme,
                      t_min, stratify_t, length_normalize):
    return _op("random_mask")(input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples,
                              scheme, t_min, stratify_t, length_normalize)


def _elbo_forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size):
    return _op("fused_elbo_loss_fwd")(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size)


def _elbo_backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
                   need_hidden, need_weight, need_bias):
    return _op("fused_elbo_loss_bwd")(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse,
                                      softcap, chunk_size, need_hidden, need_weight, need_bias)


def _elbo_workspace_bytes(cuda, phase, hidden, weight, chunk_size, need_weight=False):
    """Bytes the C++ (``cuda`` False) or CUDA fused op allocates inside one call beyond its outputs
    (``bgpo.memory``), whatever device the (fake) tensors claim: the simulator may count the CUDA backend
    on CPU tensors.

    The masked-row count N is data: it is taken to be B·L (exact when every position is masked, an upper
    bound otherwise), and grad h is taken to be needed.  The tiling (R rows x Vt columns) is the
    extension's own (``torch.ops.bgpo_C.fused_elbo_loss_tiles``, csrc/fused_elbo_loss.h).  Both passes
    hold the (b, l) index of the masked positions and the gathered rows, targets and per-row lse/log-p
    (or coefficient).  Forward: an R x V fp32 logits chunk; on the CPU for bf16/fp16 also the fp32 copy
    of the chunk's rows and of one 2**22-element weight block.  Backward: an R x Vt fp32 tile (plus its
    bf16/fp16 copy on CUDA), grad h's (N, H) fp32 accumulator and its cast; an fp32 Vt x H grad-W tile
    when the rows take more than one block (or always on the CPU for bf16/fp16, with the fp32 copies of
    the rows and of the weight tile).  An fp32 W with bf16/fp16 rows (autocast) adds the rounded copy of
    one weight block (forward: 2**22 elements) or tile (backward).  No (V, H) buffer on either device.
    """
    B, L, H = hidden.shape
    V = weight.shape[0]
    N = B * L
    size = hidden.element_size()  # the compute dtype's
    low = hidden.dtype != torch.float32
    cpu_low = low and not cuda
    rounded = weight.dtype != hidden.dtype  # W's blocks or tiles rounded to the compute dtype
    rows, width = _op("fused_elbo_loss_tiles")(phase == "backward", N, V, H, chunk_size, cuda)
    gathered = N * 16 + N * H * size + N * 8 + 2 * N * 4  # index (N, 2), h, y, lse and logp/coef
    if phase == "forward":
        block = min(V, max(1, 2**22 // H)) * H
        copies = rows * H * 4 + block * 4 if cpu_low else 0
        return gathered + rows * V * 4 + copies + block * size * rounded + B * L * 4  # + (B, L) log-p
    total = gathered + rows * width * 4 + N * H * 4 + N * H * size * low + width * H * size * rounded
    if cuda and low:
        total += rows * width * size
    if cpu_low:
        total += N * H * 4 + width * H * 4
    if need_weight and (rows < N or cpu_low):
        total += width * H * 4
    return total


def _warn_once(error: BaseException | None) -> None:
    if _state["warned"]:
        return
    _state["warned"] = True
    if isinstance(error, ModuleNotFoundError):
        why = "it is not built"
    else:
        why = f"it failed to load ({type(error).__name__}: {error})"
    warnings.warn(
        f"bgpo: the C++/CUDA extension bgpo._C is unavailable: {why}.  bgpo runs on its PyTorch (and Triton) "
        "paths; backend='cpu' and backend='cuda' are unavailable.  To build it: "
        "`pip install --no-build-isolation -e .` with torch installed (README, 'Building the extension').",
        ExtensionNotBuiltWarning,
        stacklevel=3,
    )


def load() -> bool:
    """Import bgpo._C and register its backends; warn once if it is unavailable.  Returns whether it loaded."""
    if not _import():
        _warn_once(_state["error"])  # type: ignore[arg-type]
        return False
    register_backend("random_mask", Backend("cpu", _random_mask_impl, _cpu_available, auto=CPU_AUTO["random_mask"]))
    register_backend("random_mask", Backend("cuda", _random_mask_impl, _cuda_available))
    def elbo(cuda):
        return SimpleNamespace(forward=_elbo_forward, backward=_elbo_backward,
                               workspace_bytes=functools.partial(_elbo_workspace_bytes, cuda),
                               weight_dtype_free=True)  # an fp32 W is rounded per block/tile (autocast)
    register_backend("fused_elbo_loss", Backend("cpu", elbo(False), _cpu_available, auto=CPU_AUTO["fused_elbo_loss"]))
    register_backend("fused_elbo_loss", Backend("cuda", elbo(True), _cuda_available))
    return True
