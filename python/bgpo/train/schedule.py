"""The learning-rate schedule of the trainer's optimizer updates."""
from __future__ import annotations

import math

__all__ = ["lr_multiplier"]


def lr_multiplier(kind: str, warmup: int, total: int):
    """LR multiplier for optimizer update u: linear warm-up, then constant, linear or cosine decay to 0."""

    def multiplier(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return multiplier
