"""Measure the peak memory of a block of code, on the CPU as on a GPU, by tracking real allocations.

* CUDA: the caching allocator's counters (``torch.cuda.max_memory_allocated``).
* CPU: every allocation and free of the CPU allocator, as recorded by the PyTorch profiler with
  ``profile_memory=True``; the running sum of those events, in time order, gives the peak.

The figure reported is the peak of live tensor bytes *above the level at entry*: the extra memory the
block needed, including what it still holds at exit (e.g. gradients).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "track_peak_memory"]


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
