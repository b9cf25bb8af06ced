"""The trainer's optimizer (AdamW) and the learning-rate schedule of its updates, from ``optim.*``."""
from __future__ import annotations

import math

import torch

__all__ = ["lr_multiplier", "build_optimizer", "apply_optim_config"]


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


def _settings(optim) -> dict:
    return dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


def build_optimizer(parameters, optim, total_updates: int):
    """(AdamW, its LambdaLR schedule over ``total_updates`` optimizer updates) as ``optim`` says."""
    optimizer = torch.optim.AdamW(parameters, **_settings(optim))
    schedule = lr_multiplier(optim.schedule, optim.warmup_steps, total_updates)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_optim_config(optimizer, restored, optim):
    """``optim``'s settings over those a checkpoint restored: ``optim.*`` changed under ``--force-resume``
    and a changed run length (the schedule ``restored`` was built with) take effect from the first resumed
    update.  Returns the schedule to use from there: a new LambdaLR at the restored update count u, whose
    lr is the current schedule's at u (``last_epoch=u - 1``: the constructor takes one step)."""
    settings = _settings(optim)
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, **settings)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, restored.lr_lambdas[0], last_epoch=restored.last_epoch - 1)
