"""Checkpoints that survive a kill at any point, a full disk, and an exact resume.

A checkpoint is a directory ``checkpoints/step-00000012/`` holding

* ``model.safetensors``: the full (gathered) state dict, or only the trainable tensors with LoRA;
* ``optimizer.pt``: the optimizer state keyed by parameter names (``get_optimizer_state_dict``);
* ``trainer.pt``: scheduler state, step, data position, counters and the RNG states of rank 0;
* ``config.yaml``: the configuration of the run;
* ``complete.json``: written last, the step and the size of every file above.

Rank 0 writes and fsyncs every file into ``.step-N.tmp``, then the marker, renames the directory into
place, then replaces ``checkpoints/latest`` (a one-line file) atomically, and only then prunes older
checkpoints (marker first, so a kill mid-prune never leaves a "complete" checkpoint with missing files).
A kill at any point therefore leaves every checkpoint either complete (marker present, sizes match) or
ignored.  ``find_checkpoint`` resumes from the newest complete one and says so when ``latest`` names
another (a kill between the rename and the pointer update) or a missing one.  A failed write (full
disk...) removes the temporary directory and raises ``CheckpointError`` naming the file and the cause;
the previous checkpoint and ``latest`` are untouched.  The model and optimizer go through
``torch.distributed.checkpoint.state_dict``, which gathers FSDP2 shards on save and scatters on load.
Checkpoints are untrusted input: ``.pt`` files are read with ``torch.load(weights_only=True)``, the
config with ``yaml.safe_load``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
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

__all__ = ["save_checkpoint", "save_weights", "load_checkpoint", "latest_checkpoint", "find_checkpoint",
           "complete_checkpoints", "checkpoint_config", "checkpoint_step", "check_base_weights", "config_differences",
           "resume_point", "rng_state", "set_rng_state", "CheckpointError", "RESUME_MAY_CHANGE"]

_LATEST = "latest"
_COMPLETE = "complete.json"
_NAME = re.compile(r"step-(\d{8,})")

# Keys that may differ between a checkpoint's config and the resuming run's: they do not change what
# the resumed steps compute (where the run writes, how long it runs, logging, checkpointing, the device,
# and memory switches whose gradient is the same).  A section name covers all its keys.  Raising
# ``steps`` with a linear or cosine schedule stretches the LR decay over the new total.
RESUME_MAY_CHANGE = ("output_dir", "steps", "checkpoint", "log", "model.device", "model.activation_checkpointing",
                     "policy.micro_batch_size", "policy.samples_per_forward", "policy.memory_budget_gib",
                     "policy.pack_sequences", "optim.max_nonfinite")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be written or read; the message names the file and the cause."""


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


# ------------------------------------------------------------------------------------------ writing
def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory entry list) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, error: BaseException) -> CheckpointError:
    cause = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else f"{error}"
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on its filesystem"
    except OSError:
        free = ""
    return CheckpointError(f"checkpoint: cannot write {path}: {cause}{free}")


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)``, then fsync it; any failure becomes a ``CheckpointError`` naming ``path``."""
    try:
        write(path)
        _fsync(path)
    except Exception as error:  # OSError, torch's RuntimeError, SafetensorError: all mean "not written"
        raise _write_error(path, error) from error


def _rename(source: Path, target: Path) -> None:
    """``os.replace`` then fsync of the directory; a failure names ``target``."""
    try:
        os.replace(source, target)
        _fsync(target.parent)
    except OSError as error:
        raise _write_error(target, error) from error


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with safe_open(path, "pt") as f:  # what reached the disk: the header parses and the file covers every tensor
        if len(list(f.keys())) != len(state):
            raise OSError(f"{path}: written with {len(list(f.keys()))} of {len(state)} tensors")


def _torch_save(obj) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a Python file: a full disk raises OSError(ENOSPC), not "unexpected pos"
            torch.save(obj, f)

    return write


def _replace_text(path: Path, text: str) -> None:
    """Replace ``path``'s content atomically (temporary file, fsync, rename, fsync of the directory)."""
    temporary = path.parent / f".{path.name}.tmp"
    _write(temporary, lambda p: p.write_text(text))
    _rename(temporary, path)


