"""Running under ``torchrun``: process group, model sharding, and one gradient reduction per step.

Two strategies, chosen by ``distributed`` in the config:

* ``fsdp`` (default): FSDP2 — ``fully_shard`` on every transformer block, then on the root (embedding,
  final norm, LM head).  Within an optimizer step every backward but the last runs with
  ``set_requires_gradient_sync(False)`` (gradients accumulate unsharded on each rank) and the last
  reduce-scatters them once.
* ``ddp``: every rank holds the whole model; gradients accumulate locally over all the MC samples and
  micro-batches of the step and are averaged with one coalesced all-reduce before the optimizer step —
  what ``DistributedDataParallel`` does under ``no_sync()`` plus a final synchronised backward,
  without routing the forward through a DDP wrapper (the trainer calls ``model.hidden_states`` and
  applies the LM head outside the forward, which DDP's reducer does not expect).

Each rank holds whole groups of responses and its losses are divided by its own response count, so
averaging gradients over ranks gives the gradient of the global batch mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "init_distributed", "close_distributed", "shard_model", "all_reduce_gradients",
           "all_reduce", "broadcast_parameters", "check_same_on_every_rank"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none", "fsdp" or "ddp"
    owns_group: bool = False  # init_distributed created the process group (so close_distributed destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(strategy: str) -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = not dist.is_initialized()  # a caller's own group is left to the caller
    if owns_group:
        if torch.cuda.is_available():
            # this rank's GPU as the current device: NCCL's barrier and object collectives and FSDP2's
            # device mesh use it (without it every rank of a node works on cuda:0)
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank,
                              "fsdp" if strategy == "auto" else strategy, owns_group)


def close_distributed(context: DistributedContext) -> None:
    """Destroy the process group ``init_distributed`` created, while the interpreter is still whole.

    A group left to interpreter finalisation can abort the process: gloo's worker threads still own
    work objects whose tensors need the GIL while Python is being torn down ("terminate called without
    an active exception", SIGABRT, after a run that had finished).  Call it only on an orderly exit --
    every collective of this rank has returned -- never while another rank may still be in one.
    """
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def shard_model(model: nn.Module, blocks: nn.ModuleList, context: DistributedContext) -> nn.Module:
    """Apply the context's strategy: FSDP2 per block and root, or nothing for ``ddp``/single process."""
    if context.strategy != "fsdp":
        return model
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_gradients(model: nn.Module, context: DistributedContext) -> None:
    """``ddp``: average the accumulated gradients over ranks with one coalesced all-reduce."""
    if context.strategy != "ddp":
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce(values: torch.Tensor, context: DistributedContext, op: str = "sum") -> torch.Tensor:
    """Sum (or max) of ``values`` over ranks; the tensor itself on a single process."""
    if not context.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def check_same_on_every_rank(value: int, context: DistributedContext, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` on every rank, starting with ``what``, unless every rank holds the same ``value``
    (collective: every rank calls it)."""
    if not context.enabled:
        return
    extremes = all_reduce(torch.tensor([value, -value], dtype=torch.int64, device=device), context, op="max")
    high, low = int(extremes[0]), -int(extremes[1])
    if high != low:
        raise ValueError(f"{what} (this rank, {context.rank}: {value}; over the ranks: from {low} to {high})")
