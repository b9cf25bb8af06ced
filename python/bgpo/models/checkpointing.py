"""Activation checkpointing per transformer block, for any model with a list of blocks.

Each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant): only the block's inputs
(one (B, T, H) tensor) are kept; its intermediate activations (normed inputs, q/k/v, attention
output, the MLP's three (B, T, F) tensors) are freed and recomputed in backward, at the cost of a
second forward per block.  LLaDA's remote code has no Hugging
Face gradient checkpointing; this works on it, on bgpo's LLaDA and on any module with blocks.

The block's ``forward`` is replaced on the instance, so parameter names, ``state_dict`` and
per-block FSDP sharding are unchanged (``fully_shard`` may be applied before or after).  Without grad
(rollouts, reference passes) the original forward runs directly.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["find_blocks", "enable_activation_checkpointing"]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model``.

    ``model.blocks`` when it is a non-empty ``nn.ModuleList`` (bgpo's models); otherwise the
    ``nn.ModuleList`` of modules of one class that holds the most parameters (``model.layers`` of
    Hugging Face models, ``transformer.blocks`` of LLaDA; a list of MoE experts inside a block holds
    fewer parameters than the list of blocks, so it is not mistaken for it).
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        return blocks
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError(
            f"model: {type(model).__name__} has no nn.ModuleList of blocks with parameters; "
            "pass the list of transformer blocks explicitly (blocks=...)"
        )
    return best


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: nn.Module, blocks: nn.ModuleList | None = None) -> nn.ModuleList:
    """Recompute each block of ``model`` in backward; returns the blocks (found by ``find_blocks``).

    Idempotent.  The override is a bound method of the block, so ``copy.deepcopy(model)`` gives a
    copy whose blocks checkpoint themselves (not the original's).
    """
    blocks = find_blocks(model) if blocks is None else blocks
    for block in blocks:
        if getattr(block.forward, "__func__", None) is not _checkpointed_forward:
            block.forward = types.MethodType(_checkpointed_forward, block)
    return blocks