def save_weights(path: str | Path, model, context: DistributedContext) -> None:
    """The model's full state dict (FSDP2 shards gathered: collective under torchrun) as one safetensors
    file, written by rank 0 to a temporary name, fsynced and renamed into place."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if context.is_main:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.tmp"
        _write(temporary, lambda p: _save_safetensors(state, p))
        _rename(temporary, path)
    if context.enabled:
        dist.barrier()


def save_checkpoint(directory: str | Path, *, step: int, model, optimizer, trainer_state: dict, config: dict,
                    context: DistributedContext, keep: int) -> Path | None:
    """Write ``directory/step-{step:08d}`` (collective under torchrun); return its path on rank 0.

    Refuses to replace a complete checkpoint of the same step (``CheckpointError``): a step is saved once.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = _trainable_only(model, get_model_state_dict(model, options=options))
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    final = Path(directory) / f"step-{step:08d}"
    rng = [rng_state()]  # every rank's generators (LoRA dropout draws from them), in rank order
    if context.enabled:
        rng = [None] * context.world_size if context.is_main else None
        dist.gather_object(rng_state(), rng, dst=0)
    if context.is_main:
        if _is_complete(final):
            raise CheckpointError(f"checkpoint: {final} is already saved; a step is never saved twice")
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.parent / f".{final.name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        files = {
            "model.safetensors": lambda p: _save_safetensors(model_state, p),
            "optimizer.pt": _torch_save(optimizer_state),
            "trainer.pt": _torch_save({**trainer_state, "rng": rng}),
            "config.yaml": lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)),
        }
        try:
            for name, write in files.items():
                _write(temporary / name, write)
            sizes = {name: (temporary / name).stat().st_size for name in files}
            _write(temporary / _COMPLETE, lambda p: p.write_text(json.dumps({"step": step, "files": sizes})))
            _fsync(temporary)
        except CheckpointError:
            shutil.rmtree(temporary, ignore_errors=True)  # the previous checkpoint and `latest` stay as they were
            raise
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover: neither `latest` nor resume uses it
        _rename(temporary, final)
        _replace_text(final.parent / _LATEST, final.name + "\n")
        _prune(final.parent, step, keep)
    if context.enabled:
        dist.barrier()
    return final if context.is_main else None


def _prune(directory: Path, step: int, keep: int) -> None:
    """Delete complete checkpoints older than ``step`` beyond the ``keep - 1`` newest of them, and torn
    temporary directories; never ``step`` itself or a newer one."""
    older = [(s, p) for s, p in complete_checkpoints(directory) if s < step]
    for _, path in older[: max(0, len(older) - (keep - 1))]:
        try:
            (path / _COMPLETE).unlink()  # first: a kill mid-delete leaves an incomplete (ignored) directory
        except OSError as error:  # the new checkpoint is in place: say so, do not fail the run
            warnings.warn(f"checkpoint.keep: cannot delete {path}: {error}", RuntimeWarning, stacklevel=3)
            continue
        shutil.rmtree(path, ignore_errors=True)
    for torn in directory.glob(".step-*.tmp"):
        shutil.rmtree(torn, ignore_errors=True)


# ------------------------------------------------------------------------------------------ reading
def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name says (``step-00000012``: 12); None for any other name."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    """The marker is there, parses, names this step, and every file it lists has its recorded size."""
    try:
        marker = json.loads((path / _COMPLETE).read_text())
        files = marker["files"]
        return (marker["step"] == checkpoint_step(path) and isinstance(files, dict) and bool(files)
                and all((path / str(name)).stat().st_size == size for name, size in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in directory.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted((s, p) for s, p in found if _is_complete(p))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``directory/latest`` names if it is complete, else None."""
    pointer = Path(directory) / _LATEST
    try:
        path = Path(directory) / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return path if checkpoint_step(path) is not None and path.parent == Path(directory) and _is_complete(path) else None


def find_checkpoint(directory: str | Path) -> tuple[Path | None, str | None]:
    """The newest complete checkpoint (None if there is none) and a note when that is not simply the one
    ``latest`` names (``latest`` missing, broken, or older after a kill between rename and update)."""
    directory = Path(directory)
    complete = complete_checkpoints(directory)
    named = latest_checkpoint(directory)
    newest = complete[-1][1] if complete else None
    if newest == named and (newest is not None or not directory.is_dir() or not any(directory.iterdir())):
        return newest, None  # the checkpoint `latest` names, or an empty directory: nothing to say
    try:
        pointer = f"{directory / _LATEST} names {(directory / _LATEST).read_text().strip()!r}"
    except (OSError, UnicodeDecodeError):
        pointer = f"{directory / _LATEST} is missing or unreadable"
    if newest is None:
        return None, f"{pointer}, and there is no complete checkpoint in {directory}: starting from step 0"
    why = "an older one (a save was interrupted before it was updated)" if named else "no complete checkpoint"
    return newest, f"{pointer}: {why}; resuming from the newest complete checkpoint, {newest.name}"


def checkpoint_config(path: str | Path) -> dict:
    """The config a checkpoint was written with."""
    file = Path(path) / "config.yaml"
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"checkpoint: cannot read {file}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint: {file} is not a mapping")
    return config


