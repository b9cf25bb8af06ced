"""LLaDA checkpoints: ``model.safetensors`` (one file, or shards listed by ``model.safetensors.index.json``)
with the parameter names of LLaDA's remote code, mapped to ``LLaDAModelLM``'s.

Mapping (``{i}`` is the block index; ``.weight`` and ``.bias`` suffixes carry over):

=========================================================  ===================================
LLaDA (``modeling_llada.py``)                              bgpo (``LLaDAModelLM``)
=========================================================  ===================================
``model.transformer.wte``                                  ``embed``
``model.transformer.blocks.{i}.attn_norm``                 ``blocks.{i}.attn_norm``
``model.transformer.blocks.{i}.q_proj`` / ``k_proj`` /     ``blocks.{i}.attn.q_proj`` / ``k_proj`` /
``v_proj``                                                 ``v_proj``
``model.transformer.blocks.{i}.attn_out``                  ``blocks.{i}.attn.o_proj``
``model.transformer.blocks.{i}.ff_norm``                   ``blocks.{i}.mlp_norm``
``model.transformer.blocks.{i}.ff_proj``                   ``blocks.{i}.mlp.gate_proj`` (SwiGLU gate)
``model.transformer.blocks.{i}.up_proj``                   ``blocks.{i}.mlp.up_proj``
``model.transformer.blocks.{i}.ff_out``                    ``blocks.{i}.mlp.down_proj``
``model.transformer.ln_f``                                 ``norm``
``model.transformer.ff_out`` (absent with weight tying)    ``lm_head``
=========================================================  ===================================

Shards are read one at a time, so loading never holds more than the model plus one shard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "LLADA_BLOCK_NAMES",
    "LLADA_TOP_NAMES",
    "from_llada_name",
    "to_llada_name",
    "checkpoint_files",
    "read_safetensors",
    "load_llada_weights",
    "llada_state_dict",
]

_PREFIX = "model.transformer."
# Module names inside block i, LLaDA's -> bgpo's.
LLADA_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "q_proj": "attn.q_proj",
    "k_proj": "attn.k_proj",
    "v_proj": "attn.v_proj",
    "attn_out": "attn.o_proj",
    "ff_norm": "mlp_norm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
# Top-level module names, LLaDA's -> bgpo's.
LLADA_TOP_NAMES = {"wte": "embed", "ln_f": "norm", "ff_out": "lm_head"}

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
_BLOCK_NAMES_BACK = {ours: theirs for theirs, ours in LLADA_BLOCK_NAMES.items()}
_TOP_NAMES_BACK = {ours: theirs for theirs, ours in LLADA_TOP_NAMES.items()}


def from_llada_name(name: str) -> str:
    """bgpo's parameter name for a parameter name of LLaDA's checkpoints."""
    if name.startswith(_PREFIX):
        rest = name[len(_PREFIX):]
        if (m := _BLOCK_RE.fullmatch(rest)) and m[2] in LLADA_BLOCK_NAMES:
            return f"blocks.{m[1]}.{LLADA_BLOCK_NAMES[m[2]]}.{m[3]}"
        if (m := _TOP_RE.fullmatch(rest)) and m[1] in LLADA_TOP_NAMES:
            return f"{LLADA_TOP_NAMES[m[1]]}.{m[2]}"
    raise ValueError(f"checkpoint: {name!r} is not a parameter of LLaDA's Llama-block architecture")


def to_llada_name(name: str) -> str:
    """LLaDA's checkpoint name for a parameter name of ``LLaDAModelLM`` (inverse of ``from_llada_name``)."""
    module, _, kind = name.rpartition(".")
    if (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", module)) and m[2] in _BLOCK_NAMES_BACK:
        return f"{_PREFIX}blocks.{m[1]}.{_BLOCK_NAMES_BACK[m[2]]}.{kind}"
    if module in _TOP_NAMES_BACK:
        return f"{_PREFIX}{_TOP_NAMES_BACK[module]}.{kind}"
    raise ValueError(f"name: {name!r} is not a parameter of LLaDAModelLM")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a ``.safetensors`` file, or a directory with
    ``model.safetensors.index.json`` (its shards, in order) or a single ``model.safetensors``."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"checkpoint: {index} is not a safetensors index with a 'weight_map' object "
                             f"({type(error).__name__}: {error})") from None
        for shard in shards:  # names of files next to the index, never paths elsewhere (hostile input)
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"checkpoint: {index} names the shard {shard!r}, which is not a file name")
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"path: no model.safetensors or model.safetensors.index.json in {path}")


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (on the CPU); an error names the file."""
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: {file} is missing") from None
    except Exception as error:  # noqa: BLE001 (safetensors raises its own SafetensorError, among others)
        raise ValueError(f"checkpoint: {file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from None


def _shards(path: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        yield read_safetensors(file)


def load_llada_weights(
    model: nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Copy a LLaDA checkpoint (original parameter names) into ``model``, shard by shard.

    A model on the meta device receives the checkpoint tensors themselves (converted to ``dtype`` on
    ``device``, default CPU and the stored dtype); a materialised model has them copied into its
    parameters (``dtype``/``device`` must then be left unset: the model's own are kept).  Every parameter
    must be found exactly once and every checkpoint tensor must map to a parameter, with its shape.
    """
    expected = dict(model.named_parameters())
    on_meta = any(p.is_meta for p in expected.values())
    if not on_meta and (dtype is not None or device is not None):
        raise ValueError("dtype: dtype/device apply to a model built on the meta device; use model.to() instead")
    loaded: set[str] = set()
    for shard in _shards(path):
        renamed = {}
        for name, tensor in shard.items():
            ours = from_llada_name(name)
            if ours not in expected:
                raise ValueError(f"checkpoint: {name!r} (-> {ours!r}) has no parameter in the model")
            if tensor.shape != expected[ours].shape:
                raise ValueError(
                    f"checkpoint: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[ours].shape)} for {ours!r} (does config.json match the weights?)"
                )
            if ours in loaded:
                raise ValueError(f"checkpoint: {name!r} appears in more than one shard")
            renamed[ours] = tensor.to(device=device or "cpu", dtype=dtype) if on_meta else tensor
        model.load_state_dict(renamed, strict=False, assign=on_meta)
        loaded.update(renamed)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"checkpoint: no tensor for {len(missing)} parameter(s): {', '.join(missing[:5])}")


def llada_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters under LLaDA's names (to save a checkpoint LLaDA's remote code loads)."""
    return {to_llada_name(name): tensor for name, tensor in model.state_dict().items()}

