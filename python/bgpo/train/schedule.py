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


def apply_optim_config(optimizer, scheduler, optim) -> None:
    """``optim``'s settings over those a checkpoint restored: ``optim.*`` changed under ``--force-resume``
    and a changed run length (the schedule's) take effect from the first resumed update, whose lr is the
    current schedule's at the restored update count."""
    settings = _settings(optim)
    groups = optimizer.param_groups
    scheduler.base_lrs = [optim.lr] * len(groups)
    settings["lr"] = optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in groups:
        group.update(initial_lr=optim.lr, **settings)
    scheduler._last_lr = [settings["lr"]] * len(groups)  # what get_last_lr() reports
