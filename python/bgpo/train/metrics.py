"""Where metrics go: JSON lines (``metrics.jsonl``), TensorBoard when installed, peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

__all__ = ["MetricsWriter", "peak_memory_mib"]


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last call (resets it), or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsWriter:
    """Appends one JSON object per record to ``output_dir/metrics.jsonl`` (rank 0 only; others no-op)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(output_dir) / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
