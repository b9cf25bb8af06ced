"""Measure the peak memory of a block of code, on the CPU as on a GPU, by tracking real allocations.

* CUDA: the caching allocator's counters (``torch.cuda.max_memory_allocated``).
* CPU: every allocation and free of the CPU allocator, as recorded by the PyTorch profiler with
  ``profile_memory=True``; the running sum of those events, in time order, gives the peak.
* Fake tensors (``track_fake_memory``): a simulation for shapes no machine here can hold (LLaDA-8B).
  A dispatch mode sees every op's outputs and counts the bytes of each new storage until the storage
  dies.  Ops whose implementation is opaque (custom ops) declare the transient workspace their real
  implementation allocates with ``register_workspace``; the tracker adds it for the op's duration.

The figure reported is the peak of live tensor bytes *above the level at entry*: the extra memory the
block needed, including what it still holds at exit (e.g. gradients).
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "track_peak_memory", "track_fake_memory", "register_workspace"]


@dataclass
class PeakMemory:
    device: str
    peak_bytes: int = 0  # max over the block of (live bytes - live bytes at entry)
    end_bytes: int = 0  # live bytes at exit - live bytes at entry

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


@contextlib.contextmanager
def _native_stderr_silenced():
    """Redirect file descriptor 2 (where C++ libraries write) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def track_peak_memory(device: str | torch.device = "cpu"):
    """``with track_peak_memory("cpu") as mem: ...`` then read ``mem.peak_bytes``."""
    device = torch.device(device)
    stats = PeakMemory(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield stats
        torch.cuda.synchronize(device)
        stats.peak_bytes = torch.cuda.max_memory_allocated(device) - start
        stats.end_bytes = torch.cuda.memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {device}")
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # the profiler backend logs its start, stop and a GPU probe there
        prof.start()
    try:
        yield stats
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    stats.peak_bytes, stats.end_bytes = peak, live


# op name ("namespace::name") -> fn(*args, **kwargs) giving the bytes of transient workspace
_WORKSPACES: dict[str, Callable[..., int]] = {}


def register_workspace(op_name: str, workspace_bytes: Callable[..., int]) -> None:
    """Declare the transient memory an opaque op allocates, for ``track_fake_memory``."""
    _WORKSPACES[op_name] = workspace_bytes


class _StorageTracker(TorchDispatchMode):
    """Counts live storage bytes of every tensor an op returns, until the storage is freed."""

    def __init__(self, stats: PeakMemory):
        super().__init__()
        self.stats = stats
        self.live = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def _record(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen or key in inputs:  # a view of, or in-place result on, an existing storage
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        weakref.finalize(storage, self._free, key, nbytes)

    def _peak(self, extra: int = 0) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.live + extra)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        workspace = _WORKSPACES.get(func._schema.name)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._record(item, inputs)
        self._peak(workspace(*args, **kwargs) if workspace is not None else 0)
        return out


@contextlib.contextmanager
def track_fake_memory():
    """``with FakeTensorMode(), track_fake_memory() as mem: ...``: the simulated peak of the block."""
    stats = PeakMemory(device="fake")
    tracker = _StorageTracker(stats)
    with tracker:
        yield stats
    stats.end_bytes = tracker.live
