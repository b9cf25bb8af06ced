"""Checkpoints that survive a crash mid-write, and an exact resume.

A checkpoint is a directory ``checkpoints/step-00000012/`` holding

* ``model.safetensors``: the full (gathered) state dict, or only the trainable tensors with LoRA;
* ``optimizer.pt``: the optimizer state keyed by parameter names (``get_optimizer_state_dict``);
* ``trainer.pt``: scheduler state, step, data position, counters and the RNG states of rank 0;
* ``config.yaml``: the configuration of the run.

It is written by rank 0 into a temporary directory that is renamed into place once complete, then
``checkpoints/latest`` (a one-line file, replaced atomically) names it, and the oldest checkpoints
beyond ``keep`` are deleted.  A crash leaves either the previous checkpoint or the new one, never a
torn one.  The model and optimizer go through ``torch.distributed.checkpoint.state_dict``, which
gathers FSDP2 shards into full tensors on save and scatters them on load.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import DistributedContext

__all__ = ["save_checkpoint", "save_weights", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

_LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_only(model, state: dict) -> dict:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == sum(1 for _ in model.parameters()):
        return state
    return {name: tensor for name, tensor in state.items() if name in trainable}


def save_weights(path: str | Path, model, context: DistributedContext) -> None:
    """The model's full state dict (FSDP2 shards gathered: collective under torchrun) as one safetensors
    file, written by rank 0 to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if context.is_main:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, temporary)
        os.replace(temporary, path)
    if context.enabled:
        dist.barrier()


def save_checkpoint(directory: str | Path, *, step: int, model, optimizer, trainer_state: dict, config: dict,
                    context: DistributedContext, keep: int) -> Path | None:
    """Write ``directory/step-{step:08d}`` atomically (collective under torchrun); return its path on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = _trainable_only(model, get_model_state_dict(model, options=options))
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    final = Path(directory) / f"step-{step:08d}"
    if context.is_main:
        from safetensors.torch import save_file

        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.parent / f".{final.name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        save_file({k: v.contiguous() for k, v in model_state.items()}, temporary / "model.safetensors")
        torch.save(optimizer_state, temporary / "optimizer.pt")
        torch.save({**trainer_state, "rng": rng_state()}, temporary / "trainer.pt")
        with open(temporary / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        pointer = final.parent / f".{_LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, final.parent / _LATEST)
        for old in sorted(final.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if context.enabled:
        dist.barrier()
    return final if context.is_main else None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``directory/latest`` names, or None when there is none."""
    pointer = Path(directory) / _LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, *, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from ``path``; return the trainer state (step, position...)."""
    from safetensors.torch import load_file

    path = Path(path)
    model_state = load_file(path / "model.safetensors")
    partial = len(model_state) < len(dict(model.named_parameters()))
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=not partial))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    state = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
