"""Where metrics go: JSON lines (``metrics.jsonl``), TensorBoard when installed, peak memory; and the
quantities that show whether a policy-gradient step learns (``learning_signals``)."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from .distributed import DistributedContext, all_reduce

__all__ = ["MetricsWriter", "METRICS_FILE", "peak_memory_mib", "learning_signals"]

METRICS_FILE = "metrics.jsonl"


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
        self.path = Path(output_dir) / METRICS_FILE
        self._file = open(self.path, "a", buffering=1)
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

    def truncate(self, step: int) -> int:
        """Drop the records of steps after ``step`` (and a line torn by a kill) from ``metrics.jsonl``, so a
        run resumed from ``step`` does not log the replayed steps twice; return how many were dropped.
        Every record before a checkpoint of step k has ``step <= k``.  TensorBoard files are not rewritten."""
        if not self.enabled:
            return 0
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and record.get("step", 0) <= step
            except (json.JSONDecodeError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            temporary = self.path.with_name(".metrics.jsonl.tmp")
            with open(temporary, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        self._file = open(self.path, "a", buffering=1)
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def learning_signals(elbo: torch.Tensor | None, advantages: torch.Tensor, rewards: torch.Tensor,
                     lengths: torch.Tensor, group_size: int, context: DistributedContext) -> dict:
    """What a step's logged ``loss`` cannot show (on-policy it is 0 by construction, see README), over all ranks.

    ``elbo`` (n_t, N): the per-sample terms of the rollout policy (None for diffu-GRPO, which has no ELBO);
    ``advantages``, ``rewards`` and ``lengths`` (response tokens): (N,).

    * ``groups_with_signal``: fraction of groups whose rewards are not all equal (the others have A = 0
      and give no gradient): near 0, the task is too hard or too easy for the policy.
    * ``surrogate`` = (1/N) Σ_i A_i ELBO_i with ELBO_i = mean_j ℓ_ij: the objective whose gradient the
      on-policy update follows (the loss is -Σ_i A_i exp(ELBO_i - sg ELBO_i)/N: its value is -Σ_i A_i/N = 0,
      its gradient -∇ surrogate).  Positive when the rewarded responses already have a higher ELBO than
      the others of their group.
    * ``elbo_rewarded`` / ``elbo_unrewarded``: mean ELBO per token of the responses with A > 0 / A < 0
      (NaN when there are none); the update raises the first and lowers the second.
    """
    a = advantages.detach().double().cpu()
    grouped = rewards.detach().double().cpu().view(-1, group_size)
    sums = [(grouped.amax(dim=1) > grouped.amin(dim=1)).double().sum(), float(len(grouped))]
    if elbo is not None:
        per_response = elbo.detach().double().mean(dim=0).cpu()
        per_token = per_response / lengths.detach().double().clamp_min(1).cpu()
        up, down = a > 0, a < 0
        sums += [(a * per_response).sum(), float(len(a)), per_token[up].sum(), up.sum(), per_token[down].sum(),
                 down.sum()]
    totals = all_reduce(torch.tensor([float(v) for v in sums], dtype=torch.float64), context).tolist()
    ratios = [totals[k] / totals[k + 1] if totals[k + 1] > 0 else math.nan for k in range(0, len(totals), 2)]
    names = ("groups_with_signal", "surrogate", "elbo_rewarded", "elbo_unrewarded")
    return dict(zip(names, ratios))