def _flatten(config: dict) -> dict:
    """``{"rollout": {"steps": 4}}`` -> ``{"rollout.steps": 4}`` (sections are one level deep; an option's own
    mapping, e.g. ``policy.spg``, stays one value)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for each key that differs, except those in ``RESUME_MAY_CHANGE``."""
    old, new = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        missing = "(absent)"
        if old.get(key, missing) != new.get(key, missing):
            lines.append(f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}")
    return lines


def resume_point(directory: str | Path, config: dict, *, say: Callable[[str], None],
                 is_main: bool = True, run_files: Iterable[Path] = ()) -> Path | None:
    """The checkpoint a run with ``config`` (``config_to_dict``) continues from (None: from scratch).

    ``checkpoint.resume``: the newest complete checkpoint of ``directory`` (``say`` a note when ``latest``
    names another, and on ``is_main`` point ``latest`` at it); refused (ValueError naming
    ``checkpoint.resume`` and the keys) when its config differs from ``config`` outside
    ``RESUME_MAY_CHANGE``, unless ``checkpoint.force_resume``.  A new run refuses a directory that holds
    checkpoints (it would interleave two runs' checkpoints and metrics), or any non-empty file of
    ``run_files`` (what an earlier run left that a new one would overwrite: its metrics, its warm-up
    weights), even when that run left no checkpoint."""
    options = config["checkpoint"]
    if not options["resume"]:
        existing = complete_checkpoints(directory)
        if existing:
            raise ValueError(f"checkpoint.resume: {directory} holds the checkpoints of an earlier run (newest: "
                             f"{existing[-1][1].name}); pass --resume to continue it, or choose another output_dir")
        left = [str(f) for f in run_files if f.is_file() and f.stat().st_size > 0]
        if left:
            raise ValueError(f"checkpoint.resume: an earlier run left {', '.join(left)} and no checkpoint; a new run "
                             "would overwrite them: choose another output_dir, or pass --resume to start again "
                             "from step 0 in this one (its metrics are then dropped)")
        return None
    path, note = find_checkpoint(directory)
    if note is not None:
        say(note)
    if path is None:
        return None
    if note is not None and is_main:
        _replace_text(path.parent / _LATEST, path.name + "\n")
    differences = config_differences(checkpoint_config(path), config)
    if differences and not options["force_resume"]:
        raise ValueError(f"checkpoint.resume: this config differs from the one {path} was written with: "
                         f"{'; '.join(differences)}. Pass --force-resume (checkpoint.force_resume=true) to continue "
                         "with the new values")
    if differences:
        say(f"checkpoint.force_resume: continuing with changed {'; '.join(differences)}")
    return path


def check_base_weights(saved: str | None, current: str | None, path: Path, *, force: bool,
                       say: Callable[[str], None]) -> None:
    """Refuse (``CheckpointError``) LoRA adapters trained on other base weights than the model built now,
    by their ``weights_fingerprint``s (a replaced file at ``model.path`` changes no config key), unless
    ``force`` (``checkpoint.force_resume``: ``say`` it).  Nothing to check without a saved fingerprint."""
    if saved is None or saved == current:
        return
    problem = (f"the LoRA adapters of {path} were trained on other base weights than the model this config "
               f"builds now (weights fingerprint {saved[:12]} then, {str(current)[:12]} now)")
    if not force:
        raise CheckpointError(f"checkpoint.resume: {problem}; restore that base model, or pass --force-resume to "
                              "continue anyway")
    say(f"checkpoint.force_resume: continuing although {problem}")


def _read(file: Path, read: Callable[[Path], object]):
    try:
        return read(file)
    except Exception as error:  # a truncated or foreign file: name it
        raise CheckpointError(f"checkpoint: cannot read {file}: {error}") from error


def load_checkpoint(path: str | Path, *, model, optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and this ``rank``'s RNG states from ``path``; return the trainer state (step,
    position...).  A run with more ranks than the checkpoint's continues rank ``rank % saved``'s generators;
    a checkpoint written before per-rank states holds rank 0's only."""
    from safetensors.torch import load_file

    path = Path(path)
    model_state = _read(path / "model.safetensors", load_file)
    partial = len(model_state) < len(dict(model.named_parameters()))
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=not partial))
    optimizer_state = _read(path / "optimizer.pt", lambda f: torch.load(f, weights_only=True))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    state = _read(path / "trainer.pt", lambda f: torch.load(f, weights_only=True))
    saved = state.pop("rng")
    saved = saved if isinstance(saved, list) else [saved]
    set_rng_state(saved[rank % len(saved)])
    return state
